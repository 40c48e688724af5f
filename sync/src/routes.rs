//! Cluster mode's route patches: for each service port in the table, a merge
//! into the routes istiod builds for it that keeps each route as the user's
//! VirtualService (or Istio's default) made it — timeouts, retries, faults,
//! mirrors, header changes — and changes only its cluster: a matcher cluster
//! specifier reads filter state `wasm.envlane_route` (written by the filter,
//! never by a request) and maps each of the service's env clusters to
//! itself; anything else (no filter, no decision, an unknown value) gets the
//! route's own cluster back.
//!
//! Which routes: a route can be re-targeted only when all of it goes to the
//! service itself (one destination, that host, no subset). [`plan`] decides
//! per service port from the VirtualServices that cover its host. Pure.

use std::collections::BTreeSet;

use envlane::config::ROUTE_STATE_KEY;
use envlane::table::{istio_cluster, PortTargets};
use serde_json::{json, Map, Value};

use crate::model::VirtualService;
use crate::warning::{Reason, Regarding, Warning};

/// Prefix of the EnvoyFilters envlane-sync writes, one per service, in
/// Istio's root namespace (mesh-wide: every caller's sidecar needs the patch;
/// where no filter runs it changes nothing).
pub const ENVOY_FILTER_NAME: &str = "envlane-routes";
const MATCHER_TYPE: &str =
    "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier";
const CLUSTER_ACTION_TYPE: &str =
    "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction";
const FILTER_STATE_INPUT_TYPE: &str =
    "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.FilterStateInput";

/// Which routes of a service port's virtual host a patch merges into.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Every route that forwards (istiod's default route, or a
    /// VirtualService whose rules all go to the service itself).
    WholeVhost,
    /// The route istiod names after a VirtualService `http` rule's `name`.
    Route(String),
}

/// A host of a VirtualService or destination, as istiod resolves it: a name
/// without dots is a Service of the VirtualService's namespace.
fn resolve(host: &str, namespace: &str, cluster_domain: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host.contains('.') || host.contains('*') {
        host
    } else {
        format!("{host}.{namespace}.svc.{cluster_domain}")
    }
}

fn covers(pattern: &str, fqdn: &str) -> bool {
    pattern == "*"
        || pattern == fqdn
        || pattern
            .strip_prefix('*')
            .is_some_and(|suffix| suffix.starts_with('.') && fqdn.ends_with(suffix))
}

/// The scopes to patch for `fqdn:port`, and why some routes are left alone.
pub fn plan(
    fqdn: &str,
    port: u16,
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
) -> (Vec<Scope>, Vec<Warning>) {
    let covering: Vec<&&VirtualService> = virtual_services
        .iter()
        .filter(|vs| {
            vs.for_mesh
                && vs
                    .hosts
                    .iter()
                    .any(|h| covers(&resolve(h, &vs.namespace, cluster_domain), fqdn))
        })
        .collect();
    if covering.is_empty() {
        return (vec![Scope::WholeVhost], Vec::new());
    }
    let mut all_plain = covering.len() == 1;
    let mut named = BTreeSet::new();
    let mut warnings = Vec::new();
    for vs in &covering {
        for (i, rule) in vs.http.iter().enumerate() {
            if !rule.match_ports.is_empty() && !rule.match_ports.contains(&port) {
                continue; // not a route of this port's virtual host
            }
            let plain = rule.plain_destination.as_ref().is_some_and(|d| {
                resolve(&d.host, &vs.namespace, cluster_domain) == fqdn
                    && d.port.is_none_or(|p| p == port)
            });
            if !plain {
                all_plain = false;
                continue;
            }
            match &rule.name {
                Some(name) => {
                    named.insert(name.clone());
                }
                None => warnings.push(Warning::new(
                    Regarding::virtual_service(&vs.namespace, &vs.name),
                    Reason::UnnamedRoute,
                    format!(
                        "VirtualService {}/{} http[{i}] sends {fqdn}:{port} to the service but has no \
                         `name`: envlane cannot patch that route alone, so it is not env-routed; name it",
                        vs.namespace, vs.name
                    ),
                )),
            }
        }
    }
    if all_plain {
        return (vec![Scope::WholeVhost], Vec::new());
    }
    (named.into_iter().map(Scope::Route).collect(), warnings)
}

fn cluster_action(cluster: &str) -> Value {
    json!({"action": {"name": "cluster", "typed_config": {
        "@type": CLUSTER_ACTION_TYPE,
        "cluster": cluster,
    }}})
}

