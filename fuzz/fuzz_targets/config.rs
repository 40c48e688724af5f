//! The plugin config: `config::parse`, `RoutingTable::compile`, and the
//! lookups over a compiled table (`service`, `target`, `decide::resolve`,
//! `decide::plan`), checked against the documented rules.
//!
//! Input: the config JSON. The caller's node (namespace, env label) is
//! derived from a hash of the input.
#![no_main]

use envlane::config::{parse, Mode, PluginConfig};
use envlane::decide::{plan, resolve, Headers, Outcome};
use envlane::names::{check_env, fnv1a64, Chain, EnvName, ServiceHost, Splitter, SubsetName};
use envlane::table::{endpoint_cluster, socket_address, Node, RoutingTable};
use libfuzzer_sys::fuzz_target;

/// Bounds on the lookups per input, so a config with many entries stays fast.
const MAX_SERVICES_CHECKED: usize = 8;
const MAX_PORTS_CHECKED: usize = 6;
const MAX_ENVS_CHECKED: usize = 12;

/// Request headers as a list (names lower-case).
struct Hs(Vec<(String, Vec<u8>)>);

impl Headers for Hs {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// `name.namespace.svc.<domain>` → (name, namespace).
fn fqdn_parts<'a>(host: &'a str, domain: &str) -> Option<(&'a str, &'a str)> {
    let rest = host.strip_suffix(domain)?.strip_suffix(".svc.")?;
    let (name, ns) = rest.split_once('.')?;
    (!ns.contains('.')).then_some((name, ns))
}

fn node_for(data: &[u8], cfg: &PluginConfig) -> Node {
    let h = fnv1a64(data);
    let first_ns = cfg
        .services
        .first()
        .and_then(|s| fqdn_parts(&s.host, &cfg.cluster_domain))
        .map(|(_, ns)| ns.to_string());
    let namespace = match h % 3 {
        0 => None,
        1 => Some("ns".to_string()),
        _ => first_ns.or_else(|| Some("ns".to_string())),
    };
    let first_env = cfg.envs.first().map(|e| e.name.clone());
    let env_label = match (h >> 8) % 4 {
        0 => None,
        1 => first_env,
        2 => first_env.map(|e| format!("{e}{}x", cfg.splitter)),
        _ => Some("not a valid env!".to_string()),
    };
    Node {
        namespace,
        env_label,
    }
}

