//! Table-driven tests of `render` with small fixture builders.

use super::*;
use crate::model::ServicePort;
use envlane::config::PluginConfig;

/// `render` without VirtualServices (most cases do not need them).
fn render<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    pods: impl IntoIterator<Item = &'a Pod>,
    services: impl IntoIterator<Item = &'a Service>,
    opts: &RenderOptions,
) -> Result<Rendered, RenderError> {
    super::render(namespaces, pods, services, &[], opts)
}

const ON: &str = "envlane.io/enabled";

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ns(name: &str, opted: bool) -> Namespace {
    Namespace {
        name: name.into(),
        labels: if opted {
            labels(&[(ON, "true")])
        } else {
            labels(&[])
        },
        terminating: false,
    }
}

fn pod(ns: &str, app: &str, env: &str, ready: bool) -> Pod {
    Pod {
        namespace: ns.into(),
        name: format!("{app}-{env}-{}", u8::from(ready)),
        labels: labels(&[("app", app), ("virtual-env", env), ("tier", "backend")]),
        ready,
        ips: Vec::new(),
        host_network: false,
        workload: format!("{app}-{env}"),
        service_account: app.into(),
        container_ports: Vec::new(),
    }
}

fn port(n: u16) -> ServicePort {
    ServicePort {
        name: Some(format!("p{n}")),
        port: n,
        protocol: Some("TCP".into()),
        app_protocol: None,
        target_port: Some(n.into()),
    }
}

fn svc(ns: &str, name: &str, app: &str, ports: &[u16]) -> Service {
    Service {
        namespace: ns.into(),
        name: name.into(),
        labels: Labels::new(),
        selector: labels(&[("app", app)]),
        ports: ports.iter().map(|&p| port(p)).collect(),
        external_name: false,
        headless: false,
    }
}

fn opts_with(settings: PluginConfig) -> RenderOptions {
    RenderOptions {
        settings,
        ..RenderOptions::default()
    }
}

/// `host: env,env` lines: the table in a readable form.
fn pairs(r: &Rendered) -> Vec<String> {
    r.table
        .services
        .iter()
        .map(|s| {
            let envs: Vec<&str> = s
                .envs
                .iter()
                .map(|&i| r.table.envs[i as usize].name.as_str())
                .collect();
            format!("{} {:?}: {}", s.host, s.ports, envs.join(","))
        })
        .collect()
}

fn alibaba_pods(ns: &str) -> Vec<Pod> {
    let mut pods = Vec::new();
    for (app, envs) in [
        ("node", &["dev", "dev.proj1"][..]),
        ("go", &["dev", "dev.proj2"][..]),
        (
            "springboot",
            &["dev", "dev.proj1", "dev.proj1.feature1"][..],
        ),
    ] {
        for env in envs {
            pods.push(pod(ns, app, env, true));
        }
    }
    pods
}

fn alibaba_services(ns: &str) -> Vec<Service> {
    vec![
        svc(ns, "node", "node", &[8080]),
        svc(ns, "go", "go", &[8080]),
        svc(ns, "java", "springboot", &[8080]),
    ]
}

struct Case {
    name: &'static str,
    namespaces: Vec<Namespace>,
    pods: Vec<Pod>,
    services: Vec<Service>,
    want: &'static [&'static str],
}

/// What alibaba/virtual-environment's e2e deployment renders to.
const ALIBABA_TABLE: &[&str] = &[
    "go.demo.svc.cluster.local [8080]: dev,dev.proj2",
    "java.demo.svc.cluster.local [8080]: dev,dev.proj1,dev.proj1.feature1",
    "node.demo.svc.cluster.local [8080]: dev,dev.proj1",
];

