//! The decision, scenario by scenario, over plain data.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
mod common;

use common::{alibaba, compile, config, subset, MapHeaders};
use envlane::config::{EnvAlias, Mode};
use envlane::decide::{plan, Outcome};
use envlane::table::RoutingTable;

/// (env header, authority) → (outcome, chosen env or None).
#[test]
fn hierarchy_falls_back_level_by_level() {
    let table = compile(&alibaba(Mode::Cluster), "demo", None);
    let cases: &[(Option<&str>, &str, Outcome, Option<&str>)] = &[
        (
            Some("dev.proj1"),
            "node:8080",
            Outcome::Exact,
            Some("dev.proj1"),
        ),
        (Some("dev.proj1"), "go:8080", Outcome::Fallback, Some("dev")),
        (
            Some("dev.proj1"),
            "java:8080",
            Outcome::Exact,
            Some("dev.proj1"),
        ),
        (
            Some("dev.proj1.feature1"),
            "java:8080",
            Outcome::Exact,
            Some("dev.proj1.feature1"),
        ),
        (
            Some("dev.proj1.feature1"),
            "node:8080",
            Outcome::Fallback,
            Some("dev.proj1"),
        ),
        (
            Some("dev.proj1.feature1"),
            "go:8080",
            Outcome::Fallback,
            Some("dev"),
        ),
        (
            Some("dev.proj2"),
            "go:8080",
            Outcome::Exact,
            Some("dev.proj2"),
        ),
        (
            Some("dev.proj2"),
            "java:8080",
            Outcome::Fallback,
            Some("dev"),
        ),
        // Nobody deployed user9: still one level up, not straight to the default.
        (
            Some("dev.proj1.user9"),
            "node:8080",
            Outcome::Fallback,
            Some("dev.proj1"),
        ),
        (
            Some("dev.proj1.user9"),
            "java:8080",
            Outcome::Fallback,
            Some("dev.proj1"),
        ),
        (Some("dev"), "java:8080", Outcome::Exact, Some("dev")),
        (None, "java:8080", Outcome::Default, Some("dev")),
        (Some("prod"), "java:8080", Outcome::Default, Some("dev")),
        (Some("qa.x.y"), "go:8080", Outcome::Default, Some("dev")),
        // Whole levels only.
        (
            Some("dev.proj1x"),
            "node:8080",
            Outcome::Fallback,
            Some("dev"),
        ),
        (
            Some("dev.proj"),
            "node:8080",
            Outcome::Fallback,
            Some("dev"),
        ),
        (Some("devx"), "node:8080", Outcome::Default, Some("dev")),
        // Every way to name the service from namespace demo.
        (Some("dev.proj1"), "node", Outcome::Exact, Some("dev.proj1")),
        (
            Some("dev.proj1"),
            "node.demo:8080",
            Outcome::Exact,
            Some("dev.proj1"),
        ),
        (
            Some("dev.proj1"),
            "node.demo.svc:8080",
            Outcome::Exact,
            Some("dev.proj1"),
        ),
        (
            Some("dev.proj1"),
            "node.demo.svc.cluster.local:8080",
            Outcome::Exact,
            Some("dev.proj1"),
        ),
        (
            Some("dev.proj1"),
            "NODE.Demo.svc.cluster.local.:8080",
            Outcome::Exact,
            Some("dev.proj1"),
        ),
        // Not ours: other host, other port, other namespace's short name.
        (Some("dev.proj1"), "example.com", Outcome::Passthrough, None),
        (Some("dev.proj1"), "node:9090", Outcome::Passthrough, None),
        (
            Some("dev.proj1"),
            "node.other:8080",
            Outcome::Passthrough,
            None,
        ),
        (
            Some("dev.proj1"),
            "node:notaport",
            Outcome::Passthrough,
            None,
        ),
        (Some("dev.proj1"), "[::1]:8080", Outcome::Passthrough, None),
    ];
    for (env, authority, outcome, env_chosen) in cases {
        let mut h = vec![(":authority", *authority)];
        if let Some(e) = env {
            h.push(("x-virtual-env", e));
        }
        let p = plan(&table, &MapHeaders::new(&h));
        let fqdn = authority
            .split(['.', ':'])
            .next()
            .unwrap()
            .to_ascii_lowercase();
        let want = env_chosen
            .map(|e| format!("outbound|8080|{}|{fqdn}.demo.svc.cluster.local", subset(e)));
        assert_eq!(
            (p.outcome, p.route_to_cluster.map(str::to_string)),
            (*outcome, want),
            "{env:?} {authority}"
        );
        assert_eq!(p.rewrite_authority, None);
    }
}

