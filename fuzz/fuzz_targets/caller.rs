//! What a shared proxy reads of its caller and of a request at the edge:
//! `callers::parse_address` on Envoy address text (checked against the
//! standard library's socket address parser) and the edge rules on
//! arbitrary header values. Nothing panics; answers follow the rules.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use envlane::callers::parse_address;
use envlane::edge_rules::{percent_bucket, EdgeRules};
use envlane::names::{check_env, Splitter};
use envlane::wire::HeaderMap;
use libfuzzer_sys::fuzz_target;

const RULES: &str = r#"[
  {"env": "dev.a", "header": "x-user", "values": ["alice", "bob"]},
  {"env": "dev.b", "cookie": "uid", "values": ["carol"]},
  {"env": "canary", "header": "x-user", "percent": 25},
  {"previewHost": "{env}.preview.example.com"}
]"#;

fn rules() -> &'static EdgeRules {
    static RULES_C: OnceLock<EdgeRules> = OnceLock::new();
    RULES_C.get_or_init(|| {
        let parsed = serde_json::from_str::<Vec<envlane::config::EdgeRule>>(RULES)
            .expect("fixed rules parse");
        EdgeRules::compile(&parsed, Splitter::default()).expect("fixed rules compile")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Addresses: whatever the standard parsers accept is found, with its IP.
    let got = parse_address(text);
    if let Ok(sa) = text.parse::<SocketAddr>() {
        if !text.contains('%') {
            assert_eq!(got, Some(sa.ip()), "{text:?}");
        }
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        assert_eq!(got, Some(ip), "{text:?}");
    }

    // Edge rules: the same text as a user header, a cookie and a host.
    let pairs: [(&[u8], &[u8]); 3] = [
        (b"x-user", data),
        (b"cookie", data),
        (b":authority", data),
    ];
    let wire = HeaderMap::encode(pairs);
    let Some(map) = HeaderMap::parse(&wire) else {
        return;
    };
    if let Some(a) = rules().assign(&map, Splitter::default()) {
        assert!(check_env(&a.env, Splitter::default()).is_ok(), "{a:?}");
        match a.rule {
            0 => assert!(text == "alice" || text == "bob"),
            2 => assert!(percent_bucket(data) < 2500, "{text:?}"),
            1 | 3 => {}
            other => panic!("no rule {other}"),
        }
    }
});