#[test]
fn table_cases() {
    let mut extra_unready = alibaba_pods("demo");
    extra_unready.push(pod("demo", "go", "dev.proj3", false));
    let mut shared_pods = alibaba_services("demo");
    shared_pods.push(Service {
        selector: labels(&[("tier", "backend"), ("app", "go")]),
        ..svc("demo", "go-backend", "go", &[9000])
    });
    let mut not_inputs = alibaba_services("demo");
    not_inputs.push(Service {
        selector: Labels::new(),
        ..svc("demo", "no-selector", "go", &[80])
    });
    not_inputs.push(Service {
        external_name: true,
        headless: false,
        ..svc("demo", "external", "go", &[80])
    });
    not_inputs.push(Service {
        labels: labels(&[(MANAGED_BY_KEY, MANAGED_BY_VALUE)]),
        ..svc("demo", "go-dev", "go", &[8080])
    });
    not_inputs.push(svc("demo", "no-ports", "go", &[]));
    not_inputs.push(Service {
        headless: true,
        ..svc("demo", "go-headless", "go", &[8080])
    });
    not_inputs.push(svc("demo", "no-pods", "nothing", &[80]));

    let cases = vec![
        Case {
            name: "hierarchy: each service lists exactly the envs with Ready pods",
            namespaces: vec![ns("demo", true)],
            pods: alibaba_pods("demo"),
            services: alibaba_services("demo"),
            want: ALIBABA_TABLE,
        },
        Case {
            name: "readiness: an un-Ready pod's env is not written",
            namespaces: vec![ns("demo", true)],
            pods: extra_unready,
            services: alibaba_services("demo"),
            want: ALIBABA_TABLE,
        },
        Case {
            name: "only un-Ready pods: the service is not in the table",
            namespaces: vec![ns("demo", true)],
            pods: vec![pod("demo", "go", "dev", false)],
            services: vec![svc("demo", "go", "go", &[8080])],
            want: &[],
        },
        Case {
            name: "multi-port: all ports, sorted, duplicates (TCP/UDP) once",
            namespaces: vec![ns("demo", true)],
            pods: vec![pod("demo", "dns", "dev", true)],
            services: vec![Service {
                ports: vec![
                    port(9090),
                    port(53),
                    ServicePort {
                        protocol: Some("UDP".into()),
                        ..port(53)
                    },
                ],
                ..svc("demo", "dns", "dns", &[])
            }],
            want: &["dns.demo.svc.cluster.local [53, 9090]: dev"],
        },
        Case {
            name: "several Services select the same pods",
            namespaces: vec![ns("demo", true)],
            pods: alibaba_pods("demo"),
            services: shared_pods,
            want: &[
                "go-backend.demo.svc.cluster.local [9000]: dev,dev.proj2",
                "go.demo.svc.cluster.local [8080]: dev,dev.proj2",
                "java.demo.svc.cluster.local [8080]: dev,dev.proj1,dev.proj1.feature1",
                "node.demo.svc.cluster.local [8080]: dev,dev.proj1",
            ],
        },
        Case {
            name: "not opted in: ignored",
            namespaces: vec![ns("demo", true), ns("other", false)],
            pods: [alibaba_pods("demo"), alibaba_pods("other")].concat(),
            services: [
                alibaba_services("other"),
                vec![svc("demo", "go", "go", &[8080])],
            ]
            .concat(),
            want: &["go.demo.svc.cluster.local [8080]: dev,dev.proj2"],
        },
        Case {
            name: "unknown namespace (not listed): ignored",
            namespaces: vec![],
            pods: alibaba_pods("demo"),
            services: alibaba_services("demo"),
            want: &[],
        },
        Case {
            name: "no selector, ExternalName, own per-env Services, no ports, no pods: skipped",
            namespaces: vec![ns("demo", true)],
            pods: alibaba_pods("demo"),
            services: not_inputs,
            want: ALIBABA_TABLE,
        },
        Case {
            name: "two namespaces share one table",
            namespaces: vec![ns("a", true), ns("b", true)],
            pods: vec![pod("a", "go", "dev", true), pod("b", "go", "dev.x", true)],
            services: vec![svc("a", "go", "go", &[80]), svc("b", "go", "go", &[80])],
            want: &[
                "go.a.svc.cluster.local [80]: dev",
                "go.b.svc.cluster.local [80]: dev.x",
            ],
        },
        Case {
            name: "invalid env label values are skipped",
            namespaces: vec![ns("demo", true)],
            pods: vec![
                pod("demo", "go", "dev", true),
                pod("demo", "go", "dev..x", true),
                pod("demo", "go", "dev/x", true),
                pod("demo", "go", &"a".repeat(129), true),
            ],
            services: vec![svc("demo", "go", "go", &[80])],
            want: &["go.demo.svc.cluster.local [80]: dev"],
        },
    ];
    for case in cases {
        let r = render(
            &case.namespaces,
            &case.pods,
            &case.services,
            &RenderOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(pairs(&r), case.want, "{}", case.name);
        // Every table passes the filter's own check (render also does this).
        RoutingTable::compile(&r.table, &Node::default()).unwrap();
    }
}

/// Objects are serialized from typed parts with the hash spliced in; the
/// JSON must be what the same object as a `Value` gives (sorted keys), and
/// the hash that of the object without its annotation, as before.
#[test]
fn object_json_is_canonical_and_hashed_without_the_annotation() {
    for mode in [Mode::Cluster, Mode::Host] {
        let opts = opts_with(PluginConfig {
            mode,
            default_env: Some("dev".into()),
            ..PluginConfig::default()
        });
        let r = render(
            &[ns("demo", true)],
            &alibaba_pods("demo"),
            &alibaba_services("demo"),
            &opts,
        )
        .unwrap();
        assert!(r.objects.len() > 3);
        for o in &r.objects {
            let mut body = o.body();
            let canonical = serde_json::to_string(&body).unwrap_or_default();
            if o.key.kind != Kind::WasmPlugin {
                assert_eq!(o.json_for_tests(), canonical, "{}", o.key);
            }
            let annotations = body
                .pointer_mut("/metadata")
                .and_then(Value::as_object_mut)
                .and_then(|m| m.remove("annotations"));
            let want = if o.key.kind == Kind::WasmPlugin {
                // Issue 15: the table's status, for operators.
                json!({
                    HASH_ANNOTATION: o.hash.clone(),
                    TABLE_REVISION_ANNOTATION: r.table.revision.clone(),
                    TABLE_PAIRS_ANNOTATION: r.stats.pairs.to_string(),
                    TABLE_SERVICES_ANNOTATION: r.stats.services.to_string(),
                    TABLE_ENVS_ANNOTATION: r.stats.envs.to_string(),
                })
            } else {
                json!({ HASH_ANNOTATION: o.hash.clone() })
            };
            assert_eq!(annotations, Some(want), "{}", o.key);
            if o.key.kind != Kind::WasmPlugin {
                let plain = serde_json::to_vec(&body).unwrap_or_default();
                assert_eq!(o.hash, format!("{:016x}", fnv1a64(&plain)), "{}", o.key);
            }
        }
    }
}

#[test]
fn invalid_labels_are_reported_with_the_splitter_in_force() {
    let pods = vec![
        pod("demo", "go", "dev", true),
        pod("demo", "go", "dev.proj1", true),
        pod("demo", "go", "dev-proj1", false),
    ];
    let services = vec![svc("demo", "go", "go", &[80])];
    let dash = PluginConfig {
        splitter: "-".into(),
        ..PluginConfig::default()
    };
    let r = render(&[ns("demo", true)], &pods, &services, &opts_with(dash)).unwrap();
    assert_eq!(pairs(&r), ["go.demo.svc.cluster.local [80]: dev"]);
    assert_eq!(r.invalid_labels.len(), 1);
    assert_eq!(r.invalid_labels[0].value, "dev.proj1");
    assert_eq!(r.invalid_labels[0].pod, "go-dev.proj1-1");
    // The un-Ready `dev-proj1` is valid with `-`, just not Ready.
    let dot = render(
        &[ns("demo", true)],
        &pods,
        &services,
        &RenderOptions::default(),
    )
    .unwrap();
    assert!(dot.invalid_labels.is_empty());
    assert_eq!(
        pairs(&dot),
        ["go.demo.svc.cluster.local [80]: dev,dev.proj1"]
    );
}

#[test]
fn subsets_are_explicit_valid_and_collision_free() {
    let envs = ["dev.proj1", "dev_proj1", "dev-proj1", "Dev.Proj1"];
    let pods: Vec<Pod> = envs.iter().map(|e| pod("demo", "go", e, true)).collect();
    let r = render(
        &[ns("demo", true)],
        &pods,
        &[svc("demo", "go", "go", &[80])],
        &RenderOptions::default(),
    )
    .unwrap();
    let subsets: Vec<&str> = r
        .table
        .envs
        .iter()
        .map(|e| e.subset.as_deref().unwrap())
        .collect();
    assert_eq!(subsets.len(), 4);
    let unique: BTreeSet<&str> = subsets.iter().copied().collect();
    assert_eq!(unique.len(), 4, "{subsets:?}");
    for s in &subsets {
        SubsetName::try_new(s).unwrap();
    }
    let dash = r.table.envs.iter().find(|e| e.name == "dev-proj1").unwrap();
    assert_eq!(
        dash.subset.as_deref(),
        Some("dev-proj1"),
        "a DNS label keeps its name"
    );
}

/// Subset names depend on the env alone: what another namespace deploys
/// never renames one (issue 11: a pod in team-b labelled with team-a's
/// derived subset name used to rename team-a's subset). Envs of one Service
/// that share a name are left out of that Service only, and reported.
#[test]
fn subset_names_are_tenant_stable_and_collisions_stay_in_their_service() {
    let dotted = EnvName::try_new("dev.proj1", Splitter::default()).unwrap();
    let derived = SubsetName::for_env(&dotted).as_str().to_string();
    struct Case<'a> {
        what: &'a str,
        pods: Vec<Pod>,
        /// "namespace/service" -> envs routed for it, sorted.
        routed: Vec<(&'a str, Vec<&'a str>)>,
        collisions: usize,
    }
    let cases = [
        Case {
            what: "another namespace spells team-a's derived subset name",
            pods: vec![
                pod("team-a", "go", "dev.proj1", true),
                pod("team-b", "go", &derived, true),
            ],
            routed: vec![
                ("team-a/go", vec!["dev.proj1"]),
                ("team-b/go", vec![derived.as_str()]),
            ],
            collisions: 0,
        },
        Case {
            what: "one service has both: both left out of it, the other service untouched",
            pods: vec![
                pod("team-a", "go", "dev.proj1", true),
                pod("team-a", "go", &derived, true),
                pod("team-a", "go", "dev", true),
                pod("team-b", "go", "dev.proj1", true),
            ],
            routed: vec![("team-a/go", vec!["dev"]), ("team-b/go", vec!["dev.proj1"])],
            collisions: 1,
        },
    ];
    let alone = render(
        &[ns("team-a", true)],
        &[pod("team-a", "go", "dev.proj1", true)],
        &[svc("team-a", "go", "go", &[80])],
        &RenderOptions::default(),
    )
    .unwrap();
    let subset_alone = alone.table.envs[0].subset.clone().unwrap();
    assert_eq!(subset_alone, derived);
    for case in cases {
        let r = render(
            &[ns("team-a", true), ns("team-b", true)],
            &case.pods,
            &[
                svc("team-a", "go", "go", &[80]),
                svc("team-b", "go", "go", &[80]),
            ],
            &RenderOptions::default(),
        )
        .unwrap();
        let env_name = |id: u32| r.table.envs[id as usize].name.as_str();
        for (key, want) in &case.routed {
            let (namespace, name) = key.split_once('/').unwrap();
            let host = format!("{name}.{namespace}.svc.cluster.local");
            let service = r.table.services.iter().find(|s| s.host == host);
            let mut got: Vec<&str> = service
                .map(|s| s.envs.iter().map(|&id| env_name(id)).collect())
                .unwrap_or_default();
            got.sort_unstable();
            assert_eq!(&got, want, "{}: {key}", case.what);
        }
        // dev.proj1's subset is the one it has alone, in every case.
        if let Some(e) = r.table.envs.iter().find(|e| e.name == "dev.proj1") {
            assert_eq!(
                e.subset.as_deref(),
                Some(subset_alone.as_str()),
                "{}",
                case.what
            );
        }
        assert_eq!(r.subset_collisions.len(), case.collisions, "{}", case.what);
        if case.collisions > 0 {
            let c = &r.subset_collisions[0];
            assert_eq!((c.namespace.as_str(), c.service.as_str()), ("team-a", "go"));
            assert_eq!(c.envs, vec![derived.clone(), "dev.proj1".to_string()]);
            assert!(
                r.warnings.iter().any(|w| w.message.contains("team-a/go")
                    && w.message.contains("`dev.proj1`")
                    && w.message.contains(&format!("`{derived}`"))),
                "{:?}",
                r.warnings
            );
        }
        // Every DestinationRule's subsets are distinct.
        for o in r
            .objects
            .iter()
            .filter(|o| o.key.kind == Kind::DestinationRule)
        {
            let body = o.body();
            let names: Vec<&str> = body["spec"]["subsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap())
                .collect();
            let unique: BTreeSet<&str> = names.iter().copied().collect();
            assert_eq!(unique.len(), names.len(), "{}: {names:?}", case.what);
        }
    }
}

/// Host mode (issue 11): per-env Service names that clash with each other
/// or with a Service envlane-sync does not own used to be rendered silently
/// (the second apply then failed, or the table sent `api`'s v2 traffic to
/// the user's `api-v2` app). Now both sides are named and left out.
#[test]
fn host_mode_name_clashes_are_left_out_before_anything_is_written() {
    struct Case<'a> {
        what: &'a str,
        services: Vec<Service>,
        pods: Vec<Pod>,
        /// The per-env Services rendered.
        kept: &'a [&'a str],
        /// Substrings of one warning.
        warned: &'a [&'a str],
    }
    let owned = Service {
        labels: labels(&[(MANAGED_BY_KEY, MANAGED_BY_VALUE)]),
        ..svc("demo", "api-v2", "api", &[80])
    };
    let cases = [
        Case {
            what: "go + dev-x and go-dev + x both give go-dev-x",
            services: vec![
                svc("demo", "go", "go", &[80]),
                svc("demo", "go-dev", "godev", &[80]),
            ],
            pods: vec![
                pod("demo", "go", "dev-x", true),
                pod("demo", "go", "y", true),
                pod("demo", "godev", "x", true),
            ],
            kept: &["go-y"],
            warned: &["`go-dev-x`", "demo/go env `dev-x`", "demo/go-dev env `x`"],
        },
        Case {
            what: "api + v2 gives the user's own Service api-v2",
            services: vec![
                svc("demo", "api", "api", &[80]),
                svc("demo", "api-v2", "apiv2", &[80]),
            ],
            pods: vec![
                pod("demo", "api", "v2", true),
                pod("demo", "api", "v1", true),
            ],
            kept: &["api-v1"],
            warned: &["demo/api env `v2`", "`api-v2`", "does not own"],
        },
        Case {
            what: "a per-env Service envlane-sync owns is its own, no clash",
            services: vec![svc("demo", "api", "api", &[80]), owned],
            pods: vec![pod("demo", "api", "v2", true)],
            kept: &["api-v2"],
            warned: &[],
        },
    ];
    for case in cases {
        let settings = PluginConfig {
            mode: Mode::Host,
            ..PluginConfig::default()
        };
        let r = render(
            &[ns("demo", true)],
            &case.pods,
            &case.services,
            &opts_with(settings),
        )
        .unwrap();
        let mut kept: Vec<&str> = r
            .objects
            .iter()
            .filter(|o| o.key.kind == Kind::Service)
            .map(|o| o.key.name.as_str())
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, case.kept, "{}", case.what);
        if !case.warned.is_empty() {
            assert!(
                r.warnings
                    .iter()
                    .any(|w| case.warned.iter().all(|part| w.message.contains(part))),
                "{}: {:?}",
                case.what,
                r.warnings
            );
        }
        // The table routes only to what is rendered.
        let targets: usize = r.table.services.iter().map(|s| s.envs.len()).sum();
        assert_eq!(targets, case.kept.len(), "{}", case.what);
    }
}

