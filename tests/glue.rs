//! The filter's callbacks driven by a fake host: every host call can fail,
//! properties can be absent and values oversized. Nothing panics, nothing
//! routes unless the filter itself chose, a bad config never fails requests.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use common::{alibaba, alibaba_endpoints, pod_ips, TARGET_PORT};
use envlane::config::{Mode, ORIGINAL_DST_STATE_KEY, ROUTE_STATE_PROPERTY};
use envlane::glue::{
    envoy_filter_state_args, Configured, Host, LifeSpan, Plugins, Root, COUNTER_CONFIG_INVALID,
    COUNTER_CONFIG_UNKNOWN_FIELDS, COUNTER_EDGE_STRIPPED, COUNTER_INVALID_ENV,
    COUNTER_ROUTE_FAILED, MAX_PENDING_EXPLANATIONS,
};
use envlane::table::endpoint_cluster;
use envlane::wire::HeaderMap;

/// Which host calls fail.
#[derive(Default, Clone, Copy)]
struct Failing {
    config: bool,
    properties: bool,
    headers: bool,
    writes: bool,
    filter_state: bool,
    envoy_state: bool,
    counters: bool,
    shared: bool,
}

impl Failing {
    fn all() -> Self {
        Self {
            config: true,
            properties: true,
            headers: true,
            writes: true,
            filter_state: true,
            envoy_state: true,
            counters: true,
            shared: true,
        }
    }
}

/// A host with one stream's request headers. `shared` stands for Envoy's
/// process-wide shared data: hand the same one to the fake of a later VM.
#[derive(Default)]
struct Fake {
    config: Vec<u8>,
    properties: HashMap<String, Vec<u8>>,
    request: RefCell<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Raw bytes to hand out instead of `request` (malformed maps).
    raw_request: Option<Vec<u8>>,
    response: RefCell<Vec<(String, Vec<u8>)>>,
    filter_state: RefCell<HashMap<String, Vec<u8>>>,
    /// Envoy filter-state objects (`set_envoy_filter_state`).
    envoy_state: RefCell<HashMap<String, (Vec<u8>, LifeSpan)>>,
    route_cache_cleared: RefCell<usize>,
    counters: RefCell<Vec<(String, u64)>>,
    shared: Rc<RefCell<HashMap<String, Vec<u8>>>>,
    config_reads: RefCell<usize>,
    fail: Failing,
}

impl Fake {
    fn new(config: &str) -> Self {
        let mut fake = Self {
            config: config.as_bytes().to_vec(),
            ..Self::default()
        };
        fake.properties
            .insert("xds\0node\0metadata\0NAMESPACE".into(), b"demo".to_vec());
        fake.properties
            .insert("plugin_name".into(), b"envlane".to_vec());
        fake
    }

    fn with_request(self, headers: &[(&str, &[u8])]) -> Self {
        *self.request.borrow_mut() = headers
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
            .collect();
        self
    }

    fn header(&self, name: &str) -> Option<Vec<u8>> {
        self.request
            .borrow()
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.clone())
    }

    fn counter(&self, name: &str) -> u64 {
        self.counters
            .borrow()
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, v)| *v)
    }

    fn routed_to(&self) -> Option<String> {
        self.filter_state
            .borrow()
            .get(ROUTE_STATE_PROPERTY)
            .map(|v| String::from_utf8(v.clone()).unwrap())
    }
}

impl Host for Fake {
    fn plugin_config(&self, size: usize) -> Option<Vec<u8>> {
        *self.config_reads.borrow_mut() += 1;
        assert!(size <= self.config.len().max(size));
        (!self.fail.config).then(|| self.config.clone())
    }

    fn property(&self, path: &[&str]) -> Option<Vec<u8>> {
        if self.fail.properties {
            return None;
        }
        self.properties.get(&path.join("\0")).cloned()
    }

    fn request_headers(&self) -> Option<Vec<u8>> {
        if self.fail.headers {
            return None;
        }
        if let Some(raw) = &self.raw_request {
            return Some(raw.clone());
        }
        let pairs = self.request.borrow();
        Some(HeaderMap::encode(
            pairs.iter().map(|(k, v)| (k.as_slice(), v.as_slice())),
        ))
    }

    fn remove_request_header(&self, name: &str) -> bool {
        if self.fail.writes {
            return false;
        }
        self.request
            .borrow_mut()
            .retain(|(k, _)| k != name.as_bytes());
        true
    }

    fn set_request_header(&self, name: &str, value: &[u8]) -> bool {
        if self.fail.writes {
            return false;
        }
        let mut request = self.request.borrow_mut();
        request.retain(|(k, _)| k != name.as_bytes());
        request.push((name.as_bytes().to_vec(), value.to_vec()));
        true
    }

    fn set_response_header(&self, name: &str, value: &[u8]) -> bool {
        if self.fail.writes {
            return false;
        }
        self.response
            .borrow_mut()
            .push((name.into(), value.to_vec()));
        true
    }

    fn set_filter_state(&self, name: &str, value: &[u8]) -> bool {
        if self.fail.filter_state {
            return false;
        }
        self.filter_state
            .borrow_mut()
            .insert(name.into(), value.to_vec());
        true
    }