#[test]
fn whole_segments_never_prefix_match() {
    let cfg = config(
        &[(
            "svc.ns.svc.cluster.local",
            80,
            &["dev-feature1", "dev.proj-ab", "dev"],
        )],
        None,
    );
    let table = compile(&cfg, "ns", None);
    let cases = [
        ("dev-feature10", None),
        ("dev-feature1", Some("dev-feature1")),
        ("dev.proj-abc", Some("dev")),
        ("dev.proj-ab", Some("dev.proj-ab")),
        ("dev.proj-ab.x", Some("dev.proj-ab")),
    ];
    for (env, want) in cases {
        let p = plan(
            &table,
            &MapHeaders::new(&[(":authority", "svc"), ("x-virtual-env", env)]),
        );
        let want = want.map(|e| format!("outbound|80|{}|svc.ns.svc.cluster.local", subset(e)));
        assert_eq!(p.route_to_cluster.map(str::to_string), want, "{env}");
    }
}

#[test]
fn env_sources_in_order_and_invalid_values_skipped() {
    let mut cfg = alibaba(Mode::Cluster);
    cfg.debug = true;
    cfg.baggage_key = Some("lane".into());
    cfg.env_aliases = vec![
        EnvAlias {
            header: Some("X-Lane".into()),
            cookie: None,
        },
        EnvAlias {
            header: None,
            cookie: Some("VirtualEnv".into()),
        },
    ];
    let table = compile(&cfg, "demo", Some("dev.proj2"));
    // (headers, chosen env, source, invalid counted, injected)
    type Case<'a> = (
        &'a [(&'a str, &'a str)],
        &'a str,
        &'a str,
        bool,
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        (
            &[("x-virtual-env", "dev.proj1"), ("baggage", "lane=dev")],
            "dev.proj1",
            "header",
            false,
            None,
        ),
        (
            &[("baggage", "a=b, lane=dev.proj1;p=1")],
            "dev.proj1",
            "baggage",
            false,
            None,
        ),
        (
            &[("baggage", "a=b"), ("baggage", "lane=dev%2Eproj1")],
            "dev.proj1",
            "baggage",
            false,
            None,
        ),
        (
            &[("x-lane", "dev.proj1"), ("cookie", "VirtualEnv=dev")],
            "dev.proj1",
            "alias",
            false,
            None,
        ),
        (
            &[("cookie", "x=1; VirtualEnv=dev.proj1")],
            "dev.proj1",
            "alias",
            false,
            None,
        ),
        (&[], "dev.proj2", "label", false, Some("dev.proj2")),
        (
            &[("x-virtual-env", "dev..proj1")],
            "dev.proj2",
            "label",
            true,
            None,
        ),
        (
            &[
                ("x-virtual-env", "bad value"),
                ("baggage", "lane=dev.proj1"),
            ],
            "dev.proj1",
            "baggage",
            true,
            None,
        ),
        (
            &[("baggage", "lane=a/b"), ("x-lane", "dev.proj1")],
            "dev.proj1",
            "alias",
            true,
            None,
        ),
        (&[("x-virtual-env", "")], "dev.proj2", "label", true, None),
    ];
    for (headers, env, source, invalid, inject) in cases {
        let mut h = vec![(":authority", "go:8080"), ("x-envlane-debug", "1")];
        h.extend_from_slice(headers);
        let p = plan(&table, &MapHeaders::new(&h));
        let why = p.explanation.clone().unwrap();
        assert!(
            why.starts_with(&format!("env={env}; source={source};")),
            "{headers:?}: {why}"
        );
        assert_eq!(p.invalid_env, *invalid, "{headers:?}");
        assert_eq!(p.inject_env.as_deref(), *inject, "{headers:?}");
    }
}