/// Issue 11: a Terminating namespace was still written to; the API server
/// refuses new objects there, and the error aborted the whole pass, so no
/// other namespace was updated either. It is now treated as opted out.
#[test]
fn a_terminating_namespace_is_not_written_to_and_its_services_leave_the_table() {
    let going = Namespace {
        terminating: true,
        ..ns("going", true)
    };
    let r = render(
        &[ns("demo", true), going],
        &[alibaba_pods("demo"), alibaba_pods("going")].concat(),
        &[alibaba_services("demo"), alibaba_services("going")].concat(),
        &RenderOptions::default(),
    )
    .unwrap();
    assert!(
        r.objects.iter().all(|o| o.key.namespace != "going"),
        "{:?}",
        r.objects.iter().map(|o| &o.key).collect::<Vec<_>>()
    );
    assert!(r.table.services.iter().all(|s| !s.host.contains(".going.")));
    assert!(r.table.services.iter().any(|s| s.host.contains(".demo.")));
}

#[test]
fn a_headless_service_is_left_out_with_a_warning() {
    let headless = Service {
        headless: true,
        ..svc("demo", "ledger", "ledger", &[8080])
    };
    for mode in [Mode::Cluster, Mode::Host] {
        let settings = PluginConfig {
            mode,
            ..PluginConfig::default()
        };
        let r = render(
            &[ns("demo", true)],
            &[pod("demo", "ledger", "dev", true)],
            std::slice::from_ref(&headless),
            &opts_with(settings),
        )
        .unwrap();
        assert!(r.table.services.is_empty(), "{mode:?}");
        assert!(
            r.objects.iter().all(|o| o.key.kind == Kind::WasmPlugin),
            "{mode:?}: {:?}",
            r.objects.iter().map(|o| &o.key).collect::<Vec<_>>()
        );
        assert!(
            r.warnings
                .iter()
                .any(|w| w.message.contains("demo/ledger") && w.message.contains("headless")),
            "{:?}",
            r.warnings
        );
    }
}

