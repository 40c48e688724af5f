//! `:authority` handling: `table::split_authority`, and
//! `RoutingTable::service` on a small fixed table checked against a plain
//! model of the same lookup rules.
#![no_main]

use std::sync::OnceLock;

use envlane::config::parse;
use envlane::table::{split_authority, Node, RoutingTable};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = r#"{
  "envs": [{"name": "dev"}, {"name": "dev.a"}],
  "services": [
    {"host": "go.demo.svc.cluster.local", "ports": [80, 8080], "envs": [0, 1]},
    {"host": "web.demo.svc.cluster.local", "ports": [9090], "envs": [0]},
    {"host": "db.other.svc.cluster.local", "ports": [5432, 5433], "envs": [1]},
    {"host": "plain-host", "ports": [80], "envs": [0]},
    {"host": "go.demo", "ports": [7000], "envs": [1]}
  ]
}"#;

/// name the request may use → (FQDN, ports), as the docs describe: the full
/// host, `name.ns.svc`, `name.ns`, and `name` in the caller's namespace
/// (`demo`); a full host wins over another service's short name.
const NAMES: &[(&str, &str, &[u16])] = &[
    (
        "go.demo.svc.cluster.local",
        "go.demo.svc.cluster.local",
        &[80, 8080],
    ),
    ("go.demo.svc", "go.demo.svc.cluster.local", &[80, 8080]),
    ("go.demo", "go.demo", &[7000]),
    ("go", "go.demo.svc.cluster.local", &[80, 8080]),
    (
        "web.demo.svc.cluster.local",
        "web.demo.svc.cluster.local",
        &[9090],
    ),
    ("web.demo.svc", "web.demo.svc.cluster.local", &[9090]),
    ("web.demo", "web.demo.svc.cluster.local", &[9090]),
    ("web", "web.demo.svc.cluster.local", &[9090]),
    (
        "db.other.svc.cluster.local",
        "db.other.svc.cluster.local",
        &[5432, 5433],
    ),
    ("db.other.svc", "db.other.svc.cluster.local", &[5432, 5433]),
    ("db.other", "db.other.svc.cluster.local", &[5432, 5433]),
    ("plain-host", "plain-host", &[80]),
];

fn table() -> &'static RoutingTable {
    static TABLE: OnceLock<RoutingTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let cfg = parse(CONFIG.as_bytes()).expect("fixed config parses");
        let node = Node {
            namespace: Some("demo".into()),
            env_label: None,
        };
        RoutingTable::compile(&cfg, &node).expect("fixed config compiles")
    })
}

/// Canonical port text: ASCII digits, no sign, no leading zero, 1-65535.
fn canonical_port(s: &str) -> Option<u16> {
    let ok = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && !s.starts_with('0');
    if !ok {
        return None;
    }
    s.parse().ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(authority) = std::str::from_utf8(data) else {
        return;
    };

    let split = split_authority(authority);
    match split {
        Some((host, Some(port))) => {
            // The text after the last ':' is exactly the port in decimal.
            let (before, after) = authority.rsplit_once(':').expect("a port needs a ':'");
            assert_eq!(host, before, "{authority:?}");
            assert_eq!(
                after,
                port.to_string(),
                "{authority:?}: port text is not canonical"
            );
            assert!(!host.contains(':') || host.ends_with(']'), "{authority:?}");
        }
        Some((host, None)) => {
            // No port: the authority is returned whole, and it has no
            // `:port` part (no ':', `[v6]`, or a bare IPv6 address).
            assert_eq!(host, authority);
            if let Some((before, _)) = authority.rsplit_once(':') {
                assert!(
                    authority.ends_with(']') || (before.contains(':') && !before.ends_with(']')),
                    "{authority:?} has a port part but no port"
                );
            }
        }
        None => {
            // Refused: there is a `:port` part and it is not a port.
            let (before, after) = authority.rsplit_once(':').expect("refusal needs a ':'");
            assert!(!authority.ends_with(']'));
            assert!(!before.contains(':') || before.ends_with(']'));
            assert!(
                canonical_port(after).is_none(),
                "{authority:?}: valid port refused"
            );
        }
    }
    // `host:canonical-port` always splits.
    if let Some((before, after)) = authority.rsplit_once(':') {
        if let Some(p) = canonical_port(after) {
            if !before.contains(':') || before.ends_with(']') {
                assert_eq!(split, Some((before, Some(p))), "{authority:?}");
            }
        }
    }

    // Lookup, against the model.
    let t = table();
    let got = t.service(authority);
    let expected = split.and_then(|(host, port)| {
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let &(_, fqdn, ports) = NAMES.iter().find(|(name, _, _)| *name == host)?;
        let port = match port {
            Some(p) => ports.contains(&p).then_some(p)?,
            None if ports.contains(&80) => 80,
            None if ports.len() == 1 => ports[0],
            None => return None,
        };
        Some((fqdn, port))
    });
    assert_eq!(
        got.map(|s| s.fqdn()),
        expected.map(|(f, _)| f),
        "{authority:?}"
    );
    if let (Some(svc), Some((fqdn, port))) = (got, expected) {
        // Cluster mode: the target names the port the request used.
        let dev = t.env_id("dev").expect("dev");
        let dev_a = t.env_id("dev.a").expect("dev.a");
        for (id, subset) in [(dev, "dev|"), (dev_a, "dev-a-")] {
            if let Some(target) = svc.target(id) {
                let want_head = format!("outbound|{port}|{subset}");
                assert!(target.starts_with(&want_head), "{target} for {authority:?}");
                assert!(target.ends_with(&format!("|{fqdn}")), "{target}");
            }
        }
    }
});
