//! Config parsing and validation: every bad field is named.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
mod common;

use common::{alibaba, compile, config};
use envlane::config::{parse, parse_forward_compatible, Mode, PluginConfig};
use envlane::limits;
use envlane::table::{Node, RoutingTable};

fn check(json: &str) -> Result<RoutingTable, String> {
    let cfg = parse(json.as_bytes()).map_err(|e| e.field)?;
    RoutingTable::compile(&cfg, &Node::default()).map_err(|e| e.field)
}

#[test]
fn bad_fields_are_named() {
    let svc = r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0]}"#;
    let cases: &[(&str, &str)] = &[
        (r#"{"envHeaderz":"x"}"#, "envHeaderz"),
        (r#"{"envHeader":"bad header"}"#, "envHeader"),
        (r#"{"envHeader":7}"#, "envHeader"),
        (r#"{"routeHeader":":authority"}"#, "routeHeader"),
        (r#"{"routeHeader":"X-Virtual-Env"}"#, "routeHeader"),
        (r#"{"debugHeader":""}"#, "debugHeader"),
        (r#"{"splitter":"ab"}"#, "splitter"),
        (r#"{"mode":"subset"}"#, "mode"),
        (r#"{"autoInject":"yes"}"#, "autoInject"),
        (r#"{"baggageKey":"a b"}"#, "baggageKey"),
        (
            r#"{"envAliases":[{"header":"x","cookie":"y"}]}"#,
            "envAliases[0]",
        ),
        (r#"{"envAliases":[{}]}"#, "envAliases[0]"),
        (
            r#"{"envAliases":[{"cookie":"a;b"}]}"#,
            "envAliases[0].cookie",
        ),
        (
            r#"{"envAliases":[{"header":"ok"},{"headr":"x"}]}"#,
            "envAliases[1].headr",
        ),
        (r#"{"defaultEnv":"dev..x"}"#, "defaultEnv"),
        (r#"{"clusterDomain":"Cluster.Local"}"#, "clusterDomain"),
        (r#"{"hostTemplate":"{name}.{ns}"}"#, "hostTemplate"),
        (r#"{"hostTemplate":"{name}-x"}"#, "hostTemplate"),
        (
            r#"{"envs":[{"name":"dev"},{"name":"dev"}]}"#,
            "envs[1].name",
        ),
        (r#"{"envs":[{"name":"a b"}]}"#, "envs[0].name"),
        (
            // Two envs of one service on one subset: its DestinationRule
            // could not tell them apart.
            r#"{"envs":[{"name":"a","subset":"x"},{"name":"b","subset":"x"}],
                "services":[{"host":"go.d.svc.cluster.local","ports":[80],"envs":[0,1]}]}"#,
            "services[0].envs[1]",
        ),
        (
            r#"{"envs":[{"name":"a","subset":"A_1"}]}"#,
            "envs[0].subset",
        ),
        (r#"{"envs":[{"name":"a","color":"red"}]}"#, "envs[0].color"),
        (
            r#"{"envs":[{"name":"a"}],"services":[{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[1]}]}"#,
            "services[0].envs[0]",
        ),
        (
            r#"{"envs":[{"name":"a"}],"services":[{"host":"A","ports":[80],"envs":[0]}]}"#,
            "services[0].host",
        ),
        (
            r#"{"envs":[{"name":"a"}],"services":[{"host":"a","ports":[],"envs":[0]}]}"#,
            "services[0].ports",
        ),
        (
            r#"{"envs":[{"name":"a"}],"services":[{"host":"a","ports":[70000],"envs":[0]}]}"#,
            "services[0].ports[0]",
        ),
        (
            r#"{"envs":[{"name":"a"}],"services":[{"host":"a","ports":[80],"envs":[0,0]}]}"#,
            "services[0].envs",
        ),
        (
            r#"{"envs":[{"name":"a"}],"services":[{"host":"a","ports":[80]}]}"#,
            "services[0]",
        ),
        (
            r#"{"envs":[{"name":"a"}],"mode":"host","services":[{"host":"a.b.c","ports":[80],"envs":[0]}]}"#,
            "services[0].host",
        ),
        (
            &format!(r#"{{"envs":[{{"name":"a"}}],"services":[{svc},{svc}]}}"#),
            "services[1].host",
        ),
        ("[1,2]", "(document)"),
        // serde alone reads an array as the fields in order: `[]` was all defaults.
        ("[]", "(document)"),
        (" [\"x-env\"]", "(document)"),
        ("7", "(document)"),
        ("{", "(document)"),
    ];
    for (json, field) in cases {
        match check(json) {
            Ok(_) => panic!("{json} was accepted"),
            Err(f) => assert_eq!(f, *field, "{json}"),
        }
    }
}

#[test]
fn error_is_one_line_naming_the_field() {
    let err = parse(br#"{"services":[{"host":"a","ports":["80"],"envs":[]}]}"#).unwrap_err();
    let line = err.to_string();
    assert!(
        line.starts_with("invalid envlane config: field `services[0].ports[0]`:"),
        "{line}"
    );
    assert!(!line.contains('\n'));
}

#[test]
fn envs_of_different_services_may_share_a_subset() {
    // Subsets are per service (each Service has its own DestinationRule), so
    // an env of one tenant spelled like another tenant's subset is no clash.
    let table = check(
        r#"{"envs":[{"name":"dev.proj1","subset":"dev-proj1-4120bed06c"},
                    {"name":"dev-proj1-4120bed06c","subset":"dev-proj1-4120bed06c"}],
            "services":[{"host":"go.team-a.svc.cluster.local","ports":[80],"envs":[0]},
                        {"host":"go.team-b.svc.cluster.local","ports":[80],"envs":[1]}]}"#,
    )
    .unwrap();
    let targets: Vec<&str> = table
        .cluster_targets()
        .iter()
        .flat_map(|p| p.targets.clone())
        .collect();
    assert_eq!(
        targets,
        [
            "outbound|80|dev-proj1-4120bed06c|go.team-a.svc.cluster.local",
            "outbound|80|dev-proj1-4120bed06c|go.team-b.svc.cluster.local"
        ]
    );
}

#[test]
fn envs_of_one_service_may_not_share_a_subset() {
    let envs = r#"[{"name":"dev.a","subset":"s"},{"name":"dev.b","subset":"s"},{"name":"dev.c","subset":"t"}]"#;
    let with = |services: &str| check(&format!(r#"{{"envs":{envs},"services":[{services}]}}"#));
    let svc =
        |envs: &str| format!(r#"{{"host":"go.ns.svc.cluster.local","ports":[80],"envs":{envs}}}"#);
    let other =
        |envs: &str| format!(r#"{{"host":"js.ns.svc.cluster.local","ports":[80],"envs":{envs}}}"#);
    // The same subset for two envs of one service: the second is named.
    assert_eq!(
        with(&svc("[0,2,1]")).err().as_deref(),
        Some("services[0].envs[2]")
    );
    assert_eq!(
        with(&format!("{},{}", other("[2]"), svc("[1,0]")))
            .err()
            .as_deref(),
        Some("services[1].envs[1]")
    );
    // The two envs in different services: fine.
    assert!(with(&format!("{},{}", svc("[0,2]"), other("[1,2]"))).is_ok());
    let err = RoutingTable::compile(
        &parse(format!(r#"{{"envs":{envs},"services":[{}]}}"#, svc("[1,0]")).as_bytes()).unwrap(),
        &Node::default(),
    )
    .err()
    .unwrap();
    assert!(
        err.to_string().contains("envs 1 and 0 share subset `s`"),
        "{err}"
    );
}

#[test]
fn empty_and_default_configs_are_valid() {
    for json in ["", "  ", "{}", r#"{"mode":"host","defaultEnv":"dev"}"#] {
        assert!(check(json).is_ok(), "{json:?}");
    }
    let cfg = parse(b"{}").unwrap();
    assert_eq!(cfg, PluginConfig::default());
    assert_eq!(cfg.env_header, "x-virtual-env");
    assert_eq!(cfg.env_label, "virtual-env");
    assert_eq!(cfg.splitter, ".");
    assert!(cfg.auto_inject && cfg.baggage_key.is_none() && cfg.mode == Mode::Cluster);
}

#[test]
fn serialized_config_round_trips() {
    let cfg = alibaba(Mode::Host);
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(parse(json.as_bytes()).unwrap(), cfg);
}

/// 100,000 (service, env) pairs must fit one Kubernetes object (1.5 MiB),
/// and the compiled table must answer for all of them.
#[test]
fn hundred_thousand_pairs_fit_in_one_object() {
    let envs: Vec<String> = (0..100)
        .map(|i| format!("dev.team{}.user{i}", i % 10))
        .collect();
    let env_refs: Vec<&str> = envs.iter().map(String::as_str).collect();
    let hosts: Vec<String> = (0..1000)
        .map(|i| format!("service-{i:04}.team-ns.svc.cluster.local"))
        .collect();
    let services: Vec<(&str, u16, &[&str])> = hosts
        .iter()
        .map(|h| (h.as_str(), 8080, &env_refs[..]))
        .collect();
    let cfg = config(&services, Some("dev.team0.user0"));
    let json = serde_json::to_vec(&cfg).unwrap();
    assert!(json.len() < 1_572_864, "{} bytes", json.len());
    let table = compile(&parse(&json).unwrap(), "team-ns", None);
    assert_eq!(table.pair_count(), 100_000);
    assert_eq!(table.service_count(), 1000);
}

#[test]
fn bad_fields_are_named_in_pretty_printed_json() {
    let cases: &[(&str, &str)] = &[
        (
            "{\n  \"envs\": [\n    {\"name\": \"a\"},\n    {\"name\": \"b\", \"subset\": 7}\n  ]\n}",
            "envs[1].subset",
        ),
        (
            "{\n  \"envs\": [{\"name\": \"a\"}],\n  \"services\": [\n    {\n      \"host\": \"a\",\n      \"ports\": [80]\n    }\n  ]\n}",
            "services[0]",
        ),
        (
            "{\r\n  \"mode\": \"cluster\",\r\n  \"auto\\u0049njectz\": true\r\n}",
            "autoInjectz",
        ),
        ("{\n  \"services\": [\n    1\n  ]\n}", "services[0]"),
        ("[\n  {}\n]", "(document)"),
    ];
    for (json, field) in cases {
        match parse(json.as_bytes()) {
            Ok(_) => panic!("{json} was accepted"),
            Err(e) => assert_eq!(e.field, *field, "{json}: {e}"),
        }
    }
}

/// A newer companion may add fields: the filter ignores and lists them, the
/// strict parse (`envlane-sync render`/`validate`) names the first.
#[test]
fn unknown_fields_are_ignored_by_the_filter_and_refused_by_the_strict_parse() {
    let json = br#"{"defaultEnv":"dev","futureKnob":{"a":[1]},"envs":[{"name":"dev","weight":2}],
        "services":[{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"tls":true}]}"#;
    let lenient = parse_forward_compatible(json).unwrap();
    assert_eq!(
        lenient.unknown_fields,
        ["futureKnob", "envs[0].weight", "services[0].tls"]
    );
    let table = RoutingTable::compile(&lenient.config, &Node::default()).unwrap();
    assert_eq!(table.pair_count(), 1);
    let strict = parse(json).unwrap_err();
    assert_eq!(strict.field, "futureKnob");
    assert!(strict.to_string().contains("unknown field"), "{strict}");
}

/// Every documented limit is checked, and named, before the table is built.
#[test]
fn limits_are_checked_before_allocating() {
    let svc = |ports: &str, envs: &str| {
        format!(
            r#"{{"envs":[{{"name":"dev"}}],"services":[{{"host":"a.ns.svc.cluster.local","ports":[{ports}],"envs":[{envs}]}}]}}"#
        )
    };
    let repeat = |item: &str, n: usize| vec![item; n].join(",");
    // The 72 KB config that overflowed a capacity: port 8080 and env 0, 8,000 times each.
    let cases: Vec<(String, &str, String)> = vec![
        (
            svc(&repeat("8080", 8000), &repeat("0", 8000)),
            "services[0].ports",
            format!("more than {} ports (limit)", limits::MAX_PORTS_PER_SERVICE),
        ),
        (
            format!(
                r#"{{"envAliases":[{}]}}"#,
                repeat(r#"{"header":"x"}"#, limits::MAX_ALIASES + 1)
            ),
            "envAliases",
            format!("more than {} aliases (limit)", limits::MAX_ALIASES),
        ),
        (
            format!(
                r#"{{"envs":[{}]}}"#,
                repeat(r#"{"name":"a"}"#, limits::MAX_ENVS + 1)
            ),
            "envs",
            format!("more than {} envs (limit)", limits::MAX_ENVS),
        ),
        (
            svc("80", &repeat("0", limits::MAX_ENVS + 1)),
            "services[0].envs",
            format!("more than {} envs (limit)", limits::MAX_ENVS),
        ),
    ];
    for (json, field, problem) in &cases {
        let err = parse(json.as_bytes()).unwrap_err();
        assert!(err.field.starts_with(field), "{}: {err}", &json[..80]);
        assert!(err.problem.contains(problem.as_str()), "{err}");
    }
    // Under each list limit but over the pair and target limits.
    let ports: Vec<u16> = (1..=64).collect();
    let mut cfg = common::config(&[("a.ns.svc.cluster.local", 80, &["dev"])], None);
    cfg.services[0].ports = ports;
    cfg.services[0].envs = vec![0; limits::MAX_PAIRS / 4];
    let err = RoutingTable::compile(&cfg, &Node::default()).unwrap_err();
    assert!(err.problem.contains("over the limit of"), "{err}");
    assert!(err.problem.contains("targets"), "{err}");
    cfg.services = (0..5)
        .map(|i| envlane::config::ServiceEntry {
            host: format!("s{i}.ns.svc.cluster.local"),
            ports: vec![80],
            envs: vec![0; limits::MAX_PAIRS / 4],
            target_ports: Vec::new(),
            endpoints: Default::default(),
        })
        .collect();
    let err = RoutingTable::compile(&cfg, &Node::default()).unwrap_err();
    assert!(err.problem.contains("pairs is over the limit"), "{err}");
    // The byte limit: refused before parsing.
    let big = vec![b' '; limits::MAX_CONFIG_BYTES + 1];
    let err = parse(&big).unwrap_err();
    assert!(err.problem.contains("over the limit"), "{err}");
}

#[test]
fn endpoint_mode_fields_are_checked() {
    let one = |svc: &str| {
        format!(
            r#"{{"mode":"endpoint","envs":[{{"name":"dev"}},{{"name":"dev.a"}}],"services":[{svc}]}}"#
        )
    };
    let cases: &[(String, Option<&str>)] = &[
        // Valid: target ports default to the ports; IPv4 and IPv6.
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":[["10.0.0.1"]]}"#), None),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80,81],"targetPorts":[8080,8081],"envs":[1,0],"endpoints":[["fd00::1","10.0.0.2"],["10.0.0.1"]]}"#), None),
        // A port listed twice with one target port is one port.
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80,80],"targetPorts":[9,9],"envs":[0],"endpoints":[["10.0.0.1"]]}"#), None),
        // Refused, naming the field.
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0]}"#), Some("services[0].endpoints")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0,1],"endpoints":[["10.0.0.1"]]}"#), Some("services[0].endpoints")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":[[]]}"#), Some("services[0].endpoints[0]")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":[["10.0.0.1","pod-a"]]}"#), Some("services[0].endpoints[0][1]")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":[["10.0.0.01"]]}"#), Some("services[0].endpoints[0][0]")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":[["FD00::1"]]}"#), Some("services[0].endpoints[0][0]")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":[["10.0.0.1:80"]]}"#), Some("services[0].endpoints[0][0]")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80,81],"targetPorts":[8080],"envs":[0],"endpoints":[["10.0.0.1"]]}"#), Some("services[0].targetPorts")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"targetPorts":[0],"envs":[0],"endpoints":[["10.0.0.1"]]}"#), Some("services[0].targetPorts")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80,80],"targetPorts":[1,2],"envs":[0],"endpoints":[["10.0.0.1"]]}"#), Some("services[0].targetPorts")),
        (one(r#"{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":"10.0.0.1"}"#), Some("services[0].endpoints")),
        // Only endpoint mode takes them; a waypoint does not take endpoint mode.
        (r#"{"envs":[{"name":"dev"}],"services":[{"host":"a.ns.svc.cluster.local","ports":[80],"envs":[0],"endpoints":[["10.0.0.1"]]}]}"#.into(), Some("services[0].endpoints")),
        (r#"{"envs":[{"name":"dev"}],"services":[{"host":"a.ns.svc.cluster.local","ports":[80],"targetPorts":[80],"envs":[0]}]}"#.into(), Some("services[0].targetPorts")),
        (r#"{"mode":"endpoint","proxy":"waypoint"}"#.into(), Some("mode")),
    ];
    for (json, want) in cases {
        let got = check(json).err();
        assert_eq!(got.as_deref(), *want, "{json}");
    }
}

#[test]
fn endpoint_mode_targets_are_formatted_once() {
    let table = check(
        r#"{"mode":"endpoint","envs":[{"name":"dev"},{"name":"dev.a"}],"services":[
        {"host":"a.ns.svc.cluster.local","ports":[81,80],"targetPorts":[9081,9080],"envs":[1,0],
         "endpoints":[["fd00::1","10.0.0.2"],["10.0.0.1"]]}]}"#,
    )
    .unwrap();
    let fqdn = "a.ns.svc.cluster.local";
    for (port, target) in [(80u16, 9080u16), (81, 9081)] {
        let svc = table.service(&format!("{fqdn}:{port}")).unwrap();
        let cluster = format!("outbound|{port}|envlane-endpoints|{fqdn}");
        assert_eq!(svc.target(0), Some(cluster.as_str()));
        assert_eq!(svc.target(1), Some(cluster.as_str()));
        assert_eq!(svc.endpoint_count(0), 1);
        assert_eq!(svc.endpoint_count(1), 2);
        let dev: Vec<_> = (0..3).map(|k| svc.endpoint(0, k).unwrap()).collect();
        assert_eq!(dev, vec![format!("10.0.0.1:{target}"); 3]);
        let a: Vec<_> = (0..3).map(|k| svc.endpoint(1, k).unwrap()).collect();
        assert_eq!(
            a,
            [
                format!("[fd00::1]:{target}"),
                format!("10.0.0.2:{target}"),
                format!("[fd00::1]:{target}")
            ]
        );
        assert_eq!(svc.endpoint(2, 0), None);
    }
    // What the route patch maps: the one ORIGINAL_DST cluster per port.
    let got: Vec<(u16, Vec<&str>)> = table
        .cluster_targets()
        .into_iter()
        .map(|t| (t.port, t.targets))
        .collect();
    assert_eq!(
        got,
        [
            (
                80,
                vec!["outbound|80|envlane-endpoints|a.ns.svc.cluster.local"]
            ),
            (
                81,
                vec!["outbound|81|envlane-endpoints|a.ns.svc.cluster.local"]
            )
        ]
    );
}

#[test]
fn endpoint_addresses_are_limited() {
    let ips: Vec<String> = (0..=limits::MAX_ENDPOINTS / 2)
        .map(|i| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255))
        .collect();
    let ips = serde_json::to_string(&ips).unwrap();
    let service = |name: &str, lists: &str| {
        format!(
            r#"{{"host":"{name}.ns.svc.cluster.local","ports":[80],"envs":[0,1],"endpoints":[{lists}]}}"#
        )
    };
    let table = |services: &[String]| {
        format!(
            r#"{{"mode":"endpoint","envs":[{{"name":"dev"}},{{"name":"dev.a"}}],"services":[{}]}}"#,
            services.join(",")
        )
    };
    // One service over the limit stops while parsing, at the address past it.
    let one = table(&[service("a", &format!("{ips},{ips}"))]);
    assert_eq!(
        check(&one).err().as_deref(),
        Some(format!("services[0].endpoints[1][{}]", limits::MAX_ENDPOINTS / 2).as_str())
    );
    // Services under it each, over it together: counted before compiling.
    let two = table(&[
        service("a", &format!("{ips},[\"10.0.0.1\"]")),
        service("b", &format!("[\"10.0.0.2\"],{ips}")),
    ]);
    assert_eq!(check(&two).err().as_deref(), Some("services"));
}
