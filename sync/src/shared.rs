//! Shared proxies (gateway mode): a centralized east-west gateway selected
//! by its pods' labels, and Istio ambient waypoints selected by `targetRefs`.
//! Each gets its own WasmPlugin whose table adds where the filter runs and
//! the caller table: the env of every Ready pod with an env label in the
//! opted-in namespaces, by pod IP, and for waypoints by (namespace,
//! workload). Pure.

use std::collections::{BTreeMap, BTreeSet};

use envlane::config::{CallerEntry, CallerWorkloadEntry, EnvEntry, PluginConfig, Proxy};

use crate::model::{Labels, Pod};
use crate::warning::{Reason, Regarding, Warning};

/// The WasmPlugin of a centralized gateway (one per gateway namespace).
pub const GATEWAY_PLUGIN_NAME: &str = "envlane-gateway";
/// The WasmPlugin of a namespace's waypoints (one per namespace, naming
/// every waypoint there in `targetRefs`).
pub const WAYPOINT_PLUGIN_NAME: &str = "envlane-waypoint";
/// Label an operator puts on a gateway's namespace: envlane-sync may write
/// [`GATEWAY_PLUGIN_NAME`] there (the admission policy checks it).
pub const GATEWAY_NAMESPACE_LABEL: &str = "envlane.io/gateway";

/// A shared proxy envlane-sync renders a WasmPlugin for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SharedProxy {
    /// `--gateway NAMESPACE:KEY=VALUE[,KEY=VALUE]`: the gateway Deployment's
    /// pods, selected by labels, in their own namespace.
    Gateway { namespace: String, selector: Labels },
    /// `--waypoint NAMESPACE/NAME`: a Gateway API `Gateway` of class
    /// `istio-waypoint`.
    Waypoint { namespace: String, name: String },
}

fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl SharedProxy {
    pub fn parse_gateway(arg: &str) -> Result<Self, String> {
        let (namespace, selector) = arg.split_once(':').ok_or_else(|| {
            format!("--gateway `{arg}`: expected NAMESPACE:KEY=VALUE[,KEY=VALUE]")
        })?;
        if !is_name(namespace) {
            return Err(format!(
                "--gateway `{arg}`: `{namespace}` is not a namespace"
            ));
        }
        let mut labels = Labels::new();
        for pair in selector.split(',') {
            let (k, v) = pair
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| format!("--gateway `{arg}`: `{pair}` is not KEY=VALUE"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        Ok(Self::Gateway {
            namespace: namespace.to_string(),
            selector: labels,
        })
    }

    pub fn parse_waypoint(arg: &str) -> Result<Self, String> {
        match arg.split_once('/') {
            Some((ns, name)) if is_name(ns) && is_name(name) => Ok(Self::Waypoint {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            _ => Err(format!("--waypoint `{arg}`: expected NAMESPACE/NAME")),
        }
    }

    pub fn namespace(&self) -> &str {
        match self {
            Self::Gateway { namespace, .. } | Self::Waypoint { namespace, .. } => namespace,
        }
    }
}

/// One WasmPlugin for shared proxies: where, which proxies, what table.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedPlugin {
    pub namespace: String,
    pub name: &'static str,
    /// Gateway: `selector.matchLabels`.
    pub selector: Option<Labels>,
    /// Waypoints: the `Gateway` names for `targetRefs`.
    pub waypoints: Vec<String>,
    pub proxy: Proxy,
}

/// The WasmPlugins for `proxies`: one per gateway namespace (selectors of one
/// namespace must agree: a second one there is refused) and one per
/// waypoint namespace.
pub fn plugins(proxies: &[SharedProxy]) -> Result<Vec<SharedPlugin>, String> {
    let mut out: BTreeMap<(String, &'static str), SharedPlugin> = BTreeMap::new();
    for p in proxies {
        match p {
            SharedProxy::Gateway {
                namespace,
                selector,
            } => {
                let key = (namespace.clone(), GATEWAY_PLUGIN_NAME);
                if let Some(prev) = out.get(&key) {
                    if prev.selector.as_ref() != Some(selector) {
                        return Err(format!(
                            "two --gateway selectors for namespace {namespace}: one gateway per namespace"
                        ));
                    }
                    continue;
                }
                out.insert(
                    key,
                    SharedPlugin {
                        namespace: namespace.clone(),
                        name: GATEWAY_PLUGIN_NAME,
                        selector: Some(selector.clone()),
                        waypoints: Vec::new(),
                        proxy: Proxy::Gateway,
                    },
                );
            }
            SharedProxy::Waypoint { namespace, name } => {
                let plugin = out
                    .entry((namespace.clone(), WAYPOINT_PLUGIN_NAME))
                    .or_insert_with(|| SharedPlugin {
                        namespace: namespace.clone(),
                        name: WAYPOINT_PLUGIN_NAME,
                        selector: None,
                        waypoints: Vec::new(),
                        proxy: Proxy::Waypoint,
                    });
                if !plugin.waypoints.contains(name) {
                    plugin.waypoints.push(name.clone());
                    plugin.waypoints.sort();
                }
            }
        }
    }
    Ok(out.into_values().collect())
}

/// Who calls from where: env by pod IP and by (namespace, workload).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Callers {
    pub by_ip: BTreeMap<String, String>,
    pub by_workload: BTreeMap<(String, String), String>,
    pub warnings: Vec<Warning>,
}

/// The caller table from `pods`: Ready pods with a valid env label in
/// opted-in namespaces (the caller already filtered), each with its env.
/// A host-network pod has its node's address: left out. An address (or a
/// workload) held by pods of different envs is left out with a warning: a
/// caller found there could be either. Only current pods count, so an
/// address a new pod reuses never keeps the old pod's env.
pub fn callers<'a>(pods: impl IntoIterator<Item = (&'a Pod, &'a str)>) -> Callers {
    // Keyed by the address's canonical text: one address, one entry.
    let mut ips: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    let mut owners: BTreeMap<String, Vec<(&str, &str)>> = BTreeMap::new();
    let mut workloads: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for (pod, env) in pods {
        if !pod.ready {
            continue;
        }
        workloads
            .entry((pod.namespace.as_str(), pod.workload.as_str()))
            .or_default()
            .insert(env);
        if pod.host_network {
            continue;
        }
        for ip in &pod.ips {
            // Only addresses Kubernetes could have written.
            let Ok(ip) = ip.parse::<std::net::IpAddr>() else {
                continue;
            };
            let ip = ip.to_string();
            ips.entry(ip.clone()).or_default().insert(env);
            owners
                .entry(ip)
                .or_default()
                .push((pod.namespace.as_str(), pod.name.as_str()));
        }
    }
    let mut out = Callers::default();
    for (ip, envs) in ips {
        match envs.iter().next() {
            Some(env) if envs.len() == 1 => {
                out.by_ip.insert(ip, (*env).to_string());
            }
            _ => {
                let pods = owners.get(&ip).cloned().unwrap_or_default();
                let (ns, name) = pods.first().copied().unwrap_or_default();
                out.warnings.push(Warning::new(
                    Regarding::pod(ns, name),
                    Reason::CallerAddressShared,
                    format!(
                        "address {ip} is held by pods of envs {} ({}): left out of the caller table",
                        envs.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(", "),
                        pods.iter().map(|(n, p)| format!("{n}/{p}")).collect::<Vec<_>>().join(", "),
                    ),
                ));
            }
        }
    }
    for ((ns, workload), envs) in workloads {
        match envs.iter().next() {
            Some(env) if envs.len() == 1 => {
                out.by_workload
                    .insert((ns.to_string(), workload.to_string()), (*env).to_string());
            }
            // Pods of one workload in several envs (a label changed in a
            // rollout): by identity the caller could be either; its pods
            // are still found by address.
            _ => {}
        }
    }
    out
}

/// Most caller addresses a shared proxy's table carries by default: at
/// about 16 bytes each as JSON, 50,000 stay well inside one object (1 MiB)
/// with the routes.
pub const DEFAULT_MAX_CALLERS: usize = 50_000;

/// Keeps `callers` within `max` addresses: past it the caller table is left
/// out whole (requests without an env get the default env, as from an
/// unknown caller) rather than cut at random or left stale, and a warning
/// says so. A stale table would let a new pod inherit an old pod's env.
/// The warning is recorded in `namespace` (a shared proxy's).
pub fn bounded(mut callers: Callers, max: usize, namespace: &str) -> Callers {
    if callers.by_ip.len() <= max {
        return callers;
    }
    callers.warnings.push(Warning::new(
        Regarding::namespace(namespace),
        Reason::CallerTableTooLarge,
        format!(
            "{} caller addresses are over --max-callers {max}: shared proxies get no caller table (requests without an env go to the default env)",
            callers.by_ip.len()
        ),
    ));
    callers.by_ip.clear();
    callers.by_workload.clear();
    callers
}

/// `base` (the mesh's table) for a shared proxy: where it runs, the
/// caller table, and the callers' envs the base does not list yet.
pub fn table_for(base: &PluginConfig, proxy: Proxy, callers: &Callers) -> PluginConfig {
    let mut table = base.clone();
    table.proxy = proxy;
    let mut index: BTreeMap<String, u32> = table
        .envs
        .iter()
        .zip(0u32..)
        .map(|(e, i)| (e.name.clone(), i))
        .collect();
    let mut id_of = |env: &str, envs: &mut Vec<EnvEntry>| -> u32 {
        if let Some(&id) = index.get(env) {
            return id;
        }
        let id = u32::try_from(envs.len()).unwrap_or(u32::MAX);
        envs.push(EnvEntry {
            name: env.to_string(),
            subset: None,
        });
        index.insert(env.to_string(), id);
        id
    };
    let mut by_env: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for (ip, env) in &callers.by_ip {
        let id = id_of(env, &mut table.envs);
        by_env.entry(id).or_default().push(ip.clone());
    }
    table.callers = by_env
        .into_iter()
        .map(|(env, ips)| CallerEntry { env, ips })
        .collect();
    if proxy == Proxy::Waypoint {
        let mut by_env_ns: BTreeMap<(u32, &str), Vec<String>> = BTreeMap::new();
        for ((ns, workload), env) in &callers.by_workload {
            let id = id_of(env, &mut table.envs);
            by_env_ns
                .entry((id, ns.as_str()))
                .or_default()
                .push(workload.clone());
        }
        table.caller_workloads = by_env_ns
            .into_iter()
            .map(|((env, ns), workloads)| CallerWorkloadEntry {
                env,
                namespace: ns.to_string(),
                workloads,
            })
            .collect();
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, workload: &str, ips: &[&str], ready: bool) -> Pod {
        Pod {
            namespace: ns.into(),
            name: name.into(),
            ready,
            ips: ips.iter().map(|s| s.to_string()).collect(),
            workload: workload.into(),
            ..Pod::default()
        }
    }

    #[test]
    fn flags_parse() {
        assert_eq!(
            SharedProxy::parse_gateway("mesh-gw:app=envlane-gateway,istio=eastwest"),
            Ok(SharedProxy::Gateway {
                namespace: "mesh-gw".into(),
                selector: [
                    ("app".to_string(), "envlane-gateway".to_string()),
                    ("istio".to_string(), "eastwest".to_string())
                ]
                .into()
            })
        );
        for bad in ["mesh-gw", "Mesh:app=x", "gw:app", "gw:=x", "gw:a=1,,"] {
            assert!(SharedProxy::parse_gateway(bad).is_err(), "{bad}");
        }
        assert!(SharedProxy::parse_waypoint("demo/waypoint").is_ok());
        for bad in ["demo", "demo/", "/w", "demo/w/x", "Demo/w"] {
            assert!(SharedProxy::parse_waypoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn one_plugin_per_namespace_and_kind() {
        let proxies = [
            SharedProxy::parse_waypoint("demo/b").unwrap(),
            SharedProxy::parse_waypoint("demo/a").unwrap(),
            SharedProxy::parse_waypoint("demo/a").unwrap(),
            SharedProxy::parse_gateway("gw:app=g").unwrap(),
            SharedProxy::parse_gateway("gw:app=g").unwrap(),
        ];
        let got = plugins(&proxies).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].namespace, "demo");
        assert_eq!(got[0].waypoints, ["a", "b"]);
        assert_eq!(got[1].name, GATEWAY_PLUGIN_NAME);
        let two = [
            SharedProxy::parse_gateway("gw:app=g").unwrap(),
            SharedProxy::parse_gateway("gw:app=h").unwrap(),
        ];
        assert!(plugins(&two).is_err());
    }

    #[test]
    fn caller_table_scenarios() {
        let mut host_net = pod("demo", "ds-1", "ds", &["10.0.0.1"], true);
        host_net.host_network = true;
        let pods = [
            (
                pod("demo", "node-a", "node", &["10.1.0.1", "fd00::1"], true),
                "dev.proj1",
            ),
            (
                pod("demo", "node-b", "node", &["10.1.0.2"], true),
                "dev.proj1",
            ),
            // Not Ready (or terminating): neither its address nor its workload.
            (
                pod("demo", "go-old", "go", &["10.1.0.3"], false),
                "dev.proj2",
            ),
            // Its address reused by a new pod of another env: the new env.
            (pod("demo", "go-new", "go-new", &["10.1.0.3"], true), "dev"),
            // Two Ready pods claiming one address with different envs.
            (pod("demo", "x", "x", &["10.1.0.9"], true), "dev"),
            (pod("other", "y", "y", &["10.1.0.9"], true), "dev.proj1"),
            // A host-network pod: no address entry, its workload still known.
            (host_net, "dev"),
            // A workload whose pods are in two envs: not known by workload.
            (pod("demo", "api-1", "api", &["10.1.0.5"], true), "dev"),
            (
                pod("demo", "api-2", "api", &["10.1.0.6"], true),
                "dev.proj1",
            ),
            (pod("demo", "junk", "junk", &["not-an-ip"], true), "dev"),
        ];
        let c = callers(pods.iter().map(|(p, e)| (p, *e)));
        let ips: Vec<(&str, &str)> = c
            .by_ip
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            ips,
            [
                ("10.1.0.1", "dev.proj1"),
                ("10.1.0.2", "dev.proj1"),
                ("10.1.0.3", "dev"),
                ("10.1.0.5", "dev"),
                ("10.1.0.6", "dev.proj1"),
                ("fd00::1", "dev.proj1"),
            ]
        );
        let wl: Vec<String> = c
            .by_workload
            .iter()
            .map(|((ns, w), e)| format!("{ns}/{w}={e}"))
            .collect();
        assert_eq!(
            wl,
            [
                "demo/ds=dev",
                "demo/go-new=dev",
                "demo/junk=dev",
                "demo/node=dev.proj1",
                "other/y=dev.proj1",
                "demo/x=dev"
            ]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
        );
        assert_eq!(c.warnings.len(), 1);
        assert_eq!(c.warnings[0].reason, Reason::CallerAddressShared);
        assert!(
            c.warnings[0].message.contains("10.1.0.9"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn an_oversized_caller_table_is_left_out_whole() {
        let pods: Vec<(Pod, &str)> = (0..5)
            .map(|i| {
                (
                    pod(
                        "demo",
                        &format!("p{i}"),
                        "w",
                        &[&format!("10.0.0.{i}")],
                        true,
                    ),
                    "dev",
                )
            })
            .collect();
        let c = callers(pods.iter().map(|(p, e)| (p, *e)));
        let kept = bounded(c.clone(), 5, "gw");
        assert_eq!(kept.by_ip.len(), 5);
        assert!(kept.warnings.is_empty());
        let dropped = bounded(c, 4, "gw");
        assert!(dropped.by_ip.is_empty() && dropped.by_workload.is_empty());
        assert_eq!(dropped.warnings[0].reason, Reason::CallerTableTooLarge);
    }

    #[test]
    fn a_shared_table_lists_callers_by_env_and_adds_their_envs() {
        let base = PluginConfig {
            envs: vec![EnvEntry {
                name: "dev".into(),
                subset: Some("dev".into()),
            }],
            ..PluginConfig::default()
        };
        let pods = [
            (pod("demo", "a", "a", &["10.1.0.1"], true), "dev"),
            (pod("demo", "b", "b", &["10.1.0.2"], true), "dev.user9"),
        ];
        let c = callers(pods.iter().map(|(p, e)| (p, *e)));
        let gw = table_for(&base, Proxy::Gateway, &c);
        assert_eq!(gw.proxy, Proxy::Gateway);
        assert_eq!(gw.envs[1].name, "dev.user9");
        assert_eq!(gw.callers.len(), 2);
        assert_eq!(gw.callers[1].env, 1);
        assert!(gw.caller_workloads.is_empty());
        let wp = table_for(&base, Proxy::Waypoint, &c);
        assert_eq!(wp.caller_workloads.len(), 2);
        // The filter takes both.
        for t in [gw, wp] {
            envlane::table::RoutingTable::compile(&t, &Default::default()).unwrap();
        }
    }
}