    fn set_envoy_filter_state(&self, key: &str, value: &[u8], span: LifeSpan) -> bool {
        if self.fail.envoy_state {
            return false;
        }
        self.envoy_state
            .borrow_mut()
            .insert(key.into(), (value.to_vec(), span));
        true
    }

    fn clear_route_cache(&self) {
        *self.route_cache_cleared.borrow_mut() += 1;
    }

    fn define_counter(&self, name: &str) -> Option<u32> {
        if self.fail.counters {
            return None;
        }
        let mut counters = self.counters.borrow_mut();
        let id = match counters.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                counters.push((name.into(), 0));
                counters.len() - 1
            }
        };
        u32::try_from(id).ok()
    }

    fn increment(&self, id: u32) {
        if let Some((_, v)) = self.counters.borrow_mut().get_mut(id as usize) {
            *v += 1;
        }
    }

    fn shared_data(&self, key: &str) -> Option<Vec<u8>> {
        if self.fail.shared {
            return None;
        }
        self.shared.borrow().get(key).cloned()
    }

    fn set_shared_data(&self, key: &str, value: &[u8]) -> bool {
        if self.fail.shared {
            return false;
        }
        self.shared.borrow_mut().insert(key.into(), value.to_vec());
        true
    }
}

fn alibaba_json() -> String {
    serde_json::to_string(&alibaba(Mode::Cluster)).unwrap()
}

/// Configures a fresh VM on `host`, then runs one stream through it.
fn run(host: &Fake) -> Configured {
    let mut root = Root::default();
    let configured = root.configure(host, host.config.len());
    let mut stream = root.stream();
    stream.on_request_headers(host);
    stream.on_response_headers(host);
    configured
}

const JAVA: &[(&str, &[u8])] = &[
    (":authority", b"java:8080"),
    ("x-virtual-env", b"dev.proj1"),
];

#[test]
fn routes_by_filter_state_only() {
    let host = Fake::new(&alibaba_json()).with_request(&[
        (":authority", b"java:8080"),
        ("x-virtual-env", b"dev.proj1"),
        (
            "x-envlane-cluster",
            b"outbound|8080|evil|java.demo.svc.cluster.local",
        ),
    ]);
    assert_eq!(run(&host), Configured::Loaded);
    let chosen = host.routed_to().expect("filter state written");
    let subset = common::subset("dev.proj1");
    assert_eq!(
        chosen,
        format!("outbound|8080|{subset}|java.demo.svc.cluster.local")
    );
    assert_eq!(*host.route_cache_cleared.borrow(), 1);
    assert_eq!(host.counter("envlane.decision.exact"), 1);
}

#[test]
fn a_bad_first_config_passes_through_and_a_bad_update_is_refused() {
    let shared = Rc::new(RefCell::new(HashMap::new()));
    let bad =
        r#"{"envs":[{"name":"dev"}],"services":[{"host":"BAD HOST","ports":[80],"envs":[0]}]}"#;
    let mut first = Fake::new(bad).with_request(JAVA);
    first.shared = shared.clone();
    assert_eq!(run(&first), Configured::PassThrough);
    assert!(
        Configured::PassThrough.accepted(),
        "Envoy must take it, or every request fails"
    );
    assert_eq!(first.routed_to(), None);
    assert_eq!(
        first.header("x-virtual-env").as_deref(),
        Some(&b"dev.proj1"[..])
    );
    assert_eq!(*first.route_cache_cleared.borrow(), 0, "request untouched");
    assert_eq!(first.counter(COUNTER_CONFIG_INVALID), 1);

    let mut good = Fake::new(&alibaba_json()).with_request(JAVA);
    good.shared = shared.clone();
    assert_eq!(run(&good), Configured::Loaded);
    assert!(good.routed_to().is_some());

    // Envoy checks an update on a fresh VM: only shared data remembers.
    let mut update = Fake::new(bad).with_request(JAVA);
    update.shared = shared;
    assert_eq!(run(&update), Configured::Refused);
    assert!(
        !Configured::Refused.accepted(),
        "Envoy keeps the last good config"
    );
}

#[test]
fn unknown_fields_are_ignored_counted_and_routing_goes_on() {
    let mut cfg: serde_json::Value = serde_json::from_str(&alibaba_json()).unwrap();
    cfg["newSetting"] = serde_json::json!({"x": 1});
    cfg["services"][0]["weight"] = serde_json::json!(5);
    let host = Fake::new(&cfg.to_string()).with_request(JAVA);
    assert_eq!(run(&host), Configured::Loaded);
    assert_eq!(host.counter(COUNTER_CONFIG_UNKNOWN_FIELDS), 1);
    assert!(host.routed_to().is_some());
}

#[test]
fn an_oversized_config_is_refused_before_it_is_read() {
    let host = Fake::new("{}");
    let mut root = Root::default();
    let configured = root.configure(&host, envlane::limits::MAX_CONFIG_BYTES + 1);
    assert_eq!(configured, Configured::PassThrough);
    assert_eq!(*host.config_reads.borrow(), 0);
}