/// The EnvoyFilter patch for one service port and scope.
pub fn patch(targets: &PortTargets<'_>, scope: &Scope) -> Value {
    let mut route_match = Map::new();
    route_match.insert("action".into(), "ROUTE".into());
    if let Scope::Route(name) = scope {
        route_match.insert("name".into(), name.clone().into());
    }
    let map: Map<String, Value> = targets
        .targets
        .iter()
        .map(|t| ((*t).to_string(), cluster_action(t)))
        .collect();
    json!({
        "applyTo": "HTTP_ROUTE",
        "match": {
            "context": "SIDECAR_OUTBOUND",
            "routeConfiguration": {"vhost": {
                "name": format!("{}:{}", targets.fqdn, targets.port),
                "route": route_match,
            }},
        },
        "patch": {"operation": "MERGE", "value": {"route": {
            "inline_cluster_specifier_plugin": {"extension": {
                "name": "envlane",
                "typed_config": {
                    "@type": MATCHER_TYPE,
                    "cluster_matcher": {
                        "matcher_tree": {
                            "input": {"name": "envlane_route", "typed_config": {
                                "@type": FILTER_STATE_INPUT_TYPE,
                                "key": ROUTE_STATE_KEY,
                            }},
                            "exact_match_map": {"map": map},
                        },
                        "on_no_match": cluster_action(&istio_cluster(targets.port, "", targets.fqdn)),
                    },
                },
            }},
        }}},
    })
}