#[test]
fn cluster_mode_objects() {
    let r = render(
        &[ns("demo", true), ns("empty", true), ns("off", false)],
        &alibaba_pods("demo"),
        &alibaba_services("demo"),
        &RenderOptions::default(),
    )
    .unwrap();
    let keys: Vec<String> = r.objects.iter().map(|o| o.key.to_string()).collect();
    assert_eq!(
        keys,
        [
            "WasmPlugin/demo/envlane",
            "DestinationRule/demo/envlane-go",
            "DestinationRule/demo/envlane-java",
            "DestinationRule/demo/envlane-node",
            "WasmPlugin/empty/envlane",
            "EnvoyFilter/istio-system/envlane-routes.demo.go",
            "EnvoyFilter/istio-system/envlane-routes.demo.java",
            "EnvoyFilter/istio-system/envlane-routes.demo.node",
        ]
    );
    let wp = &r.objects[0].body();
    assert_eq!(wp["spec"]["phase"], "AUTHN");
    assert_eq!(wp["spec"]["match"][0]["mode"], "CLIENT");
    assert_eq!(wp["spec"]["failStrategy"], "FAIL_OPEN");
    assert_eq!(wp["metadata"]["labels"][MANAGED_BY_KEY], MANAGED_BY_VALUE);
    let table: PluginConfig = serde_json::from_value(wp["spec"]["pluginConfig"].clone()).unwrap();
    assert_eq!(table, r.table);
    assert!(table.envs.iter().all(|e| e.subset.is_some()));
    assert_eq!(
        r.objects[4].body()["spec"]["pluginConfig"],
        wp["spec"]["pluginConfig"]
    );
    let rev = table.revision.as_deref().unwrap();
    assert_eq!(rev.len(), 12);

    let dr = &r.objects[2].body();
    assert_eq!(dr["spec"]["host"], "java.demo.svc.cluster.local");
    let subsets = dr["spec"]["subsets"].as_array().unwrap();
    assert_eq!(subsets.len(), 3);
    for (s, env) in subsets
        .iter()
        .zip(["dev", "dev.proj1", "dev.proj1.feature1"])
    {
        assert_eq!(s["labels"]["virtual-env"], env);
        let want = table
            .envs
            .iter()
            .find(|e| e.name == env)
            .unwrap()
            .subset
            .clone();
        assert_eq!(s["name"].as_str(), want.as_deref());
    }
    for o in &r.objects {
        assert_eq!(
            o.body()["metadata"]["annotations"][HASH_ANNOTATION],
            o.hash.as_str()
        );
    }
}

#[test]
fn host_mode_writes_per_env_services() {
    let settings = PluginConfig {
        mode: Mode::Host,
        ..PluginConfig::default()
    };
    let mut services = alibaba_services("demo");
    services[1].ports.push(port(9090));
    let long = "s".repeat(50);
    services.push(svc("demo", &long, "go", &[80]));
    let r = render(
        &[ns("demo", true)],
        &alibaba_pods("demo"),
        &services,
        &opts_with(settings),
    )
    .unwrap();
    assert!(r
        .objects
        .iter()
        .all(|o| o.key.kind != Kind::DestinationRule));
    let svcs: Vec<&DesiredObject> = r
        .objects
        .iter()
        .filter(|o| o.key.kind == Kind::Service)
        .collect();
    assert_eq!(
        svcs.len(),
        7 + 1,
        "one per (service, env) pair, plus `dev` of the long name"
    );
    let go_proj2 = svcs
        .iter()
        .find(|o| o.body()["spec"]["selector"]["virtual-env"] == "dev.proj2")
        .unwrap();
    let subset = r
        .table
        .envs
        .iter()
        .find(|e| e.name == "dev.proj2")
        .and_then(|e| e.subset.clone())
        .unwrap();
    assert_eq!(go_proj2.key.name, format!("go-{subset}"));
    assert_eq!(go_proj2.body()["spec"]["selector"]["app"], "go");
    let body = go_proj2.body();
    let ports = body["spec"]["ports"].as_array().unwrap();
    assert_eq!(ports.len(), 2);
    assert_eq!(ports[0]["port"], 8080);
    assert_eq!(ports[1]["port"], 9090);
    assert_eq!(
        go_proj2.body()["metadata"]["labels"][MANAGED_BY_KEY],
        MANAGED_BY_VALUE
    );
    // The long service: `dev` fits (50 + 4 chars), the hashed subsets do not.
    assert!(!r.warnings.is_empty());
    let long_host = format!("{long}.demo.svc.cluster.local");
    let entry = r
        .table
        .services
        .iter()
        .find(|s| s.host == long_host)
        .unwrap();
    assert_eq!(entry.envs.len(), 1);
    RoutingTable::compile(&r.table, &Node::default()).unwrap();
}

#[test]
fn output_does_not_depend_on_input_order() {
    let namespaces = vec![ns("demo", true), ns("b", true)];
    let mut pods = alibaba_pods("demo");
    pods.extend(alibaba_pods("b"));
    let mut services = alibaba_services("demo");
    services.extend(alibaba_services("b"));
    let a = render(&namespaces, &pods, &services, &RenderOptions::default()).unwrap();
    let mut ns_rev = namespaces.clone();
    ns_rev.reverse();
    pods.reverse();
    services.reverse();
    let b = render(&ns_rev, &pods, &services, &RenderOptions::default()).unwrap();
    assert_eq!(a.objects, b.objects);
    assert_eq!(
        crate::output::to_yaml(&a.objects).unwrap(),
        crate::output::to_yaml(&b.objects).unwrap()
    );
}

