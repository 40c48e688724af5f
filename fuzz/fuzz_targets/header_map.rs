//! proxy-wasm's serialized header map: `wire::HeaderMap::parse`, `pairs()`,
//! lookups through the `decide::Headers` trait, and the whole decision
//! (`decide::plan`) over the parsed map on two small fixed tables.
//!
//! Byte 0 picks the mode, the rest is the payload:
//! - even: raw mode, the payload is a serialized map (`u32 LE count`,
//!   `count` x (`u32 name_len`, `u32 value_len`), then each name and value
//!   followed by NUL), checked against a plain model of that layout;
//! - odd: structured mode, the payload is a list of pairs
//!   (`[n][n bytes name][m][m bytes value]`..., a length byte >= 0xF0 names a
//!   well-known header instead) which is encoded, parsed back and compared.
#![no_main]

use std::sync::OnceLock;

use envlane::config::{parse, Mode};
use envlane::decide::{find_env, plan, Headers, NoCaller, Outcome, Source};
use envlane::edge::{edge_plan, Rewrite};
use envlane::sources::{baggage_value, cookie_value};
use envlane::names::check_env;
use envlane::table::{Node, RoutingTable};
use envlane::wire::HeaderMap;
use libfuzzer_sys::fuzz_target;

const WELL_KNOWN: &[&str] = &[
    ":authority",
    "x-virtual-env",
    "baggage",
    "cookie",
    "x-lane",
    "x-envlane-debug",
    "x-envlane-cluster",
    ":path",
];

const CLUSTER: &str = r#"{
  "baggageKey": "lane",
  "envAliases": [{"header": "x-lane"}, {"cookie": "VirtualEnv"}],
  "defaultEnv": "dev",
  "envs": [{"name": "dev"}, {"name": "dev.a"}, {"name": "dev.a.b"}, {"name": "main"}],
  "services": [
    {"host": "go.demo.svc.cluster.local", "ports": [80, 8080], "envs": [0, 1, 2]},
    {"host": "web.demo.svc.cluster.local", "ports": [9090], "envs": [1, 3]}
  ]
}"#;

fn tables() -> &'static [RoutingTable; 2] {
    static TABLES: OnceLock<[RoutingTable; 2]> = OnceLock::new();
    TABLES.get_or_init(|| {
        let node = Node {
            namespace: Some("demo".into()),
            env_label: Some("dev.a".into()),
        };
        let cluster = parse(CLUSTER.as_bytes()).expect("fixed config parses");
        let mut host = cluster.clone();
        host.mode = Mode::Host;
        [
            RoutingTable::compile(&cluster, &node).expect("cluster table"),
            RoutingTable::compile(&host, &node).expect("host table"),
        ]
    })
}

fn u32_at(b: &[u8], at: usize) -> Option<u64> {
    let w: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u64::from(u32::from_le_bytes(w)))
}

/// The layout, as a model: `Some(pairs)` when `bytes` is a map whose lengths
/// add up exactly, with the offsets of each name and value.
#[allow(clippy::type_complexity)]
fn model(bytes: &[u8]) -> Option<Vec<((usize, usize), (usize, usize))>> {
    if bytes.is_empty() {
        return Some(Vec::new());
    }
    let count = u32_at(bytes, 0)?;
    let table_end = 4 + 8 * count;
    if (bytes.len() as u64) < table_end {
        return None;
    }
    let mut at = table_end;
    let mut out = Vec::new();
    for i in 0..count {
        let name = u32_at(bytes, 4 + 8 * i as usize)?;
        let value = u32_at(bytes, 8 + 8 * i as usize)?;
        out.push((
            (at as usize, name as usize),
            ((at + name + 1) as usize, value as usize),
        ));
        at += name + value + 2;
    }
    (at == bytes.len() as u64).then_some(out)
}

/// Lookups through the trait agree with a scan of `pairs()`, for every
/// UTF-8 name present and the well-known ones.
fn check_lookups(map: &HeaderMap<'_>, pairs: &[(&[u8], &[u8])]) {
    let names: std::collections::BTreeSet<&str> = pairs
        .iter()
        .filter_map(|(n, _)| std::str::from_utf8(n).ok())
        .chain(WELL_KNOWN.iter().copied())
        .collect();
    for name in names {
        let want: Vec<&[u8]> = pairs
            .iter()
            .filter(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| *v)
            .collect();
        let got: Vec<&[u8]> = map.values(name).collect();
        assert_eq!(got, want, "values({name:?})");
        let got: Vec<&[u8]> = map.values_of(name).collect();
        assert_eq!(got, want, "values_of({name:?})");
    }
}