/// The patches of each service (all its ports), by FQDN in table order,
/// and the warnings.
pub fn patches<'t>(
    targets: &[PortTargets<'t>],
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
) -> (Vec<(&'t str, Vec<Value>)>, Vec<Warning>) {
    let mut out: Vec<(&'t str, Vec<Value>)> = Vec::new();
    let warnings = each_service_patches(targets, virtual_services, cluster_domain, |fqdn, list| {
        out.push((fqdn, list));
    });
    (out, warnings)
}

/// [`patches`], handed to `each` one service at a time (its ports' patches
/// together, services with none skipped), so a caller can turn them into
/// an object before the next service's are built: thousands of services'
/// parsed patches at once were most of a pass's memory. Returns the warnings.
pub fn each_service_patches<'t>(
    targets: &[PortTargets<'t>],
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
    mut each: impl FnMut(&'t str, Vec<Value>),
) -> Vec<Warning> {
    let mut warnings = Vec::new();
    let mut current: Option<(&'t str, Vec<Value>)> = None;
    for t in targets {
        let (scopes, why) = plan(t.fqdn, t.port, virtual_services, cluster_domain);
        warnings.extend(why);
        let values = scopes.iter().map(|s| patch(t, s));
        match &mut current {
            Some((fqdn, list)) if *fqdn == t.fqdn => list.extend(values),
            _ => {
                if let Some((fqdn, list)) = current.take().filter(|(_, l)| !l.is_empty()) {
                    each(fqdn, list);
                }
                current = Some((t.fqdn, values.collect()));
            }
        }
    }
    if let Some((fqdn, list)) = current.filter(|(_, l)| !l.is_empty()) {
        each(fqdn, list);
    }
    warnings
}

/// The name of a service's route EnvoyFilter: dots cannot occur in a
/// namespace or Service name, so no two services share one.
pub fn envoy_filter_name(namespace: &str, service: &str) -> String {
    format!("{ENVOY_FILTER_NAME}.{namespace}.{service}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Destination, HttpRoute};

    const GO: &str = "go.demo.svc.cluster.local";

    fn rule(name: Option<&str>, host: Option<&str>, ports: &[u16]) -> HttpRoute {
        HttpRoute {
            name: name.map(str::to_string),
            match_ports: ports.to_vec(),
            plain_destination: host.map(|h| Destination {
                host: h.into(),
                port: None,
            }),
        }
    }

    fn vs(ns: &str, hosts: &[&str], http: Vec<HttpRoute>) -> VirtualService {
        VirtualService {
            namespace: ns.into(),
            name: "vs".into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            for_mesh: true,
            http,
        }
    }

    fn route(n: &str) -> Scope {
        Scope::Route(n.into())
    }

    /// (virtual services, expected scopes for go:8080, warnings)
    #[test]
    fn which_routes_are_patched() {
        let gateway_only = VirtualService {
            for_mesh: false,
            ..vs("demo", &["go"], vec![rule(None, Some("go-v2"), &[])])
        };
        let cases: Vec<(&str, Vec<VirtualService>, Vec<Scope>, usize)> = vec![
            (
                "no VirtualService: istiod's default route",
                vec![],
                vec![Scope::WholeVhost],
                0,
            ),
            (
                "another host's VirtualService",
                vec![vs(
                    "demo",
                    &["java"],
                    vec![rule(None, Some("java-v2"), &[])],
                )],
                vec![Scope::WholeVhost],
                0,
            ),
            (
                "a gateway-only VirtualService",
                vec![gateway_only],
                vec![Scope::WholeVhost],
                0,
            ),
            (
                "every rule goes to the service itself",
                vec![vs(
                    "demo",
                    &["go"],
                    vec![rule(None, Some("go"), &[]), rule(Some("b"), Some(GO), &[])],
                )],
                vec![Scope::WholeVhost],
                0,
            ),
            (
                "a rule to another host: only named plain rules",
                vec![vs(
                    "demo",
                    &["go.demo.svc.cluster.local"],
                    vec![
                        rule(Some("api"), Some("go"), &[]),
                        rule(Some("canary"), Some("go-v2"), &[]),
                        rule(None, Some("go"), &[]),
                        rule(Some("split"), None, &[]),
                    ],
                )],
                vec![route("api")],
                1,
            ),
            (
                "a rule of another port does not count",
                vec![vs(
                    "demo",
                    &["go"],
                    vec![
                        rule(None, Some("go-v2"), &[9090]),
                        rule(None, Some("go"), &[8080]),
                    ],
                )],
                vec![Scope::WholeVhost],
                0,
            ),
            (
                "a short name in another namespace is another service",
                vec![vs("other", &["go"], vec![rule(None, Some("go-v2"), &[])])],
                vec![Scope::WholeVhost],
                0,
            ),
            (
                "a wildcard covers the host",
                vec![vs(
                    "demo",
                    &["*.demo.svc.cluster.local"],
                    vec![rule(Some("all"), Some("java"), &[])],
                )],
                vec![],
                0,
            ),
            (
                "two VirtualServices: named plain rules only",
                vec![
                    vs("demo", &["go"], vec![rule(Some("a"), Some("go"), &[])]),
                    vs("demo", &["go"], vec![rule(Some("b"), Some("go"), &[])]),
                ],
                vec![route("a"), route("b")],
                0,
            ),
        ];
        for (what, vss, want, warnings) in cases {
            let refs: Vec<&VirtualService> = vss.iter().collect();
            let (got, why) = plan(GO, 8080, &refs, "cluster.local");
            assert_eq!(got, want, "{what}");
            assert_eq!(why.len(), warnings, "{what}: {why:?}");
        }
    }

    #[test]
    fn the_patch_maps_each_env_cluster_and_falls_back_to_the_route_cluster() {
        let targets = PortTargets {
            fqdn: GO,
            port: 8080,
            targets: vec![
                "outbound|8080|dev|go.demo.svc.cluster.local",
                "outbound|8080|dev-x|go.demo.svc.cluster.local",
            ],
        };
        let p = patch(&targets, &route("api"));
        assert_eq!(
            p["match"]["routeConfiguration"]["vhost"]["name"],
            "go.demo.svc.cluster.local:8080"
        );
        assert_eq!(
            p["match"]["routeConfiguration"]["vhost"]["route"],
            json!({"action": "ROUTE", "name": "api"})
        );
        let m = &p["patch"]["value"]["route"]["inline_cluster_specifier_plugin"]["extension"]
            ["typed_config"]["cluster_matcher"];
        assert_eq!(
            m["matcher_tree"]["input"]["typed_config"]["key"],
            ROUTE_STATE_KEY
        );
        let map = m["matcher_tree"]["exact_match_map"]["map"]
            .as_object()
            .unwrap();
        for t in &targets.targets {
            assert_eq!(map[*t]["action"]["typed_config"]["cluster"], *t);
        }
        assert_eq!(map.len(), 2);
        assert_eq!(
            m["on_no_match"]["action"]["typed_config"]["cluster"],
            "outbound|8080||go.demo.svc.cluster.local"
        );
        let whole = patch(&targets, &Scope::WholeVhost);
        assert_eq!(
            whole["match"]["routeConfiguration"]["vhost"]["route"],
            json!({"action": "ROUTE"})
        );
    }
}