/// Each host call failing alone, then all together: no panic, no route
/// unless the filter state was written, and a failed write is counted.
#[test]
fn every_host_call_failing() {
    let cases: &[(&str, Failing, Option<bool>)] = &[
        // (what fails, failures, routed?: None = not even decided)
        ("nothing", Failing::default(), Some(true)),
        (
            "config",
            Failing {
                config: true,
                ..Default::default()
            },
            None,
        ),
        // No namespace from node metadata: the short name `java` is unknown.
        (
            "properties",
            Failing {
                properties: true,
                ..Default::default()
            },
            None,
        ),
        (
            "headers",
            Failing {
                headers: true,
                ..Default::default()
            },
            None,
        ),
        // Header writes carry auto-inject and host mode only, not the route.
        (
            "writes",
            Failing {
                writes: true,
                ..Default::default()
            },
            Some(true),
        ),
        (
            "filter state",
            Failing {
                filter_state: true,
                ..Default::default()
            },
            Some(false),
        ),
        (
            "counters",
            Failing {
                counters: true,
                ..Default::default()
            },
            Some(true),
        ),
        (
            "shared data",
            Failing {
                shared: true,
                ..Default::default()
            },
            Some(true),
        ),
        ("everything", Failing::all(), None),
    ];
    for (what, fail, routed) in cases {
        let mut host = Fake::new(&alibaba_json()).with_request(JAVA);
        host.fail = *fail;
        let configured = run(&host);
        assert!(configured.accepted(), "{what}");
        let state = host.routed_to();
        match routed {
            Some(true) => assert!(state.is_some(), "{what}"),
            _ => assert_eq!(state, None, "{what}"),
        }
        if *routed == Some(false) {
            assert_eq!(host.counter(COUNTER_ROUTE_FAILED), 1, "{what}");
            assert_eq!(*host.route_cache_cleared.borrow(), 0, "{what}");
        }
    }
}