/// The decision over this map, on both tables.
fn check_plan(map: &HeaderMap<'_>) {
    for table in tables() {
        let s = &table.settings;
        let p = plan(table, map);
        // Explained only when asked (and, where the config has `debug`, on).
        let debug = map.values(&s.debug_header).next().is_some();
        assert!(debug || p.explanation.is_none());
        if let Some(e) = &p.explanation {
            // It goes out as a response header: printable ASCII only.
            assert!(e.bytes().all(|b| (0x20..0x7f).contains(&b)), "{e:?}");
            assert!(
                e.contains(&format!("outcome={}", p.outcome.as_str())),
                "{e}"
            );
        }
        let routed = p.outcome != Outcome::Passthrough;
        match s.mode {
            Mode::Cluster => {
                assert!(p.rewrite_authority.is_none());
                assert_eq!(p.route_to_cluster.is_some(), routed);
                if let Some(c) = p.route_to_cluster {
                    assert!(c.starts_with("outbound|"), "{c}");
                }
            }
            Mode::Host => {
                assert!(p.route_to_cluster.is_none());
                assert_eq!(p.rewrite_authority.is_some(), routed);
            }            Mode::Endpoint => {
                assert!(p.rewrite_authority.is_none());
                assert_eq!(p.route_to_cluster.is_some(), routed);
                assert_eq!(p.original_dst.is_some(), routed);
            }
        }
        let found = find_env(table, map, &NoCaller);
        assert_eq!(p.invalid_env, found.invalid.is_some());
        let header_present = map.values(&s.env_header).next().is_some();
        assert_eq!(found.env_header_present, header_present);
        if let Some(inject) = &p.inject_env {
            assert!(!header_present);
            assert_eq!(inject, "dev.a");
            assert!(matches!(found.env, Some((_, Source::Label))));
        }
        if let Some((env, source)) = &found.env {
            assert!(
                check_env(env, s.splitter).is_ok(),
                "{env:?} from {source:?}"
            );
        }
        // A valid env header always wins.
        if let Some(v) = map.values(&s.env_header).next() {
            if let Ok(v) = std::str::from_utf8(v) {
                if check_env(v, s.splitter).is_ok() {
                    let (env, source) = found.env.as_ref().expect("header env");
                    assert_eq!((env.as_ref(), *source), (v, Source::Header));
                }
            }
        }
        assert_eq!(p.reroutes(), p.route_to_cluster.is_some() || p.rewrite_authority.is_some() || p.inject_env.is_some());
        check_edge(table, map);
    }
}

/// Edge hygiene over this map: every header it removes is present, and the
/// rewritten baggage/cookie no longer carries the env.
fn check_edge(table: &RoutingTable, map: &HeaderMap<'_>) {
    let s = &table.settings;
    let e = edge_plan(table, map);
    for name in &e.remove {
        assert!(map.values(name).next().is_some(), "{name}");
    }
    if let (Some(key), Rewrite::Set(v)) = (&s.baggage_key, &e.baggage) {
        assert!(baggage_value([v.as_str()], key).is_none(), "{v}");
    }
    if let Rewrite::Set(v) = &e.cookie {
        assert!(cookie_value([v.as_str()], "VirtualEnv").is_none(), "{v}");
    }
}

fn raw(payload: &[u8]) {
    let parsed = HeaderMap::parse(payload);
    let modelled = model(payload);
    assert_eq!(parsed.is_some(), modelled.is_some(), "parse vs model");
    let (Some(map), Some(offsets)) = (parsed, modelled) else {
        return;
    };
    let pairs: Vec<(&[u8], &[u8])> = map.pairs().collect();
    assert_eq!(pairs.len(), offsets.len());
    for ((name, value), ((n_at, n_len), (v_at, v_len))) in pairs.iter().zip(&offsets) {
        assert_eq!(*name, &payload[*n_at..n_at + n_len]);
        assert_eq!(*value, &payload[*v_at..v_at + v_len]);
        // Borrowed in place, not copied.
        assert_eq!(name.as_ptr(), payload[*n_at..].as_ptr());
    }
    // Re-encoding gives the input back, except that parse does not insist on
    // the NUL after each name and value: those bytes are compared as NUL.
    let again = HeaderMap::encode(pairs.iter().copied());
    if payload.is_empty() {
        // The empty buffer is the empty map; it encodes as count 0.
        assert_eq!(again, 0u32.to_le_bytes());
    } else {
        let mut expected = payload.to_vec();
        for ((n_at, n_len), (v_at, v_len)) in &offsets {
            expected[n_at + n_len] = 0;
            expected[v_at + v_len] = 0;
        }
        assert_eq!(again, expected);
    }
    check_lookups(&map, &pairs);
    check_plan(&map);
}

fn structured(payload: &[u8]) {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut rest = payload;
    let take = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        let (&n, tail) = rest.split_first()?;
        if n >= 0xF0 {
            *rest = tail;
            let name = WELL_KNOWN[usize::from(n - 0xF0) % WELL_KNOWN.len()];
            return Some(name.as_bytes().to_vec());
        }
        let n = usize::from(n).min(tail.len());
        let (field, tail) = tail.split_at(n);
        *rest = tail;
        Some(field.to_vec())
    };
    while let Some(name) = take(&mut rest) {
        let value = take(&mut rest).unwrap_or_default();
        pairs.push((name, value));
    }
    let borrowed: Vec<(&[u8], &[u8])> = pairs
        .iter()
        .map(|(n, v)| (n.as_slice(), v.as_slice()))
        .collect();
    let bytes = HeaderMap::encode(borrowed.iter().copied());
    let map = HeaderMap::parse(&bytes).expect("an encoded map parses");
    let back: Vec<(&[u8], &[u8])> = map.pairs().collect();
    assert_eq!(back, borrowed, "round trip");
    assert_eq!(HeaderMap::encode(back.iter().copied()), bytes);
    // Any truncation of a non-empty map, or one more byte, is refused.
    if !bytes.is_empty() {
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            if cut > 0 {
                assert!(HeaderMap::parse(&bytes[..cut]).is_none(), "cut at {cut}");
            }
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(HeaderMap::parse(&longer).is_none());
    }
    check_lookups(&map, &borrowed);
    check_plan(&map);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        raw(payload);
    } else {
        structured(payload);
    }
});