#[test]
fn env_removal_changes_only_what_it_must() {
    let pods = alibaba_pods("demo");
    let before = render(
        &[ns("demo", true)],
        &pods,
        &alibaba_services("demo"),
        &RenderOptions::default(),
    )
    .unwrap();
    // The last Ready pod of node@dev.proj1 goes away.
    let after_pods: Vec<Pod> = pods
        .into_iter()
        .filter(|p| !(p.labels["app"] == "node" && p.labels["virtual-env"] == "dev.proj1"))
        .collect();
    let after = render(
        &[ns("demo", true)],
        &after_pods,
        &alibaba_services("demo"),
        &RenderOptions::default(),
    )
    .unwrap();
    assert_eq!(
        pairs(&after),
        [
            "go.demo.svc.cluster.local [8080]: dev,dev.proj2",
            "java.demo.svc.cluster.local [8080]: dev,dev.proj1,dev.proj1.feature1",
            "node.demo.svc.cluster.local [8080]: dev",
        ]
    );
    let changed: Vec<String> = before
        .objects
        .iter()
        .zip(&after.objects)
        .filter(|(a, b)| a.hash != b.hash)
        .map(|(a, _)| a.key.to_string())
        .collect();
    assert_eq!(
        changed,
        [
            "WasmPlugin/demo/envlane",
            "DestinationRule/demo/envlane-node",
            "EnvoyFilter/istio-system/envlane-routes.demo.node"
        ]
    );
    assert_ne!(before.table.revision, after.table.revision);
}

/// A host template whose hosts are not Services envlane-sync can create is
/// refused before anything is rendered, naming what it renders.
#[test]
fn a_host_template_envlane_sync_cannot_follow_is_refused() {
    for template in [
        "{name}_{subset}.{namespace}.svc.{clusterDomain}",
        "{subset}.{name}.{namespace}.svc.{clusterDomain}",
        "{name}-{subset}.other.svc.{clusterDomain}",
        "{name}-{subset}.example.com",
    ] {
        let settings = PluginConfig {
            mode: Mode::Host,
            host_template: template.into(),
            ..PluginConfig::default()
        };
        let err = render(
            &[ns("demo", true)],
            &alibaba_pods("demo"),
            &alibaba_services("demo"),
            &opts_with(settings),
        )
        .unwrap_err();
        assert!(matches!(err, RenderError::Settings(_)), "{template}: {err}");
        assert!(err.to_string().contains("hostTemplate"), "{err}");
    }
}

/// A custom host template is followed end to end: the per-env Services are
/// named as the filter's targets.
#[test]
fn a_custom_host_template_names_the_per_env_services() {
    let settings = PluginConfig {
        mode: Mode::Host,
        host_template: "{subset}-{name}.{namespace}.svc.{clusterDomain}".into(),
        ..PluginConfig::default()
    };
    let r = render(
        &[ns("demo", true)],
        &alibaba_pods("demo"),
        &alibaba_services("demo"),
        &opts_with(settings.clone()),
    )
    .unwrap();
    let table = RoutingTable::compile(&r.table, &Node::default()).unwrap();
    let services: BTreeSet<String> = r
        .objects
        .iter()
        .filter(|o| o.key.kind == Kind::Service)
        .map(|o| format!("{}.{}.svc.cluster.local", o.key.name, o.key.namespace))
        .collect();
    // Every host the filter can route to is a rendered Service, and back.
    let mut targets = BTreeSet::new();
    for entry in &r.table.services {
        for &env in &entry.envs {
            let subset = r.table.envs[env as usize].subset.clone().unwrap();
            let (name, rest) = entry.host.split_once('.').unwrap();
            let namespace = rest.split('.').next().unwrap();
            targets.insert(format!("{subset}-{name}.{namespace}.svc.cluster.local"));
        }
    }
    assert_eq!(services, targets);
    assert!(
        services.contains("dev-java.demo.svc.cluster.local"),
        "{services:?}"
    );
    assert_eq!(table.pair_count(), targets.len());
}

#[test]
fn sha256_and_plugin_name_flags() {
    let opts = RenderOptions {
        wasm_plugin_name: "routing".into(),
        wasm_sha256: Some("ab".repeat(32)),
        wasm_url: "oci://example/x:1".into(),
        ..RenderOptions::default()
    };
    let r = render(&[ns("demo", true)], &[], &[], &opts).unwrap();
    assert_eq!(r.objects.len(), 1);
    assert_eq!(r.objects[0].key.name, "routing");
    assert_eq!(r.objects[0].body()["spec"]["sha256"], "ab".repeat(32));
    assert_eq!(r.objects[0].body()["spec"]["url"], "oci://example/x:1");
    assert!(r.table.services.is_empty());
}

/// The route EnvoyFilter of each Service follows the table and the
/// VirtualServices for its host: the whole virtual host without one, only
/// the named rules that go to the Service itself with a mixed one.
#[test]
fn route_patches_follow_the_table_and_virtual_services() {
    let namespaces = [ns("demo", true)];
    let pods = alibaba_pods("demo");
    let services = alibaba_services("demo");
    let spec = serde_json::json!({
        "hosts": ["go"],
        "http": [
            {"name": "api", "match": [{"uri": {"prefix": "/api"}}], "timeout": "2s",
             "route": [{"destination": {"host": "go"}}]},
            {"name": "canary", "route": [{"destination": {"host": "go", "subset": "v2"}, "weight": 10},
                                          {"destination": {"host": "go"}, "weight": 90}]},
            {"route": [{"destination": {"host": "go.demo.svc.cluster.local"}}]},
        ],
    });
    let vs = VirtualService::from_spec("demo", "go", &spec);
    let r = super::render(
        &namespaces,
        &pods,
        &services,
        [&vs],
        &RenderOptions::default(),
    )
    .unwrap();
    let filter = |svc: &str| {
        r.objects
            .iter()
            .find(|o| o.key.kind == Kind::EnvoyFilter && o.key.name.ends_with(svc))
            .map(|o| o.body()["spec"]["configPatches"].clone())
            .unwrap()
    };
    let go = filter(".go");
    let scopes: Vec<&Value> = go
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["match"]["routeConfiguration"]["vhost"]["route"])
        .collect();
    assert_eq!(
        scopes,
        [&serde_json::json!({"action": "ROUTE", "name": "api"})]
    );
    assert!(
        r.warnings
            .iter()
            .any(|w| w.message.contains("VirtualService demo/go http[2]")
                && w.message.contains("no `name`")),
        "{:?}",
        r.warnings
    );
    // A Service without VirtualService: its whole virtual host.
    let java = filter(".java");
    assert_eq!(
        java[0]["match"]["routeConfiguration"]["vhost"],
        serde_json::json!({"name": "java.demo.svc.cluster.local:8080", "route": {"action": "ROUTE"}})
    );
    let map = &java[0]["patch"]["value"]["route"]["inline_cluster_specifier_plugin"]["extension"]
        ["typed_config"]["cluster_matcher"]["matcher_tree"]["exact_match_map"]["map"];
    let targets: Vec<&String> = map.as_object().unwrap().keys().collect();
    assert_eq!(targets.len(), 3, "java has three envs: {targets:?}");
    // Host mode has no route patch.
    let mut host = RenderOptions::default();
    host.settings.mode = Mode::Host;
    let r = render(&namespaces, &pods, &services, &host).unwrap();
    assert!(r.objects.iter().all(|o| o.key.kind != Kind::EnvoyFilter));
}