#[test]
fn auto_inject_only_from_label_and_never_over_a_header() {
    let cfg = alibaba(Mode::Cluster);
    let labelled = compile(&cfg, "demo", Some("dev.proj1"));
    let p = plan(&labelled, &MapHeaders::new(&[(":authority", "java:8080")]));
    assert_eq!(p.inject_env.as_deref(), Some("dev.proj1"));
    assert_eq!(p.outcome, Outcome::Exact);
    // Injected even when the service is not in the table: the next hop needs it.
    let p = plan(
        &labelled,
        &MapHeaders::new(&[(":authority", "example.com")]),
    );
    assert_eq!(
        (p.inject_env.as_deref(), p.outcome),
        (Some("dev.proj1"), Outcome::Passthrough)
    );
    // An invalid header is still a header: not overwritten.
    let p = plan(
        &labelled,
        &MapHeaders::new(&[(":authority", "java:8080"), ("x-virtual-env", "x y")]),
    );
    assert_eq!((p.inject_env, p.invalid_env), (None, true));
    // Label value that is not a valid env: no own env at all.
    let bad = compile(&cfg, "demo", Some("dev/x"));
    let p = plan(&bad, &MapHeaders::new(&[(":authority", "java:8080")]));
    assert_eq!((p.inject_env, p.outcome), (None, Outcome::Default));
    let mut off = cfg.clone();
    off.auto_inject = false;
    let off = compile(&off, "demo", Some("dev.proj1"));
    let p = plan(&off, &MapHeaders::new(&[(":authority", "java:8080")]));
    assert_eq!((p.inject_env, p.outcome), (None, Outcome::Exact));
}

/// No request header names a cluster: whatever a client sends, the target
/// is one of the table's, chosen by env.
#[test]
fn no_header_names_a_cluster() {
    let table = compile(&alibaba(Mode::Cluster), "demo", None);
    let spoof = "outbound|8080|secret|payments.prod.svc.cluster.local";
    for authority in ["java:8080", "example.com"] {
        let p = plan(
            &table,
            &MapHeaders::new(&[
                (":authority", authority),
                ("x-envlane-cluster", spoof),
                ("x-envoy-original-dst-host", spoof),
            ]),
        );
        assert_ne!(p.route_to_cluster, Some(spoof));
        if authority == "example.com" {
            assert!(!p.reroutes());
        }
    }
}

#[test]
fn host_mode_rewrites_authority_and_keeps_the_port() {
    let table = compile(&alibaba(Mode::Host), "demo", None);
    let cases = [
        (
            "dev.proj1",
            "node:8080",
            Some(format!(
                "node-{}.demo.svc.cluster.local:8080",
                subset("dev.proj1")
            )),
        ),
        (
            "dev.proj2",
            "go",
            Some(format!("go-{}.demo.svc.cluster.local", subset("dev.proj2"))),
        ),
        (
            "dev.proj2",
            "java.demo:8080",
            Some("java-dev.demo.svc.cluster.local:8080".to_string()),
        ),
        ("dev", "example.com", None),
    ];
    for (env, authority, want) in cases {
        let p = plan(
            &table,
            &MapHeaders::new(&[(":authority", authority), ("x-virtual-env", env)]),
        );
        assert_eq!(p.rewrite_authority, want, "{env} {authority}");
        assert_eq!(p.route_to_cluster, None);
    }
}