/// A field the committed schema may not have yet (`edge`, `debug`), read
/// from the serialized config so the target builds either way.
fn flag(cfg: &PluginConfig, field: &str) -> bool {
    serde_json::to_value(cfg)
        .ok()
        .and_then(|v| v.get(field).and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

fuzz_target!(|data: &[u8]| {
    let cfg = match parse(data) {
        Ok(cfg) => cfg,
        Err(e) => {
            assert!(!e.field.is_empty());
            assert!(
                e.to_string().starts_with("invalid envlane config: field `"),
                "{e}"
            );
            return;
        }
    };

    // What parses serializes back to the same config.
    let json = serde_json::to_vec(&cfg).expect("a config serializes");
    let again = parse(&json).unwrap_or_else(|e| {
        panic!(
            "re-serialized config refused: {e}\n{}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(again, cfg, "round trip");

    let node = node_for(data, &cfg);
    let table = match RoutingTable::compile(&cfg, &node) {
        Ok(t) => t,
        Err(e) => {
            assert!(!e.field.is_empty());
            assert!(e.to_string().starts_with("invalid envlane config: field `"));
            return;
        }
    };
    check_table(&cfg, &node, &table);
});

fn check_table(cfg: &PluginConfig, node: &Node, table: &RoutingTable) {
    let s = &table.settings;
    let splitter = Splitter::try_new(&cfg.splitter).expect("compile checked the splitter");
    assert_eq!(s.splitter, splitter);
    assert_eq!(s.mode, cfg.mode);
    assert_eq!(s.auto_inject, cfg.auto_inject);
    assert_eq!(&*s.env_header, cfg.env_header.to_ascii_lowercase());
    assert_eq!(s.debug, cfg.debug);
    assert_eq!(s.edge, cfg.edge);

    // The caller's own env: the label when it is a valid env, else none.
    let want_own = node
        .env_label
        .as_deref()
        .filter(|v| check_env(v, splitter).is_ok());
    assert_eq!(s.own_env.as_ref().map(EnvName::as_str), want_own);

    // Counts and env ids.
    assert_eq!(table.service_count(), cfg.services.len());
    let pairs: usize = cfg.services.iter().map(|s| s.envs.len()).sum();
    assert_eq!(table.pair_count(), pairs);
    let mut subsets = Vec::new();
    for (k, e) in cfg.envs.iter().enumerate() {
        let id = u32::try_from(k).expect("small");
        assert_eq!(table.env_id(&e.name), Some(id));
        assert_eq!(
            table.env_name(id).map(EnvName::as_str),
            Some(e.name.as_str())
        );
        let name = EnvName::try_new(&e.name, splitter).expect("compile checked env names");
        let subset = match &e.subset {
            Some(sub) => sub.clone(),
            None => SubsetName::for_env(&name).as_str().to_string(),
        };
        assert!(SubsetName::try_new(&subset).is_ok());
        subsets.push(subset);
    }
    assert_eq!(
        table.env_name(u32::try_from(cfg.envs.len()).expect("small")),
        None
    );
    let want_default = cfg.default_env.as_deref().and_then(|d| table.env_id(d));
    assert_eq!(table.default_env(), want_default);

    let edge = flag(cfg, "edge");

    for (i, entry) in cfg.services.iter().enumerate().take(MAX_SERVICES_CHECKED) {
        let host = entry.host.as_str();
        assert!(ServiceHost::try_new(host).is_ok());
        let mut ports = entry.ports.clone();
        ports.sort_unstable();
        ports.dedup();

        // No port: HTTP's 80 if listed, else the only port.
        let bare = table.service(host);
        let bare_ok = ports.contains(&80) || ports.len() == 1;
        assert_eq!(bare.is_some(), bare_ok, "{host} without a port");
        if let Some(b) = bare {
            assert_eq!(b.fqdn(), host);
        }
        // A port the service does not have.
        if let Some(q) = [1u16, 80, 443, 8080, 65535]
            .into_iter()
            .find(|q| !ports.contains(q))
        {
            assert!(
                table.service(&format!("{host}:{q}")).is_none(),
                "{host}:{q}"
            );
        }

        for &p in ports.iter().take(MAX_PORTS_CHECKED) {
            let authority = format!("{host}:{p}");
            let svc = table
                .service(&authority)
                .unwrap_or_else(|| panic!("{authority} not found"));
            assert_eq!(svc.fqdn(), host);
            // Case and a trailing dot do not matter.
            let upper = format!("{}.:{p}", host.to_ascii_uppercase());
            assert_eq!(
                table.service(&upper).map(|s| s.fqdn()),
                Some(host),
                "{upper}"
            );

            // Targets: one per env of the service, none for the others.
            for (k, subset) in subsets.iter().enumerate().take(MAX_ENVS_CHECKED) {
                let id = u32::try_from(k).expect("small");
                let has = entry.envs.contains(&id);
                let target = svc.target(id);
                assert_eq!(target.is_some(), has, "{authority} env {k}");
                if let Some(t) = target {
                    match cfg.mode {
                        Mode::Cluster => {
                            assert_eq!(t, format!("outbound|{p}|{subset}|{host}"));
                        }
                        Mode::Host => {
                            assert!(ServiceHost::try_new(t).is_ok(), "{t}");
                            assert!(t.contains(subset.as_str()), "{t} lacks {subset}");
                        }
                        Mode::Endpoint => {
                            assert_eq!(t, endpoint_cluster(p, host));
                            // Every pick is one of the env's addresses on
                            // the port's target port.
                            let j = entry.envs.iter().position(|&e| e == id).expect("has");
                            let ips: Vec<_> = entry.endpoints.get(j).expect("an env's pods").collect();
                            let n = svc.endpoint_count(id);
                            assert_eq!(n, ips.len());
                            let slot = entry.ports.iter().position(|&q| q == p).expect("port");
                            let tp = entry.target_ports.get(slot).copied().unwrap_or(p);
                            for pick in [0u32, 1, 7, u32::MAX] {
                                let addr = svc.endpoint(id, pick).expect("an endpoint");
                                let want = socket_address(&ips[pick as usize % n], tp);
                                assert_eq!(addr, want);
                            }
                        }
                    }
                }
            }

            // Resolution, against the documented walk.
            let none = resolve(table, None, &svc);
            assert_eq!(none.levels_tried, 0);
            match table.default_env().and_then(|d| svc.target(d)) {
                Some(t) => assert_eq!((none.outcome, none.target), (Outcome::Default, Some(t))),
                None => assert_eq!((none.outcome, none.target), (Outcome::Passthrough, None)),
            }
            let names = cfg.envs.iter().map(|e| e.name.clone());
            let label = node.env_label.iter().cloned();
            for env in names.take(MAX_ENVS_CHECKED).chain(label) {
                if check_env(&env, splitter).is_err() {
                    continue;
                }
                let r = resolve(table, Some(&env), &svc);
                let hit = Chain::new(&env, splitter)
                    .enumerate()
                    .find_map(|(depth, level)| {
                        let t = table.env_id(level).and_then(|id| svc.target(id))?;
                        Some((depth, t))
                    });
                match hit {
                    Some((0, t)) => {
                        assert_eq!(
                            (r.outcome, r.target, r.levels_tried),
                            (Outcome::Exact, Some(t), 1)
                        );
                    }
                    Some((depth, t)) => {
                        assert_eq!(
                            (r.outcome, r.target, r.levels_tried),
                            (Outcome::Fallback, Some(t), depth + 1)
                        );
                    }
                    None => {
                        let levels = check_env(&env, splitter).expect("checked");
                        assert_eq!(r.levels_tried, levels);
                        assert_eq!((r.outcome, r.target), (none.outcome, none.target));
                    }
                }

                // The whole decision for a request with this env agrees.
                if edge {
                    continue;
                }
                let headers = Hs(vec![
                    (":authority".into(), authority.clone().into_bytes()),
                    (s.env_header.to_string(), env.clone().into_bytes()),
                ]);
                let p_ = plan(table, &headers);
                assert_eq!(p_.outcome, r.outcome, "{authority} env {env}");
                assert!(!p_.invalid_env);
                assert_eq!(p_.inject_env, None, "env header present: no inject");
                match cfg.mode {
                    Mode::Cluster => {
                        assert_eq!(p_.route_to_cluster, r.target);
                        assert_eq!(p_.rewrite_authority, None);
                    }
                    Mode::Host => {
                        assert_eq!(p_.route_to_cluster, None);
                        assert_eq!(p_.rewrite_authority, r.target.map(|t| format!("{t}:{p}")));
                    }
                    Mode::Endpoint => {
                        assert_eq!(p_.route_to_cluster, r.target);
                        assert_eq!(p_.rewrite_authority, None);
                        assert_eq!(p_.original_dst.is_some(), r.target.is_some());
                    }
                }
            }
        }

        // Short names of a Kubernetes service: `name.ns.svc`, `name.ns`, and
        // `name` in the caller's namespace. A lookup by any name finds that
        // exact host or a service whose host extends it by whole labels.
        let mut tried = vec![host.to_string()];
        if let Some((name, ns)) = fqdn_parts(host, &cfg.cluster_domain) {
            tried.push(format!("{name}.{ns}.svc"));
            tried.push(format!("{name}.{ns}"));
            tried.push(name.to_string());
            for short in &tried[1..] {
                let extended = |h: &str| h == short || h.starts_with(&format!("{short}."));
                let owners: Vec<usize> = cfg
                    .services
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| extended(&s.host))
                    .map(|(j, _)| j)
                    .collect();
                let same_ns = node.namespace.as_deref() == Some(ns);
                for &p in ports.iter().take(2) {
                    let found = table.service(&format!("{short}:{p}"));
                    if let Some(f) = found {
                        assert!(extended(f.fqdn()), "{short}:{p} -> {}", f.fqdn());
                    }
                    let is_bare_name = !short.contains('.');
                    if owners == [i] && (!is_bare_name || same_ns) {
                        // Only this service can own the name.
                        assert_eq!(found.map(|f| f.fqdn()), Some(host), "{short}:{p}");
                    }
                    if is_bare_name && node.namespace.is_none() {
                        // No namespace: a bare name is only ever a full host.
                        if let Some(f) = found {
                            assert_eq!(f.fqdn(), short.as_str());
                        }
                    }
                }
            }
        }
    }
}