#[test]
fn absent_malformed_and_oversized_inputs() {
    // No node metadata at all: no namespace (short names unknown), no label.
    let mut host = Fake::new(&alibaba_json())
        .with_request(&[(":authority", b"java.demo:8080"), ("x-virtual-env", b"dev")]);
    host.properties.clear();
    run(&host);
    assert!(host.routed_to().is_some());

    // A header map the host garbled.
    let mut host = Fake::new(&alibaba_json());
    host.raw_request = Some(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
    run(&host);
    assert_eq!(host.routed_to(), None);

    // A megabyte env value, 10,000 headers, a megabyte label.
    let big = vec![b'a'; 1 << 20];
    let mut headers: Vec<(String, Vec<u8>)> = (0..10_000)
        .map(|i| (format!("x-h{i}"), b"v".to_vec()))
        .collect();
    headers.push((":authority".into(), b"java:8080".to_vec()));
    headers.push(("x-virtual-env".into(), big.clone()));
    let refs: Vec<(&str, &[u8])> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let mut host = Fake::new(&alibaba_json()).with_request(&refs);
    host.properties
        .insert("xds\0node\0metadata\0LABELS\0virtual-env".into(), big);
    run(&host);
    assert_eq!(host.counter(COUNTER_INVALID_ENV), 1);
    assert_eq!(host.counter("envlane.decision.default"), 1);
}

#[test]
fn debug_explanation_only_when_enabled() {
    for debug in [false, true] {
        let mut cfg = alibaba(Mode::Cluster);
        cfg.debug = debug;
        let host = Fake::new(&serde_json::to_string(&cfg).unwrap())
            .with_request(&[(":authority", b"java:8080"), ("x-envlane-debug", b"1")]);
        run(&host);
        let answered = host
            .response
            .borrow()
            .iter()
            .any(|(n, _)| n == "x-envlane-decision");
        assert_eq!(answered, debug);
    }
}

#[test]
fn edge_strips_what_outsiders_must_not_set() {
    let mut cfg = alibaba(Mode::Cluster);
    cfg.edge = true;
    cfg.debug = true;
    cfg.baggage_key = Some("lane".into());
    cfg.env_aliases = vec![
        envlane::config::EnvAlias {
            header: Some("x-lane".into()),
            cookie: None,
        },
        envlane::config::EnvAlias {
            header: None,
            cookie: Some("VirtualEnv".into()),
        },
    ];
    let host = Fake::new(&serde_json::to_string(&cfg).unwrap()).with_request(&[
        (":authority", b"java:8080"),
        ("x-virtual-env", b"dev.proj1"),
        ("x-envlane-debug", b"1"),
        ("x-lane", b"dev.proj1"),
        ("baggage", b"user=7, lane=dev.proj1;p=1, other=2"),
        ("cookie", b"session=abc; VirtualEnv=dev.proj1"),
    ]);
    run(&host);
    for gone in ["x-virtual-env", "x-envlane-debug", "x-lane"] {
        assert_eq!(host.header(gone), None, "{gone}");
    }
    assert_eq!(
        host.header("baggage").as_deref(),
        Some(&b"user=7, other=2"[..])
    );
    assert_eq!(host.header("cookie").as_deref(), Some(&b"session=abc"[..]));
    // What the request brought is not its env at the edge: no rule gave one,
    // so the default env's pods serve it (not any env's, as the route's own
    // cluster would), and no env header goes on.
    assert_eq!(
        host.routed_to().as_deref(),
        Some("outbound|8080|dev|java.demo.svc.cluster.local")
    );
    assert_eq!(host.header("x-virtual-env"), None);
    assert!(
        host.response.borrow().is_empty(),
        "no explanation at the edge"
    );
    assert_eq!(host.counter(COUNTER_EDGE_STRIPPED), 1);

    // Nothing to strip: no header touched (the route is still the default env's).
    let clean = Fake::new(&serde_json::to_string(&cfg).unwrap())
        .with_request(&[(":authority", b"java:8080"), ("baggage", b"user=7")]);
    run(&clean);
    assert_eq!(clean.counter(COUNTER_EDGE_STRIPPED), 0);
    assert_eq!(clean.header("baggage").as_deref(), Some(&b"user=7"[..]));
    assert_eq!(clean.request.borrow().len(), 2);
}

/// The alibaba table with env `dev.proj1`'s subset renamed.
fn alibaba_with_subset(subset: &str) -> String {
    let mut cfg = alibaba(Mode::Cluster);
    for env in &mut cfg.envs {
        if env.name == "dev.proj1" {
            env.subset = Some(subset.into());
        }
    }
    serde_json::to_string(&cfg).unwrap()
}

fn plugin_host(name: &str, config: &str) -> Fake {
    let mut host = Fake::new(config).with_request(JAVA);
    host.properties
        .insert("plugin_name".into(), name.as_bytes().to_vec());
    host
}

#[test]
fn plugins_are_updated_in_place_and_streams_find_theirs_by_name() {
    let java = |subset: &str| format!("outbound|8080|{subset}|java.demo.svc.cluster.local");
    let mut vm = Plugins::default();
    let first = plugin_host("envlane", &alibaba_with_subset("one"));
    assert!(vm.configure(&first, first.config.len()));
    vm.on_request_headers(&first, 2);
    assert_eq!(first.routed_to(), Some(java("one")));

    // A new config of the same plugin (a new root context in Envoy) replaces
    // its table: the next stream uses it.
    let update = plugin_host("envlane", &alibaba_with_subset("two"));
    assert!(vm.configure(&update, update.config.len()));
    vm.on_request_headers(&update, 3);
    assert_eq!(update.routed_to(), Some(java("two")));

    // A second plugin in the same VM: each stream is matched by plugin_name.
    let other = plugin_host("other", &alibaba_with_subset("three"));
    assert!(vm.configure(&other, other.config.len()));
    for (name, want) in [
        ("envlane", Some(java("two"))),
        ("other", Some(java("three"))),
        ("gone", None),
    ] {
        let host = plugin_host(name, "");
        vm.on_request_headers(&host, 4);
        assert_eq!(host.routed_to(), want, "{name}");
    }
    // Without the property, a VM of several plugins routes nothing.
    let mut blind = plugin_host("envlane", "");
    blind.fail.properties = true;
    vm.on_request_headers(&blind, 5);
    assert_eq!(blind.routed_to(), None);
}

#[test]
fn debug_explanations_wait_for_their_own_response_and_are_bounded() {
    let mut cfg = alibaba(Mode::Cluster);
    cfg.debug = true;
    let config = serde_json::to_string(&cfg).unwrap();
    let host =
        Fake::new(&config).with_request(&[(":authority", b"java:8080"), ("x-envlane-debug", b"1")]);
    let answered = |h: &Fake| {
        h.response
            .borrow()
            .iter()
            .any(|(n, _)| n == "x-envlane-decision")
    };
    let mut vm = Plugins::default();
    assert!(vm.configure(&host, host.config.len()));
    vm.on_request_headers(&host, 7);
    assert_eq!(vm.pending_explanations(), 1);
    let other = Fake::new(&config);
    vm.on_response_headers(&other, 8);
    assert!(!answered(&other));
    vm.on_response_headers(&host, 7);
    assert!(answered(&host));
    assert_eq!(vm.pending_explanations(), 0);
    // Streams that never see their response keep at most the bound.
    for id in 0..(MAX_PENDING_EXPLANATIONS as u32 + 40) {
        vm.on_request_headers(&host, 100 + id);
    }
    assert_eq!(vm.pending_explanations(), MAX_PENDING_EXPLANATIONS);
    // Without the debug header nothing is kept.
    let plain = Fake::new(&config).with_request(&[(":authority", b"java:8080")]);
    let mut vm = Plugins::default();
    assert!(vm.configure(&plain, plain.config.len()));
    vm.on_request_headers(&plain, 1);
    assert_eq!(vm.pending_explanations(), 0);
}

/// The alibaba table served by a shared proxy with a caller table.
fn shared_proxy(proxy: envlane::config::Proxy) -> envlane::config::PluginConfig {
    let mut cfg = alibaba(Mode::Cluster);
    cfg.proxy = proxy;
    cfg.debug = true;
    let id = |env: &str| cfg.envs.iter().position(|e| e.name == env).unwrap() as u32;
    let (proj1, proj2) = (id("dev.proj1"), id("dev.proj2"));
    cfg.callers = vec![
        envlane::config::CallerEntry {
            env: proj1,
            ips: vec!["10.244.0.5".into()],
        },
        envlane::config::CallerEntry {
            env: proj2,
            ips: vec!["fd00::7".into()],
        },
    ];
    cfg.caller_workloads = vec![envlane::config::CallerWorkloadEntry {
        env: proj2,
        namespace: "demo".into(),
        workloads: vec!["node-proj2".into()],
    }];
    cfg
}

fn cluster(port_service_env: (&str, &str)) -> String {
    let (service, env) = port_service_env;
    format!(
        "outbound|8080|{}|{service}.demo.svc.cluster.local",
        common::subset(env)
    )
}

#[test]
fn a_gateway_finds_a_request_without_env_by_its_caller() {
    use envlane::config::Proxy;
    use envlane::glue::SOURCE_ADDRESS_PATH;
    let json = serde_json::to_string(&shared_proxy(Proxy::Gateway)).unwrap();
    // (peer address, request headers, (service, env) routed to, env header after)
    type Case<'a> = (
        Option<&'a str>,
        &'a [(&'a str, &'a [u8])],
        (&'a str, &'a str),
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        // No env on the request: the caller's, added for the next hop.
        (
            Some("10.244.0.5:43210"),
            &[(":authority", b"java:8080")],
            ("java", "dev.proj1"),
            Some("dev.proj1"),
        ),
        (
            Some("[fd00::7]:80"),
            &[(":authority", b"go:8080")],
            ("go", "dev.proj2"),
            Some("dev.proj2"),
        ),
        // The request's own env beats the caller's.
        (
            Some("10.244.0.5:43210"),
            &[
                (":authority", b"java:8080"),
                ("x-virtual-env", b"dev.proj1.feature1"),
            ],
            ("java", "dev.proj1.feature1"),
            Some("dev.proj1.feature1"),
        ),
        // A caller not in the table, or no address: the default env.
        (
            Some("10.244.0.9:1"),
            &[(":authority", b"java:8080")],
            ("java", "dev"),
            None,
        ),
        (None, &[(":authority", b"java:8080")], ("java", "dev"), None),
        // A header naming a caller IP is not the caller.
        (
            Some("10.244.0.9:1"),
            &[
                (":authority", b"java:8080"),
                ("x-forwarded-for", b"10.244.0.5"),
            ],
            ("java", "dev"),
            None,
        ),
        // The gateway's own node label is nobody's env.
        (
            Some("192.0.2.1:1"),
            &[(":authority", b"node:8080")],
            ("node", "dev"),
            None,
        ),
    ];
    for (address, headers, target, env_after) in cases {
        let mut host = Fake::new(&json).with_request(headers);
        host.properties.insert(
            "xds\0node\0metadata\0LABELS\0virtual-env".into(),
            b"dev.proj1".to_vec(),
        );
        if let Some(a) = address {
            host.properties
                .insert(SOURCE_ADDRESS_PATH.join("\0"), a.as_bytes().to_vec());
        }
        assert_eq!(run(&host), Configured::Loaded);
        assert_eq!(
            host.routed_to(),
            Some(cluster(*target)),
            "{address:?} {headers:?}"
        );
        assert_eq!(
            host.header("x-virtual-env")
                .map(|v| String::from_utf8(v).unwrap())
                .as_deref(),
            *env_after,
            "{address:?} {headers:?}"
        );
    }

    // The explanation names the source.
    let mut host =
        Fake::new(&json).with_request(&[(":authority", b"java:8080"), ("x-envlane-debug", b"1")]);
    host.properties
        .insert(SOURCE_ADDRESS_PATH.join("\0"), b"10.244.0.5:1".to_vec());
    run(&host);
    let why = host.response.borrow()[0].1.clone();
    assert!(
        String::from_utf8(why)
            .unwrap()
            .starts_with("env=dev.proj1; source=caller;"),
        "{:?}",
        host.response.borrow()
    );
}