#[test]
fn multi_port_services_pick_the_port_of_the_request() {
    let mut cfg = config(
        &[("api.ns.svc.cluster.local", 8080, &["dev", "dev.a"])],
        Some("dev"),
    );
    cfg.services[0].ports = vec![9090, 80, 8080];
    let table = compile(&cfg, "ns", None);
    let cases = [
        ("api:9090", Some(9090)),
        ("api", Some(80)),
        ("api:8080", Some(8080)),
        ("api:1", None),
        // Ports are ASCII digits only: no sign, no leading zero, no blanks.
        ("api:+8080", None),
        ("api:08080", None),
        ("api:0", None),
        ("api:65616", None),
        ("api:8080 ", None),
        ("api: 8080", None),
        ("api:", None),
        ("api:\u{663}", None),
    ];
    for (authority, port) in cases {
        let p = plan(
            &table,
            &MapHeaders::new(&[(":authority", authority), ("x-virtual-env", "dev.a.b")]),
        );
        let want =
            port.map(|p| format!("outbound|{p}|{}|api.ns.svc.cluster.local", subset("dev.a")));
        assert_eq!(p.route_to_cluster.map(str::to_string), want, "{authority}");
    }
}

#[test]
fn no_default_and_no_match_leaves_the_request_alone() {
    let cfg = config(&[("a.ns.svc.cluster.local", 80, &["dev.x"])], None);
    let table = compile(&cfg, "ns", None);
    let p = plan(
        &table,
        &MapHeaders::new(&[(":authority", "a"), ("x-virtual-env", "dev.y")]),
    );
    assert_eq!(p.outcome, Outcome::Passthrough);
    assert!(!p.reroutes());
}

#[test]
fn debug_explanation_names_env_chain_and_target() {
    let quiet = compile(&alibaba(Mode::Cluster), "demo", None);
    let asked = MapHeaders::new(&[(":authority", "go:8080"), ("x-envlane-debug", "1")]);
    assert_eq!(
        plan(&quiet, &asked).explanation,
        None,
        "explanations are off unless the config turns them on"
    );
    let mut cfg = alibaba(Mode::Cluster);
    cfg.debug = true;
    let table = compile(&cfg, "demo", None);
    let p = plan(
        &table,
        &MapHeaders::new(&[
            (":authority", "go:8080"),
            ("x-virtual-env", "dev.proj1.user9"),
            ("x-envlane-debug", "1"),
        ]),
    );
    assert_eq!(
        p.explanation.as_deref(),
        Some("env=dev.proj1.user9; source=header; service=go.demo.svc.cluster.local; tried=dev.proj1.user9,dev.proj1,dev; outcome=fallback; target=outbound|8080|dev|go.demo.svc.cluster.local")
    );
    let p = plan(
        &table,
        &MapHeaders::new(&[
            (":authority", "go:8080"),
            ("x-virtual-env", "qa"),
            ("x-envlane-debug", "1"),
        ]),
    );
    assert_eq!(
        p.explanation.as_deref(),
        Some("env=qa; source=header; service=go.demo.svc.cluster.local; tried=qa,default:dev; outcome=default; target=outbound|8080|dev|go.demo.svc.cluster.local")
    );
    let p = plan(
        &table,
        &MapHeaders::new(&[(":authority", "go:8080"), ("x-virtual-env", "q\u{7f}")]),
    );
    assert_eq!(p.explanation, None, "no debug header, no explanation");
}

/// Issue 15: `outcome=passthrough` did not say why. Every passthrough now
/// names its reason.
#[test]
fn every_passthrough_says_why() {
    let mut cfg = alibaba(Mode::Cluster);
    cfg.debug = true;
    let with_default = compile(&cfg, "demo", None);
    cfg.default_env = None;
    let without_default = compile(&cfg, "demo", None);
    cfg.default_env = Some("dev.proj1".into());
    let default_elsewhere = compile(&cfg, "demo", None);
    // (table, request headers, the reason the explanation ends with)
    type Case<'a> = (&'a RoutingTable, &'a [(&'a str, &'a str)], &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            &with_default,
            &[("x-virtual-env", "dev")],
            "why=no-authority",
        ),
        (
            &with_default,
            &[(":authority", "php:8080")],
            "why=host-not-in-table",
        ),
        (
            &with_default,
            &[(":authority", "go:9999")],
            "why=port-not-in-table",
        ),
        (
            &without_default,
            &[(":authority", "go:8080")],
            "why=no-env-and-no-default-env",
        ),
        (
            &without_default,
            &[(":authority", "go:8080"), ("x-virtual-env", "qa")],
            "why=env-not-deployed-and-no-default-env",
        ),
        (
            &default_elsewhere,
            &[(":authority", "go:8080")],
            "why=default-env-not-deployed",
        ),
    ];
    for (table, headers, why) in cases {
        let mut headers = headers.to_vec();
        headers.push(("x-envlane-debug", "1"));
        let p = plan(table, &MapHeaders::new(&headers));
        assert_eq!(p.outcome, Outcome::Passthrough, "{headers:?}");
        let line = p.explanation.unwrap_or_default();
        assert!(line.ends_with(why), "{headers:?}: {line}");
    }
    // Not a passthrough: no reason.
    let p = plan(
        &with_default,
        &MapHeaders::new(&[(":authority", "go:8080"), ("x-envlane-debug", "1")]),
    );
    assert!(!p.explanation.unwrap_or_default().contains("why="));
}

