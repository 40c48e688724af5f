//! What an operator asks of a table, answered with the filter's own code:
//! the table in human terms, and where a request goes and why. Pure.

use std::fmt::Write as _;

use envlane::config::{Mode, PluginConfig};
use envlane::decide::{self, find_env, Headers, Outcome};
use envlane::names::Chain;
use envlane::table::{split_authority, Node, RoutingTable};

/// The table as text: settings that decide routing, then each service with
/// its ports and envs by name (the config names envs by index).
pub fn table_text(config: &PluginConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "revision {}  mode {}  default env {}  env header {}  splitter `{}`",
        config.revision.as_deref().unwrap_or("-"),
        match config.mode {
            Mode::Cluster => "cluster",
            Mode::Host => "host",
            Mode::Endpoint => "endpoint",
        },
        config.default_env.as_deref().unwrap_or("(none)"),
        config.env_header,
        config.splitter,
    );
    let names: Vec<&str> = config.envs.iter().map(|e| e.name.as_str()).collect();
    let pairs: usize = config.services.iter().map(|s| s.envs.len()).sum();
    let _ = writeln!(
        out,
        "{} envs, {} services, {pairs} (service, env) pairs",
        names.len(),
        config.services.len()
    );
    let width = config
        .services
        .iter()
        .map(|s| s.host.len())
        .max()
        .unwrap_or(0)
        .max("SERVICE".len());
    let _ = writeln!(out, "{:width$}  {:12}  ENVS", "SERVICE", "PORTS");
    for svc in &config.services {
        let ports: Vec<String> = svc.ports.iter().map(u16::to_string).collect();
        let envs: Vec<&str> = svc
            .envs
            .iter()
            .map(|&i| names.get(i as usize).copied().unwrap_or("?"))
            .collect();
        let _ = writeln!(
            out,
            "{:width$}  {:12}  {}",
            svc.host,
            ports.join(","),
            envs.join(", ")
        );
    }
    out
}

/// A request to explain: `:authority` and other headers (names lower-case).
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub authority: String,
    pub headers: Vec<(String, String)>,
    /// The caller pod's env label (the sidecar's node metadata).
    pub caller_env: Option<String>,
    /// Gateway mode: the caller pod's IP (a shared proxy's caller table).
    pub caller_ip: Option<String>,
}

struct HeaderList<'a>(&'a [(String, String)]);

impl Headers for HeaderList<'_> {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        self.0
            .iter()
            .filter(move |(n, _)| n == name)
            .map(|(_, v)| v.as_bytes())
    }
}