#[test]
fn a_waypoint_knows_its_caller_by_workload_first_and_its_service_by_filter_chain() {
    use envlane::config::Proxy;
    use envlane::glue::{
        FILTER_CHAIN_PATH, PEER_NAMESPACE_PATH, PEER_WORKLOAD_PATH, SOURCE_ADDRESS_PATH,
    };
    let json = serde_json::to_string(&shared_proxy(Proxy::Waypoint)).unwrap();
    let waypoint_cluster = |(service, env): (&str, &str)| {
        format!(
            "inbound-vip|8080|http/{}|{service}.demo.svc.cluster.local",
            common::subset(env)
        )
    };
    type Case<'a> = (
        Option<&'a str>,
        Option<(&'a str, &'a str)>,
        &'a [(&'a str, &'a [u8])],
        Option<&'a str>,
        (&'a str, &'a str),
    );
    let go = "inbound-vip|8080|http|go.demo.svc.cluster.local";
    // (peer address, peer (namespace, workload), request, filter chain, routed to)
    let cases: &[Case] = &[
        (
            Some("10.244.0.5:1"),
            Some(("demo", "node-proj2")),
            &[(":authority", b"go:8080")],
            Some(go),
            ("go", "dev.proj2"),
        ),
        // Unknown workload: by address (dev.proj1, which go falls back to dev for).
        (
            Some("10.244.0.5:1"),
            Some(("demo", "unknown")),
            &[(":authority", b"go:8080")],
            Some(go),
            ("go", "dev"),
        ),
        (
            None,
            Some(("demo", "node-proj2")),
            &[(":authority", b"go:8080")],
            Some(go),
            ("go", "dev.proj2"),
        ),
        (
            None,
            None,
            &[(":authority", b"go:8080")],
            Some(go),
            ("go", "dev"),
        ),
        // The destination is the filter chain's service, whatever the host says.
        (
            None,
            Some(("demo", "node-proj2")),
            &[(":authority", b"java:8080")],
            Some(go),
            ("go", "dev.proj2"),
        ),
        // With x-forwarded-for a waypoint's source address may be the
        // client's writing: not looked up (an address that would give
        // dev.proj2 here gives the default).
        (
            Some("[fd00::7]:1"),
            None,
            &[(":authority", b"go:8080"), ("x-forwarded-for", b"fd00::7")],
            Some(go),
            ("go", "dev"),
        ),
        (
            Some("[fd00::7]:1"),
            None,
            &[(":authority", b"go:8080")],
            Some(go),
            ("go", "dev.proj2"),
        ),
    ];
    for (address, peer, headers, chain, target) in cases {
        let mut host = Fake::new(&json).with_request(headers);
        if let Some(a) = address {
            host.properties
                .insert(SOURCE_ADDRESS_PATH.join("\0"), a.as_bytes().to_vec());
        }
        if let Some((ns, wl)) = peer {
            host.properties
                .insert(PEER_NAMESPACE_PATH.join("\0"), ns.as_bytes().to_vec());
            host.properties
                .insert(PEER_WORKLOAD_PATH.join("\0"), wl.as_bytes().to_vec());
        }
        if let Some(c) = chain {
            host.properties
                .insert(FILTER_CHAIN_PATH.join("\0"), c.as_bytes().to_vec());
        }
        assert_eq!(run(&host), Configured::Loaded);
        assert_eq!(
            host.routed_to(),
            Some(waypoint_cluster(*target)),
            "{address:?} {peer:?} {headers:?}"
        );
    }
}