/// Every name the filter, the companion and the manifests share comes from
/// the one settings value: change each and every rendered object follows.
#[test]
fn every_rendered_object_follows_each_shared_setting() {
    type Change = fn(&mut PluginConfig);
    let cases: &[(&str, Change)] = &[
        ("defaults", |_| {}),
        ("envLabel", |s| s.env_label = "lane".into()),
        ("clusterDomain", |s| {
            s.cluster_domain = "corp.example".into()
        }),
        ("envHeader", |s| s.env_header = "x-lane".into()),
        ("debugHeader and debug", |s| {
            s.debug_header = "x-why".into();
            s.debug = true;
        }),
        ("baggageKey", |s| s.baggage_key = Some("lane".into())),
        ("defaultEnv", |s| s.default_env = Some("dev".into())),
        ("splitter", |s| s.splitter = "/".into()),
    ];
    for (what, change) in cases {
        let mut settings = PluginConfig::default();
        change(&mut settings);
        let label = settings.env_label.clone();
        let sep = settings.splitter.clone();
        let pods: Vec<Pod> = alibaba_pods("demo")
            .into_iter()
            .map(|mut p| {
                let env = p.labels.remove("virtual-env").unwrap().replace('.', &sep);
                p.labels.insert(label.clone(), env);
                p
            })
            .collect();
        let r = render(
            &[ns("demo", true)],
            &pods,
            &alibaba_services("demo"),
            &opts_with(settings.clone()),
        )
        .unwrap();
        let domain = &settings.cluster_domain;
        // The WasmPlugin carries the settings as the filter parses them.
        let wasm = r
            .objects
            .iter()
            .find(|o| o.key.kind == Kind::WasmPlugin)
            .unwrap();
        let published: PluginConfig =
            serde_json::from_value(wasm.body()["spec"]["pluginConfig"].clone()).unwrap();
        let mut expected = settings.clone();
        expected.envs = published.envs.clone();
        expected.services = published.services.clone();
        expected.revision = published.revision.clone();
        assert_eq!(published, expected, "{what}");
        assert_eq!(published.services.len(), 3, "{what}");
        let subsets: BTreeMap<&str, &str> = published
            .envs
            .iter()
            .map(|e| (e.name.as_str(), e.subset.as_deref().unwrap()))
            .collect();
        for entry in &published.services {
            assert!(
                entry.host.ends_with(&format!(".svc.{domain}")),
                "{what}: {}",
                entry.host
            );
            let envs: Vec<&str> = entry
                .envs
                .iter()
                .map(|&i| published.envs[i as usize].name.as_str())
                .collect();
            // DestinationRule: the host, one subset per env selecting the env label.
            let name = entry.host.split('.').next().unwrap();
            let dr = r
                .objects
                .iter()
                .find(|o| {
                    o.key.kind == Kind::DestinationRule && o.key.name == format!("envlane-{name}")
                })
                .unwrap();
            assert_eq!(dr.body()["spec"]["host"], entry.host.as_str(), "{what}");
            let got: BTreeMap<String, Value> = dr.body()["spec"]["subsets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap().to_string(),
                        s["labels"][&label].clone(),
                    )
                })
                .collect();
            let want: BTreeMap<String, Value> = envs
                .iter()
                .map(|e| (subsets[e].to_string(), Value::from(*e)))
                .collect();
            assert_eq!(got, want, "{what}: {}", entry.host);
            // EnvoyFilter: the virtual host istiod names, the filter-state key
            // the filter writes, the clusters the filter can choose.
            let ef = r
                .objects
                .iter()
                .find(|o| {
                    o.key.kind == Kind::EnvoyFilter && o.key.name.ends_with(&format!(".{name}"))
                })
                .unwrap();
            let patch = &ef.body()["spec"]["configPatches"][0];
            assert_eq!(
                patch["match"]["routeConfiguration"]["vhost"]["name"],
                format!("{}:8080", entry.host),
                "{what}"
            );
            let m = &patch["patch"]["value"]["route"]["inline_cluster_specifier_plugin"]
                ["extension"]["typed_config"]["cluster_matcher"];
            assert_eq!(
                m["matcher_tree"]["input"]["typed_config"]["key"],
                envlane::config::ROUTE_STATE_KEY
            );
            let keys: BTreeSet<String> = m["matcher_tree"]["exact_match_map"]["map"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            let want: BTreeSet<String> = envs
                .iter()
                .map(|e| envlane::table::istio_cluster(8080, subsets[e], &entry.host))
                .collect();
            assert_eq!(keys, want, "{what}: {}", entry.host);
        }
    }
}

/// Issue 15: pods that were not Ready vanished from the table without a
/// trace; now render lists them (logged at debug, counted by a gauge).
#[test]
fn not_ready_pods_are_listed() {
    let opts = opts_with(PluginConfig::default());
    let pods = vec![
        pod("demo", "go", "dev", true),
        pod("demo", "go", "dev.proj1", false),
        pod("other", "go", "dev.proj2", false), // not opted in: not listed
    ];
    let r = render(
        &[ns("demo", true), ns("other", false)],
        &pods,
        &[svc("demo", "go", "go", &[8080])],
        &opts,
    )
    .unwrap();
    assert_eq!(r.not_ready, vec![format!("demo/{}", pods[1].name)]);
    assert_eq!(pairs(&r), vec!["go.demo.svc.cluster.local [8080]: dev"]);
}

/// Issue 15: with no default env (or none deployed for a Service), requests
/// without an env reach every env's pods, silently. Now each such Service is
/// listed and warned about (an Event on it).
#[test]
fn services_where_requests_without_an_env_spread_are_reported() {
    let pods = vec![
        pod("demo", "go", "dev", true),
        pod("demo", "go", "dev.proj1", true),
        pod("demo", "java", "dev.proj1", true),
    ];
    let services = [
        svc("demo", "go", "go", &[8080]),
        svc("demo", "java", "java", &[8080]),
    ];
    let cases: Vec<(Option<&str>, Vec<&str>)> = vec![
        (None, vec!["demo/go", "demo/java"]),
        (Some("dev"), vec!["demo/java"]),
        (Some("dev.proj1"), vec![]),
    ];
    for (default_env, want) in cases {
        let opts = opts_with(PluginConfig {
            default_env: default_env.map(String::from),
            ..PluginConfig::default()
        });
        let r = render(&[ns("demo", true)], &pods, &services, &opts).unwrap();
        assert_eq!(r.spreading, want, "{default_env:?}");
        let warned: Vec<&Warning> = r
            .warnings
            .iter()
            .filter(|w| w.reason == Reason::NoDefaultEnv)
            .collect();
        assert_eq!(warned.len(), want.len(), "{default_env:?}");
        for w in warned {
            assert_eq!(w.regarding.kind, "Service");
            assert!(w
                .message
                .contains("requests without an env reach every env's pods"));
        }
    }
}