/// Where the filter sends `req` under `config`, the chain it walked and why,
/// decided by the filter's own `decide::plan`.
pub fn explain(config: &PluginConfig, req: &Request) -> Result<String, String> {
    let mut config = config.clone();
    config.debug = true; // the filter's own explanation line, below
    let node = Node {
        namespace: None,
        env_label: req.caller_env.clone(),
    };
    let table = RoutingTable::compile(&config, &node).map_err(|e| e.to_string())?;
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
        .collect();
    headers.retain(|(n, _)| n != ":authority");
    headers.push((":authority".into(), req.authority.clone()));
    headers.push((config.debug_header.clone(), "1".into()));
    let list = HeaderList(&headers);
    let caller = decide::CallerAt(req.caller_ip.as_deref().unwrap_or(""));
    let plan = decide::plan_for(&table, &list, &caller);
    let found = find_env(&table, &list, &caller);

    let mut out = String::new();
    let env = found.env.as_ref().map(|(e, _)| e.as_ref());
    match &found.env {
        Some((e, source)) => {
            let _ = writeln!(out, "env: {e} (from the {})", source.as_str());
        }
        None => {
            let _ = writeln!(
                out,
                "env: none (no {} header, baggage, alias, caller label or caller-table entry with a valid env)",
                config.env_header
            );
        }
    }
    if let Some(bad) = &found.invalid {
        let _ = writeln!(
            out,
            "refused: `{bad}` is not a valid env (the next source was used)"
        );
    }
    let service = table.service(&req.authority);
    match &service {
        None => {
            let host = split_authority(&req.authority).map_or("", |(h, _)| h);
            let known_host = config
                .services
                .iter()
                .find(|s| s.host.eq_ignore_ascii_case(host.trim_end_matches('.')));
            let why = match known_host {
                Some(s) => format!(
                    "the service is in the table but not on this port (its ports: {})",
                    s.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
                ),
                None => "the host is not in the table (no env of any opted-in namespace deploys it, or it is not a Service of one)".into(),
            };
            let _ = writeln!(out, "service: {} -> {why}", req.authority);
        }
        Some(svc) => {
            let _ = writeln!(out, "service: {}", svc.fqdn());
            if let Some(env) = env {
                for level in Chain::new(env, table.settings.splitter) {
                    let has = table.env_id(level).and_then(|id| svc.target(id));
                    let _ = writeln!(
                        out,
                        "  {level}: {}",
                        if has.is_some() {
                            "deployed"
                        } else {
                            "not deployed for this service"
                        }
                    );
                    if has.is_some() {
                        break;
                    }
                }
            }
            if matches!(plan.outcome, Outcome::Default | Outcome::Passthrough) {
                match table.default_env().and_then(|id| table.env_name(id)) {
                    Some(d) => {
                        let has = table.default_env().and_then(|id| svc.target(id)).is_some();
                        let _ = writeln!(
                            out,
                            "  default env {}: {}",
                            d.as_str(),
                            if has {
                                "deployed"
                            } else {
                                "not deployed for this service"
                            }
                        );
                    }
                    None => {
                        let _ = writeln!(out, "  no default env is set");
                    }
                }
            }
        }
    }
    let target = plan
        .route_to_cluster
        .map(str::to_string)
        .or(plan.rewrite_authority.clone());
    let _ = writeln!(
        out,
        "outcome: {}{}",
        plan.outcome.as_str(),
        match (&target, plan.outcome) {
            (Some(t), _) => format!(" -> {t}"),
            (None, _) if service.is_some() =>
                " -> the request keeps its route: the Service's own cluster, every pod of every env"
                    .into(),
            (None, _) => " -> the request keeps its route (envlane changes nothing)".into(),
        }
    );
    if let Some(line) = plan.explanation {
        let _ = writeln!(out, "x-envlane-decision: {line}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use envlane::config::{EnvEntry, ServiceEntry};

    fn config() -> PluginConfig {
        let env = |n: &str| EnvEntry {
            name: n.into(),
            subset: None,
        };
        PluginConfig {
            default_env: Some("dev".into()),
            envs: vec![env("dev"), env("dev.proj1"), env("dev.proj2")],
            services: vec![
                ServiceEntry {
                    host: "go.demo.svc.cluster.local".into(),
                    ports: vec![8080],
                    envs: vec![0, 2],
                    target_ports: Vec::new(),
                    endpoints: Default::default(),
                },
                ServiceEntry {
                    host: "java.demo.svc.cluster.local".into(),
                    ports: vec![8080],
                    envs: vec![1],
                    target_ports: Vec::new(),
                    endpoints: Default::default(),
                },
            ],
            ..PluginConfig::default()
        }
    }

    fn ask(authority: &str, env: Option<&str>, caller: Option<&str>) -> String {
        let headers = env
            .map(|e| vec![("x-virtual-env".to_string(), e.to_string())])
            .unwrap_or_default();
        explain(
            &config(),
            &Request {
                authority: authority.into(),
                headers,
                caller_env: caller.map(String::from),
                caller_ip: None,
            },
        )
        .unwrap_or_else(|e| e)
    }

    #[test]
    fn a_gateway_table_is_explained_by_the_caller_ip() {
        let mut cfg = config();
        cfg.proxy = envlane::config::Proxy::Gateway;
        cfg.callers = vec![envlane::config::CallerEntry {
            env: 2,
            ips: vec!["10.244.0.5".into()],
        }];
        let ask = |ip: &str, env: Option<&str>| {
            let headers = env
                .map(|e| vec![("x-virtual-env".to_string(), e.to_string())])
                .unwrap_or_default();
            let req = Request {
                authority: "go.demo.svc.cluster.local:8080".into(),
                headers,
                caller_env: None,
                caller_ip: Some(ip.into()),
            };
            explain(&cfg, &req).unwrap_or_else(|e| e)
        };
        let out = ask("10.244.0.5", None);
        assert!(out.contains("env: dev.proj2 (from the caller)"), "{out}");
        assert!(out.contains("outcome: exact"), "{out}");
        let out = ask("10.244.0.5", Some("dev"));
        assert!(out.contains("env: dev (from the header)"), "{out}");
        let out = ask("10.244.0.6", None);
        assert!(out.contains("outcome: default"), "{out}");
    }

    #[test]
    fn answers_where_and_why() {
        // (authority, env header, caller's env label, parts of the answer)
        type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Vec<&'a str>);
        let cases: Vec<Case<'_>> = vec![
            (
                "go.demo.svc.cluster.local:8080",
                Some("dev.proj2.user1"),
                None,
                vec![
                    "env: dev.proj2.user1 (from the header)",
                    "dev.proj2.user1: not deployed for this service",
                    "dev.proj2: deployed",
                    "outcome: fallback -> outbound|8080|dev-proj2-",
                    "x-envlane-decision: env=dev.proj2.user1",
                ],
            ),
            (
                "java.demo.svc.cluster.local:8080",
                Some("dev.proj2"),
                None,
                vec![
                    "dev.proj2: not deployed",
                    "dev: not deployed",
                    "default env dev: not deployed for this service",
                    "outcome: passthrough -> the request keeps its route: the Service's own cluster",
                ],
            ),
            (
                "go.demo.svc.cluster.local:8080",
                None,
                Some("dev.proj2"),
                vec!["env: dev.proj2 (from the label)", "outcome: exact"],
            ),
            (
                "go.demo.svc.cluster.local:9090",
                Some("dev"),
                None,
                vec!["not on this port (its ports: 8080)", "outcome: passthrough"],
            ),
            (
                "php.demo.svc.cluster.local:8080",
                Some("dev"),
                None,
                vec!["the host is not in the table", "outcome: passthrough"],
            ),
            (
                "go.demo.svc.cluster.local:8080",
                Some("dev..bad"),
                None,
                vec!["refused: `dev..bad` is not a valid env", "outcome: default"],
            ),
        ];
        for (authority, env, caller, want) in cases {
            let got = ask(authority, env, caller);
            for part in want {
                assert!(
                    got.contains(part),
                    "{authority} {env:?}: `{part}` missing in\n{got}"
                );
            }
        }
    }

    #[test]
    fn the_table_names_envs() {
        let text = table_text(&config());
        assert!(text.contains("default env dev"), "{text}");
        assert!(
            text.contains("3 envs, 2 services, 3 (service, env) pairs"),
            "{text}"
        );
        let go = text
            .lines()
            .find(|l| l.starts_with("go.demo"))
            .unwrap_or_default();
        assert!(
            go.ends_with("dev, dev.proj2") && go.contains("8080"),
            "{text}"
        );
    }
}