#[test]
fn only_a_shared_proxy_takes_a_caller_table_and_only_the_edge_rules() {
    use envlane::config::{EdgeRule, Proxy};
    let mut sidecar = shared_proxy(Proxy::Gateway);
    sidecar.proxy = Proxy::Sidecar;
    let mut not_edge = alibaba(Mode::Cluster);
    not_edge.edge_rules = vec![EdgeRule {
        env: Some("dev.proj1".into()),
        header: Some("x-user".into()),
        cookie: None,
        values: vec!["alice".into()],
        percent: None,
        preview_host: None,
    }];
    for cfg in [sidecar, not_edge] {
        let host = Fake::new(&serde_json::to_string(&cfg).unwrap()).with_request(JAVA);
        // A first config that does not load: pass-through, nothing routed.
        assert_eq!(run(&host), Configured::PassThrough);
        assert_eq!(host.routed_to(), None);
        assert_eq!(host.counter(COUNTER_CONFIG_INVALID), 1);
    }
}

#[test]
fn edge_rules_give_the_env_after_the_request_is_cleaned() {
    let mut cfg = alibaba(Mode::Cluster);
    cfg.edge = true;
    cfg.debug = true;
    cfg.edge_rules = serde_json::from_str(
        r#"[{"env":"dev.proj1","header":"x-user","values":["alice"]},
            {"env":"dev.proj1.feature1","cookie":"uid","values":["bob"]},
            {"previewHost":"{env}.preview.example.com"}]"#,
    )
    .unwrap();
    let json = serde_json::to_string(&cfg).unwrap();
    // (request, (service, env) routed to, env header after, stripped)
    type Case<'a> = (
        &'a [(&'a str, &'a [u8])],
        (&'a str, &'a str),
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        (
            &[(":authority", b"java:8080"), ("x-user", b"alice")],
            ("java", "dev.proj1"),
            Some("dev.proj1"),
        ),
        // An outsider's env header goes; the rule's env replaces it.
        (
            &[
                (":authority", b"java:8080"),
                ("x-user", b"alice"),
                ("x-virtual-env", b"dev.proj2"),
            ],
            ("java", "dev.proj1"),
            Some("dev.proj1"),
        ),
        (
            &[(":authority", b"java:8080"), ("cookie", b"uid=bob")],
            ("java", "dev.proj1.feature1"),
            Some("dev.proj1.feature1"),
        ),
        // No rule: the env header goes, the default env serves.
        (
            &[
                (":authority", b"java:8080"),
                ("x-virtual-env", b"dev.proj1"),
            ],
            ("java", "dev"),
            None,
        ),
        (
            &[(":authority", b"java:8080"), ("x-user", b"mallory")],
            ("java", "dev"),
            None,
        ),
    ];
    for (headers, target, env_after) in cases {
        let mut with_debug = headers.to_vec();
        with_debug.push(("x-envlane-debug", b"1"));
        let host = Fake::new(&json).with_request(&with_debug);
        run(&host);
        assert_eq!(host.routed_to(), Some(cluster(*target)), "{headers:?}");
        assert_eq!(
            host.header("x-virtual-env")
                .map(|v| String::from_utf8(v).unwrap())
                .as_deref(),
            *env_after,
            "{headers:?}"
        );
        assert_eq!(host.header("x-envlane-debug"), None);
        assert!(
            host.response.borrow().is_empty(),
            "no explanation for outsiders"
        );
        assert!(*host.route_cache_cleared.borrow() >= 1);
    }
    // A preview host names an env outside the table: it still becomes the
    // request's env for the hops behind the edge.
    let host = Fake::new(&json).with_request(&[(":authority", b"dev.proj9.preview.example.com")]);
    run(&host);
    assert_eq!(host.routed_to(), None);
    assert_eq!(
        host.header("x-virtual-env").as_deref(),
        Some(&b"dev.proj9"[..])
    );
}