#[test]
fn shared_proxies_get_their_own_plugin_with_the_caller_table() {
    use crate::shared::{SharedProxy, GATEWAY_PLUGIN_NAME, WAYPOINT_PLUGIN_NAME};
    let namespaces = [ns("demo", true), ns("mesh-gw", false), ns("off", false)];
    let mut pods = alibaba_pods("demo");
    for (i, p) in pods.iter_mut().enumerate() {
        p.ips = vec![format!("10.244.0.{}", 10 + i)];
    }
    // A labelled client with no service of its env, and a pod of a
    // namespace that did not opt in (not a caller envlane knows).
    let mut client = pod("demo", "client", "dev.proj1.user9", true);
    client.ips = vec!["10.244.0.99".into()];
    let mut outsider = pod("off", "node", "dev.proj2", true);
    outsider.ips = vec!["10.244.1.1".into()];
    pods.extend([client, outsider]);
    let mut opts = opts_with(PluginConfig {
        default_env: Some("dev".into()),
        ..PluginConfig::default()
    });
    opts.shared_proxies = vec![
        SharedProxy::parse_gateway("mesh-gw:app=envlane-gateway").unwrap(),
        SharedProxy::parse_waypoint("demo/waypoint").unwrap(),
    ];
    let r = render(&namespaces, &pods, &alibaba_services("demo"), &opts).unwrap();
    let plugin = |ns: &str, name: &str| {
        r.objects
            .iter()
            .find(|o| o.key.kind == Kind::WasmPlugin && o.key.namespace == ns && o.key.name == name)
            .map(|o| o.body())
            .unwrap_or_else(|| panic!("no WasmPlugin {ns}/{name}"))
    };
    // The sidecars' table is unchanged: no callers, no proxy.
    let sidecars = plugin("demo", "envlane");
    assert!(sidecars["spec"]["pluginConfig"].get("callers").is_none());
    assert_eq!(sidecars["spec"]["match"], json!([{"mode": "CLIENT"}]));

    let gw = plugin("mesh-gw", GATEWAY_PLUGIN_NAME);
    assert_eq!(
        gw["spec"]["selector"],
        json!({"matchLabels": {"app": "envlane-gateway"}})
    );
    assert!(gw["spec"].get("match").is_none());
    let cfg: PluginConfig = serde_json::from_value(gw["spec"]["pluginConfig"].clone()).unwrap();
    assert_eq!(cfg.proxy, envlane::config::Proxy::Gateway);
    assert_eq!(
        cfg.services, r.table.services,
        "the same routes as the sidecars"
    );
    let env_of = |ip: &str| {
        cfg.callers
            .iter()
            .find(|c| c.ips.iter().any(|i| i == ip))
            .map(|c| cfg.envs[c.env as usize].name.clone())
    };
    assert_eq!(env_of("10.244.0.99").as_deref(), Some("dev.proj1.user9"));
    assert_eq!(env_of("10.244.0.10").as_deref(), Some("dev"));
    assert_eq!(env_of("10.244.1.1"), None, "not opted in");
    let ips: usize = cfg.callers.iter().map(|c| c.ips.len()).sum();
    assert_eq!(ips, 8, "7 alibaba pods and the client");

    let wp = plugin("demo", WAYPOINT_PLUGIN_NAME);
    assert_eq!(
        wp["spec"]["targetRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}])
    );
    let cfg: PluginConfig = serde_json::from_value(wp["spec"]["pluginConfig"].clone()).unwrap();
    assert_eq!(cfg.proxy, envlane::config::Proxy::Waypoint);
    assert!(cfg
        .caller_workloads
        .iter()
        .any(|w| w.namespace == "demo"
            && w.workloads.contains(&"client-dev.proj1.user9".to_string())));

    // Without shared proxies nothing of this is rendered.
    opts.shared_proxies.clear();
    let plain = render(&namespaces, &pods, &alibaba_services("demo"), &opts).unwrap();
    assert!(plain
        .objects
        .iter()
        .all(|o| o.key.name == "envlane" || o.key.kind != Kind::WasmPlugin));
}

/// Gateway mode's routes: a centralized gateway's VirtualServices get the
/// same patch (context GATEWAY) in the Service's EnvoyFilter; waypoints get
/// their own EnvoyFilter per Service with their own cluster names, except
/// where a VirtualService covers the Service (istiod does not patch those
/// routes at a waypoint: a warning instead).
#[test]
fn gateway_and_waypoint_route_patches() {
    use crate::shared::SharedProxy;
    let namespaces = [ns("demo", true), ns("mesh-gw", false)];
    let pods = alibaba_pods("demo");
    let services = alibaba_services("demo");
    let on_gateway = VirtualService::from_spec(
        "mesh-gw",
        "java",
        &serde_json::json!({"hosts": ["java.demo.svc.cluster.local"], "gateways": ["envlane-gateway"],
                            "http": [{"route": [{"destination": {"host": "java.demo.svc.cluster.local"}}]}]}),
    );
    let mesh_go = VirtualService::from_spec(
        "demo",
        "go",
        &serde_json::json!({"hosts": ["go"], "http": [{"route": [{"destination": {"host": "go"}}]}]}),
    );
    let opts = RenderOptions {
        shared_proxies: vec![
            SharedProxy::parse_gateway("mesh-gw:app=envlane-gateway").unwrap(),
            SharedProxy::parse_waypoint("demo/waypoint").unwrap(),
        ],
        ..RenderOptions::default()
    };
    let r = super::render(
        &namespaces,
        &pods,
        &services,
        [&on_gateway, &mesh_go],
        &opts,
    )
    .unwrap();
    let filter = |name: &str| {
        r.objects
            .iter()
            .find(|o| o.key.kind == Kind::EnvoyFilter && o.key.name == name)
            .map(|o| o.body()["spec"].clone())
    };
    let contexts = |spec: &Value| -> Vec<String> {
        spec["configPatches"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                format!(
                    "{} {}",
                    p["match"]["context"].as_str().unwrap(),
                    p["match"]["routeConfiguration"]["vhost"]["name"]
                        .as_str()
                        .unwrap()
                )
            })
            .collect()
    };
    // java is bound to the gateway: sidecars' and the gateway's patch.
    let java = filter("envlane-routes.demo.java").unwrap();
    assert_eq!(
        contexts(&java),
        [
            "SIDECAR_OUTBOUND java.demo.svc.cluster.local:8080",
            "GATEWAY java.demo.svc.cluster.local:8080"
        ]
    );
    // node has no gateway VirtualService: no gateway vhost to patch.
    let node = filter("envlane-routes.demo.node").unwrap();
    assert_eq!(
        contexts(&node),
        ["SIDECAR_OUTBOUND node.demo.svc.cluster.local:8080"]
    );

    // Waypoints: their clusters, their route config, the waypoint class.
    let waypoint = filter("envlane-routes.demo.java.waypoint").unwrap();
    assert_eq!(
        waypoint["targetRefs"],
        serde_json::json!([{"group": "gateway.networking.k8s.io", "kind": "GatewayClass", "name": "istio-waypoint"}])
    );
    let patch = &waypoint["configPatches"][0];
    assert_eq!(patch["match"]["context"], "SIDECAR_INBOUND");
    assert_eq!(
        patch["match"]["routeConfiguration"],
        serde_json::json!({"name": "inbound-vip|8080|http|java.demo.svc.cluster.local",
                           "vhost": {"name": "inbound|http|8080", "route": {"action": "ROUTE"}}})
    );
    let matcher = &patch["patch"]["value"]["route"]["inline_cluster_specifier_plugin"]["extension"]
        ["typed_config"]["cluster_matcher"];
    let targets: Vec<&String> = matcher["matcher_tree"]["exact_match_map"]["map"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(targets.len(), 3);
    assert!(
        targets
            .iter()
            .all(|t| t.starts_with("inbound-vip|8080|http/")),
        "{targets:?}"
    );
    assert_eq!(
        matcher["on_no_match"]["action"]["typed_config"]["cluster"],
        "inbound-vip|8080|http|java.demo.svc.cluster.local"
    );
    // go is covered by a mesh VirtualService: no waypoint patch, a warning.
    assert!(filter("envlane-routes.demo.go.waypoint").is_none());
    assert!(r
        .warnings
        .iter()
        .any(|w| w.reason == Reason::WaypointRoutesNotPatched && w.message.contains("go.demo")));
    // The waypoint filter belongs to its Service's tenant.
    let key = r
        .objects
        .iter()
        .find(|o| o.key.name == "envlane-routes.demo.java.waypoint")
        .unwrap()
        .key
        .clone();
    assert_eq!(key.service(), Some(("demo", "java")));
    assert_eq!(key.tenant(), "demo");

    // Without gateway mode the objects are what they were.
    let plain = super::render(
        &namespaces,
        &pods,
        &services,
        [&on_gateway, &mesh_go],
        &RenderOptions::default(),
    )
    .unwrap();
    let java = plain
        .objects
        .iter()
        .find(|o| o.key.name == "envlane-routes.demo.java")
        .unwrap();
    assert_eq!(contexts(&java.body()["spec"]).len(), 1);
    assert!(plain
        .objects
        .iter()
        .all(|o| !o.key.name.ends_with(".waypoint")));
}

/// `pod` with an address.
fn pod_at(ns: &str, app: &str, env: &str, ip: &str) -> Pod {
    Pod {
        ips: if ip.is_empty() {
            vec![]
        } else {
            vec![ip.into()]
        },
        ..pod(ns, app, env, true)
    }
}

#[test]
fn endpoint_mode_tables_and_clusters() {
    let settings = PluginConfig {
        mode: Mode::Endpoint,
        default_env: Some("dev".into()),
        ..PluginConfig::default()
    };
    // (gateway on, pods (app, env, ip), want pairs, want cluster contexts, warnings)
    type Case<'a> = (
        bool,
        &'a [(&'a str, &'a str, &'a str)],
        &'a [&'a str],
        &'a [&'a str],
        usize,
    );
    let cases: &[Case] = &[
        (
            false,
            &[
                ("go", "dev", "10.0.0.1"),
                ("go", "dev.a", "10.0.0.2"),
                ("go", "dev.a", "10.0.0.3"),
            ],
            &["go.demo.svc.cluster.local [8080]: dev,dev.a"],
            &["SIDECAR_OUTBOUND"],
            0,
        ),
        // A centralized gateway's routes map the same clusters: added there too.
        (
            true,
            &[("go", "dev", "10.0.0.1")],
            &["go.demo.svc.cluster.local [8080]: dev"],
            &["SIDECAR_OUTBOUND", "GATEWAY"],
            0,
        ),
        // An env whose pods have no address yet is no env of the service.
        (
            false,
            &[("go", "dev", "10.0.0.1"), ("go", "dev.a", "")],
            &["go.demo.svc.cluster.local [8080]: dev"],
            &["SIDECAR_OUTBOUND"],
            1,
        ),
        // No pod with an address: no service.
        (false, &[("go", "dev", "")], &[], &[], 1),
    ];
    for (gateway, pods, want_pairs, want_contexts, want_warnings) in cases {
        let mut opts = opts_with(settings.clone());
        if *gateway {
            opts.shared_proxies = vec![SharedProxy::parse_gateway("mesh-gw:app=gw").unwrap()];
        }
        let pods: Vec<Pod> = pods
            .iter()
            .map(|(app, env, ip)| pod_at("demo", app, env, ip))
            .collect();
        let r = render(
            &[ns("demo", true)],
            &pods,
            &[svc("demo", "go", "go", &[8080])],
            &opts,
        )
        .unwrap();
        assert_eq!(pairs(&r), *want_pairs, "{pods:?}");
        assert!(
            r.objects
                .iter()
                .all(|o| o.key.kind != Kind::DestinationRule),
            "no subsets in endpoint mode"
        );
        let got: Vec<Value> = r
            .objects
            .iter()
            .filter(|o| o.key.kind == Kind::EnvoyFilter)
            .flat_map(|o| {
                o.body()["spec"]["configPatches"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        let contexts: Vec<&str> = got
            .iter()
            .filter(|p| p["applyTo"] == "CLUSTER")
            .map(|p| p["match"]["context"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(contexts, *want_contexts, "{pods:?}");
        for route in got.iter().filter(|p| p["applyTo"] == "HTTP_ROUTE") {
            let map = &route["patch"]["value"]["route"]["inline_cluster_specifier_plugin"]
                ["extension"]["typed_config"]["cluster_matcher"]["matcher_tree"]["exact_match_map"]
                ["map"];
            let keys: Vec<&String> = map.as_object().unwrap().keys().collect();
            assert_eq!(
                keys,
                ["outbound|8080|envlane-endpoints|go.demo.svc.cluster.local"]
            );
        }
        let target_port: Vec<&Warning> = r
            .warnings
            .iter()
            .filter(|w| w.reason == Reason::TargetPortUnresolved)
            .collect();
        assert_eq!(target_port.len(), *want_warnings, "{:?}", r.warnings);
        RoutingTable::compile(&r.table, &Node::default()).unwrap();
    }
}