/// Header bytes that are not UTF-8 (HTTP/1.1 allows obs-text): an env value
/// is refused and counted, other sources still apply, nothing panics.
#[test]
fn values_that_are_not_utf8() {
    let mut cfg = alibaba(Mode::Cluster);
    cfg.baggage_key = Some("lane".into());
    let table = compile(&cfg, "demo", Some("dev.proj2"));
    // (headers, outcome, env chosen, invalid counted, injected)
    type Case<'a> = (
        &'a [(&'a str, &'a [u8])],
        Outcome,
        &'a str,
        bool,
        Option<&'a str>,
    );
    let cases: &[Case] = &[
        (
            &[
                (":authority", b"go:8080"),
                ("x-virtual-env", b"dev\xff.proj1"),
            ],
            // Refused; the pod's own env applies, the header is left alone.
            Outcome::Exact,
            "dev.proj2",
            true,
            None,
        ),
        (
            &[
                (":authority", b"go:8080"),
                ("x-virtual-env", b"\xc3"),
                ("baggage", b"lane=dev.proj2"),
            ],
            Outcome::Exact,
            "dev.proj2",
            true,
            None,
        ),
        // A broken baggage header is skipped; the next one still counts.
        (
            &[
                (":authority", b"go:8080"),
                ("baggage", b"lane=\xff"),
                ("baggage", b"lane=dev.proj2"),
            ],
            Outcome::Exact,
            "dev.proj2",
            false,
            None,
        ),
        // An authority that is not text names no service.
        (
            &[(":authority", b"go\xff:8080")],
            Outcome::Passthrough,
            "-",
            false,
            Some("dev.proj2"),
        ),
    ];
    for (headers, outcome, env, invalid, injected) in cases {
        let p = plan(&table, &MapHeaders::raw(headers));
        let chosen = p
            .route_to_cluster
            .map(|c| c.split('|').nth(2).unwrap_or_default().to_string())
            .unwrap_or_else(|| "-".into());
        let want = if *env == "-" { "-".into() } else { subset(env) };
        assert_eq!(
            (p.outcome, chosen, p.invalid_env, p.inject_env.as_deref()),
            (*outcome, want, *invalid, *injected),
            "{headers:?}"
        );
    }
}

#[test]
fn a_waypoint_filter_chain_names_its_service_port() {
    use envlane::decide::waypoint_destination;
    for (chain, want) in [
        (
            "inbound-vip|8080|http|go.demo.svc.cluster.local",
            Some("go.demo.svc.cluster.local:8080"),
        ),
        (
            "inbound-vip|80|http2|a.b.svc.cluster.local",
            Some("a.b.svc.cluster.local:80"),
        ),
        ("inbound|8080|http|go.demo.svc.cluster.local", None),
        ("inbound-vip|0x50|http|go", None),
        ("inbound-vip|8080|http|", None),
        ("inbound-vip|8080|http|go|x", None),
        ("0.0.0.0_8080", None),
        ("", None),
    ] {
        assert_eq!(waypoint_destination(chain).as_deref(), want, "{chain}");
    }
}