impl Fake {
    /// The address endpoint mode wrote, and for how long.
    fn original_dst(&self) -> Option<(String, LifeSpan)> {
        self.envoy_state
            .borrow()
            .get(ORIGINAL_DST_STATE_KEY)
            .map(|(v, span)| (String::from_utf8(v.clone()).unwrap(), *span))
    }
}

fn endpoints_json() -> String {
    serde_json::to_string(&alibaba_endpoints()).unwrap()
}

/// The `IP:PORT`s endpoint mode may pick for (service, env).
fn addresses(service: &str, env: &str) -> Vec<String> {
    pod_ips(service, env)
        .iter()
        .map(|ip| match ip.contains(':') {
            true => format!("[{ip}]:{TARGET_PORT}"),
            false => format!("{ip}:{TARGET_PORT}"),
        })
        .collect()
}

#[test]
fn endpoint_mode_routes_every_case_to_a_pod_of_the_env() {
    // (request headers, counter, Some((service, env)) routed to / None untouched)
    type Case<'a> = (
        &'a [(&'a str, &'a [u8])],
        &'a str,
        Option<(&'a str, &'a str)>,
    );
    let cases: &[Case] = &[
        // alibaba's table (README): exact, fallback, default.
        (
            &[
                (":authority", b"java:8080"),
                ("x-virtual-env", b"dev.proj1"),
            ],
            "exact",
            Some(("java", "dev.proj1")),
        ),
        (
            &[
                (":authority", b"java:8080"),
                ("x-virtual-env", b"dev.proj1.feature1"),
            ],
            "exact",
            Some(("java", "dev.proj1.feature1")),
        ),
        (
            &[(":authority", b"go:8080"), ("x-virtual-env", b"dev.proj1")],
            "fallback",
            Some(("go", "dev")),
        ),
        (
            &[
                (":authority", b"node:8080"),
                ("x-virtual-env", b"dev.proj1"),
            ],
            "exact",
            Some(("node", "dev.proj1")),
        ),
        (
            &[
                (":authority", b"java:8080"),
                ("x-virtual-env", b"dev.proj2"),
            ],
            "fallback",
            Some(("java", "dev")),
        ),
        (
            &[(":authority", b"go:8080"), ("x-virtual-env", b"dev.proj2")],
            "exact",
            Some(("go", "dev.proj2")),
        ),
        (
            &[
                (":authority", b"node:8080"),
                ("x-virtual-env", b"dev.proj2"),
            ],
            "fallback",
            Some(("node", "dev")),
        ),
        (
            &[
                (":authority", b"java:8080"),
                ("x-virtual-env", b"dev.proj1.user9"),
            ],
            "fallback",
            Some(("java", "dev.proj1")),
        ),
        (
            &[
                (":authority", b"java.demo.svc.cluster.local:8080"),
                ("x-virtual-env", b"dev.proj1.feature1.x"),
            ],
            "fallback",
            Some(("java", "dev.proj1.feature1")),
        ),
        // No env, an env nobody has, an invalid env: the default env.
        (
            &[(":authority", b"java:8080")],
            "default",
            Some(("java", "dev")),
        ),
        (
            &[(":authority", b"go:8080"), ("x-virtual-env", b"prod")],
            "default",
            Some(("go", "dev")),
        ),
        (
            &[(":authority", b"go:8080"), ("x-virtual-env", b"bad env!")],
            "default",
            Some(("go", "dev")),
        ),
        // No port: the only port.
        (
            &[(":authority", b"java"), ("x-virtual-env", b"dev.proj1")],
            "exact",
            Some(("java", "dev.proj1")),
        ),
        // Not in the table: untouched.
        (
            &[
                (":authority", b"java:9999"),
                ("x-virtual-env", b"dev.proj1"),
            ],
            "passthrough",
            None,
        ),
        (
            &[
                (":authority", b"other:8080"),
                ("x-virtual-env", b"dev.proj1"),
            ],
            "passthrough",
            None,
        ),
        (&[("x-virtual-env", b"dev.proj1")], "passthrough", None),
    ];
    for (headers, counter, want) in cases {
        let host = Fake::new(&endpoints_json()).with_request(headers);
        assert_eq!(run(&host), Configured::Loaded);
        let what = format!("{headers:?}");
        assert_eq!(
            host.counter(&format!("envlane.decision.{counter}")),
            1,
            "{what}"
        );
        match want {
            Some((service, env)) => {
                let (addr, span) = host.original_dst().expect("address written");
                assert!(addresses(service, env).contains(&addr), "{what}: {addr}");
                assert_eq!(span, LifeSpan::DownstreamRequest);
                let fqdn = format!("{service}.demo.svc.cluster.local");
                assert_eq!(
                    host.routed_to(),
                    Some(endpoint_cluster(8080, &fqdn)),
                    "{what}"
                );
                assert_eq!(*host.route_cache_cleared.borrow(), 1, "{what}");
            }
            None => {
                assert_eq!(host.original_dst(), None, "{what}");
                assert_eq!(host.routed_to(), None, "{what}");
                assert_eq!(*host.route_cache_cleared.borrow(), 0, "{what}");
            }
        }
        assert_eq!(host.counter(COUNTER_ROUTE_FAILED), 0, "{what}");
    }
}

#[test]
fn endpoint_mode_ipv6_pods_are_bracketed() {
    let host = Fake::new(&endpoints_json()).with_request(&[
        (":authority", b"java:8080"),
        ("x-virtual-env", b"dev.proj1.feature1"),
    ]);
    run(&host);
    assert_eq!(
        host.original_dst().map(|(a, _)| a),
        Some("[fd00::31]:9080".into())
    );
}

#[test]
fn endpoint_mode_no_client_header_steers_it() {
    let host = Fake::new(&endpoints_json()).with_request(&[
        (":authority", b"java:8080"),
        ("x-virtual-env", b"dev.proj1"),
        ("x-envoy-original-dst-host", b"6.6.6.6:9080"),
        (ORIGINAL_DST_STATE_KEY, b"6.6.6.6:9080"),
        (
            "x-envlane-cluster",
            b"outbound|8080|evil|java.demo.svc.cluster.local",
        ),
    ]);
    run(&host);
    let (addr, _) = host.original_dst().expect("written");
    assert!(addresses("java", "dev.proj1").contains(&addr), "{addr}");
    assert_eq!(
        host.routed_to(),
        Some(endpoint_cluster(8080, "java.demo.svc.cluster.local"))
    );
}

#[test]
fn endpoint_mode_routes_nothing_unless_the_address_was_taken() {
    // (which write fails, address written, cluster written)
    let cases: &[(&str, Failing, bool, bool)] = &[
        ("nothing", Failing::default(), true, true),
        (
            "the address",
            Failing {
                envoy_state: true,
                ..Default::default()
            },
            false,
            false,
        ),
        (
            "the cluster",
            Failing {
                filter_state: true,
                ..Default::default()
            },
            true,
            false,
        ),
        ("everything", Failing::all(), false, false),
    ];
    for (what, fail, addressed, routed) in cases {
        let mut host = Fake::new(&endpoints_json()).with_request(JAVA);
        host.fail = *fail;
        assert!(run(&host).accepted(), "{what}");
        assert_eq!(host.original_dst().is_some(), *addressed, "{what}");
        assert_eq!(host.routed_to().is_some(), *routed, "{what}");
        if !fail.counters && !routed {
            assert_eq!(host.counter(COUNTER_ROUTE_FAILED), 1, "{what}");
            assert_eq!(*host.route_cache_cleared.borrow(), 0, "{what}");
        }
    }
}

#[test]
fn endpoint_mode_spreads_a_vm_requests_over_the_env_pods() {
    let host = Fake::new(&endpoints_json());
    let mut root = Root::default();
    assert_eq!(root.configure(&host, host.config.len()), Configured::Loaded);
    // Two services called in turn: each still reaches both of its pods.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for i in 0..64 {
        let service: &[u8] = if i % 2 == 0 { b"java:8080" } else { b"go:8080" };
        *host.request.borrow_mut() = vec![
            (b":authority".to_vec(), service.to_vec()),
            (b"x-virtual-env".to_vec(), b"dev".to_vec()),
        ];
        host.envoy_state.borrow_mut().clear();
        let mut stream = root.stream();
        stream.on_request_headers(&host);
        let (addr, _) = host.original_dst().expect("written");
        *seen.entry(addr).or_default() += 1;
    }
    let mut want = addresses("java", "dev");
    want.extend(addresses("go", "dev"));
    let mut got: Vec<&String> = seen.keys().collect();
    got.sort();
    want.sort();
    assert_eq!(got, want.iter().collect::<Vec<_>>());
    for (addr, n) in &seen {
        assert!((8..=24).contains(n), "{addr}: {n} of 32");
    }
}

#[test]
fn envoy_filter_state_arguments_are_the_protobuf() {
    // As the spike sent them to Envoy 1.40 (benches/endpoint_spike).
    let args = envoy_filter_state_args(
        ORIGINAL_DST_STATE_KEY,
        b"10.0.0.1:9080",
        LifeSpan::DownstreamRequest,
    );
    let mut want = vec![0x0a, ORIGINAL_DST_STATE_KEY.len() as u8];
    want.extend_from_slice(ORIGINAL_DST_STATE_KEY.as_bytes());
    want.extend_from_slice(&[0x12, 13]);
    want.extend_from_slice(b"10.0.0.1:9080");
    want.extend_from_slice(&[0x18, 1]);
    assert_eq!(args, want);
    // FilterChain is protobuf's default: left out. A long value: a two-byte length.
    let long = vec![b'x'; 300];
    let args = envoy_filter_state_args("k", &long, LifeSpan::FilterChain);
    assert_eq!(&args[..5], &[0x0a, 1, b'k', 0x12, 0xac]);
    assert_eq!(args[5], 0x02);
    assert_eq!(args.len(), 6 + 300);
}
