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

use std::collections::{BTreeMap, BTreeSet};

use envlane::config::Proxy;
use envlane::config::ROUTE_STATE_KEY;
use envlane::table::{cluster_name, istio_cluster, PortTargets};
use serde::Serialize;
use serde_json::Value;

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

/// Which proxies' routes a patch is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Sidecars' outbound routes (vhost `FQDN:PORT`, istiod's default route
    /// when no VirtualService covers the host).
    Sidecar,
    /// A centralized gateway's routes: its servers keep the service port,
    /// so the vhost is `FQDN:PORT` too, built only from VirtualServices
    /// bound to a gateway.
    Gateway,
    /// A waypoint's inbound-vip routes for the service (istiod's default
    /// route only: it applies no patch to routes from a VirtualService).
    Waypoint,
}

impl Shape {
    /// The routes a table for `proxy` is patched into.
    pub fn of(proxy: Proxy) -> Self {
        match proxy {
            Proxy::Sidecar => Self::Sidecar,
            Proxy::Gateway => Self::Gateway,
            Proxy::Waypoint => Self::Waypoint,
        }
    }
}

/// The scopes to patch for `fqdn:port`, and why some routes are left alone.
pub fn plan(
    fqdn: &str,
    port: u16,
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
) -> (Vec<Scope>, Vec<Warning>) {
    plan_for(Shape::Sidecar, fqdn, port, virtual_services, cluster_domain)
}

/// [`plan`] for the routes of one kind of proxy.
pub fn plan_for(
    shape: Shape,
    fqdn: &str,
    port: u16,
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
) -> (Vec<Scope>, Vec<Warning>) {
    let covering: Vec<&&VirtualService> = virtual_services
        .iter()
        .filter(|vs| {
            let bound = match shape {
                Shape::Sidecar | Shape::Waypoint => vs.for_mesh,
                Shape::Gateway => vs.for_gateway,
            };
            bound
                && vs
                    .hosts
                    .iter()
                    .any(|h| covers(&resolve(h, &vs.namespace, cluster_domain), fqdn))
        })
        .collect();
    match (shape, covering.first()) {
        (Shape::Sidecar | Shape::Waypoint, None) => return (vec![Scope::WholeVhost], Vec::new()),
        // No VirtualService on a gateway: no vhost there to patch.
        (Shape::Gateway, None) => return (Vec::new(), Vec::new()),
        (Shape::Waypoint, Some(vs)) => {
            return (
                Vec::new(),
                vec![Warning::new(
                    Regarding::virtual_service(&vs.namespace, &vs.name),
                    Reason::WaypointRoutesNotPatched,
                    format!(
                        "VirtualService {}/{} covers {fqdn}: istiod applies no EnvoyFilter to a waypoint's VirtualService routes, so {fqdn}:{port} is not env-routed at waypoints",
                        vs.namespace, vs.name
                    ),
                )],
            )
        }
        _ => {}
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

/// One route patch, serialized straight from borrowed parts (a few thousand
/// per pass: building `Value` trees for them was most of a render). Keys are
/// declared in sorted order, so the JSON is byte for byte what the same
/// patch as a `serde_json::Value` gives (`patch_json_is_the_value_json`).
#[derive(Debug, Serialize)]
pub struct RoutePatch<'a> {
    #[serde(rename = "applyTo")]
    apply_to: &'static str,
    #[serde(rename = "match")]
    route_match: PatchMatch<'a>,
    patch: PatchOperation<'a>,
}

#[derive(Debug, Serialize)]
struct PatchMatch<'a> {
    context: &'static str,
    #[serde(rename = "routeConfiguration")]
    route_configuration: RouteConfiguration<'a>,
}

#[derive(Debug, Serialize)]
struct RouteConfiguration<'a> {
    /// Waypoints: every service's vhost has one name, the route config's
    /// is the service's.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    vhost: Vhost<'a>,
}

#[derive(Debug, Serialize)]
struct Vhost<'a> {
    name: String,
    route: RouteSelector<'a>,
}

#[derive(Debug, Serialize)]
struct RouteSelector<'a> {
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct PatchOperation<'a> {
    operation: &'static str,
    value: PatchValue<'a>,
}

#[derive(Debug, Serialize)]
struct PatchValue<'a> {
    route: RouteValue<'a>,
}

#[derive(Debug, Serialize)]
struct RouteValue<'a> {
    inline_cluster_specifier_plugin: SpecifierPlugin<'a>,
}

#[derive(Debug, Serialize)]
struct SpecifierPlugin<'a> {
    extension: Named<MatcherSpecifier<'a>>,
}

#[derive(Debug, Serialize)]
struct Named<T> {
    name: &'static str,
    typed_config: T,
}

#[derive(Debug, Serialize)]
struct MatcherSpecifier<'a> {
    #[serde(rename = "@type")]
    type_url: &'static str,
    cluster_matcher: ClusterMatcher<'a>,
}

#[derive(Debug, Serialize)]
struct ClusterMatcher<'a> {
    matcher_tree: MatcherTree<'a>,
    on_no_match: ClusterAction<String>,
}

#[derive(Debug, Serialize)]
struct MatcherTree<'a> {
    exact_match_map: ExactMatchMap<'a>,
    input: Named<FilterStateInput>,
}

#[derive(Debug, Serialize)]
struct ExactMatchMap<'a> {
    map: BTreeMap<&'a str, ClusterAction<&'a str>>,
}

#[derive(Debug, Serialize)]
struct FilterStateInput {
    #[serde(rename = "@type")]
    type_url: &'static str,
    key: &'static str,
}

#[derive(Debug, Serialize)]
struct ClusterAction<S> {
    action: Named<ClusterActionConfig<S>>,
}

#[derive(Debug, Serialize)]
struct ClusterActionConfig<S> {
    #[serde(rename = "@type")]
    type_url: &'static str,
    cluster: S,
}

fn cluster_action<S>(cluster: S) -> ClusterAction<S> {
    ClusterAction {
        action: Named {
            name: "cluster",
            typed_config: ClusterActionConfig {
                type_url: CLUSTER_ACTION_TYPE,
                cluster,
            },
        },
    }
}

impl<'a> RoutePatch<'a> {
    /// The EnvoyFilter patch for one service port and scope.
    pub fn new(targets: &PortTargets<'a>, scope: &'a Scope) -> Self {
        Self::for_shape(Shape::Sidecar, targets, scope)
    }

    /// The patch for one service port and scope in one kind of proxy; the
    /// targets are that proxy's cluster names.
    pub fn for_shape(shape: Shape, targets: &PortTargets<'a>, scope: &'a Scope) -> Self {
        let (fqdn, port) = (targets.fqdn, targets.port);
        let (context, config_name, vhost, own) = match shape {
            Shape::Sidecar => (
                "SIDECAR_OUTBOUND",
                None,
                format!("{fqdn}:{port}"),
                istio_cluster(port, "", fqdn),
            ),
            Shape::Gateway => (
                "GATEWAY",
                None,
                format!("{fqdn}:{port}"),
                istio_cluster(port, "", fqdn),
            ),
            Shape::Waypoint => {
                let own = cluster_name(Proxy::Waypoint, port, "", fqdn);
                (
                    "SIDECAR_INBOUND",
                    Some(own.clone()),
                    format!("inbound|http|{port}"),
                    own,
                )
            }
        };
        RoutePatch {
            apply_to: "HTTP_ROUTE",
            route_match: PatchMatch {
                context,
                route_configuration: RouteConfiguration {
                    name: config_name,
                    vhost: Vhost {
                        name: vhost,
                        route: RouteSelector {
                            action: "ROUTE",
                            name: match scope {
                                Scope::Route(name) => Some(name.as_str()),
                                Scope::WholeVhost => None,
                            },
                        },
                    },
                },
            },
            patch: PatchOperation {
                operation: "MERGE",
                value: PatchValue {
                    route: RouteValue {
                        inline_cluster_specifier_plugin: SpecifierPlugin {
                            extension: Named {
                                name: "envlane",
                                typed_config: MatcherSpecifier {
                                    type_url: MATCHER_TYPE,
                                    cluster_matcher: ClusterMatcher {
                                        matcher_tree: MatcherTree {
                                            exact_match_map: ExactMatchMap {
                                                map: targets
                                                    .targets
                                                    .iter()
                                                    .map(|t| (*t, cluster_action(*t)))
                                                    .collect(),
                                            },
                                            input: Named {
                                                name: "envlane_route",
                                                typed_config: FilterStateInput {
                                                    type_url: FILTER_STATE_INPUT_TYPE,
                                                    key: ROUTE_STATE_KEY,
                                                },
                                            },
                                        },
                                        on_no_match: cluster_action(own),
                                    },
                                },
                            },
                        },
                    },
                },
            },
        }
    }
}

/// The EnvoyFilter patch for one service port and scope, as a `Value`.
pub fn patch(targets: &PortTargets<'_>, scope: &Scope) -> Value {
    serde_json::to_value(RoutePatch::new(targets, scope)).unwrap_or(Value::Null)
}

/// The patches of each service (all its ports), by FQDN in table order,
/// and the warnings.
pub fn patches<'t>(
    targets: &[PortTargets<'t>],
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
) -> (Vec<(&'t str, Vec<Value>)>, Vec<Warning>) {
    patches_for(Shape::Sidecar, targets, virtual_services, cluster_domain)
}

/// [`patches`] for one kind of proxy (targets in its cluster names).
pub fn patches_for<'t>(
    shape: Shape,
    targets: &[PortTargets<'t>],
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
) -> (Vec<(&'t str, Vec<Value>)>, Vec<Warning>) {
    let mut out: Vec<(&'t str, Vec<Value>)> = Vec::new();
    let warnings = each_service_patches_for(
        &[shape],
        targets,
        virtual_services,
        cluster_domain,
        |fqdn, list| {
            let values = list
                .iter()
                .map(|p| serde_json::to_value(p).unwrap_or(Value::Null))
                .collect();
            out.push((fqdn, values));
        },
    );
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
    each: impl FnMut(&'t str, &[RoutePatch<'_>]),
) -> Vec<Warning> {
    each_service_patches_for(
        &[Shape::Sidecar],
        targets,
        virtual_services,
        cluster_domain,
        each,
    )
}

/// [`each_service_patches`] with the patches of each shape in `shapes`
/// (which share cluster names: sidecars and gateways) in one list.
pub fn each_service_patches_for<'t>(
    shapes: &[Shape],
    targets: &[PortTargets<'t>],
    virtual_services: &[&VirtualService],
    cluster_domain: &str,
    mut each: impl FnMut(&'t str, &[RoutePatch<'_>]),
) -> Vec<Warning> {
    let mut warnings = Vec::new();
    // One service's ports are consecutive in `targets`.
    let mut start = 0;
    while let Some(first) = targets.get(start) {
        let end = targets
            .iter()
            .skip(start)
            .position(|t| t.fqdn != first.fqdn)
            .map_or(targets.len(), |n| start + n);
        let ports = targets.get(start..end).unwrap_or_default();
        let scopes: Vec<(Shape, &PortTargets<'t>, Vec<Scope>)> = shapes
            .iter()
            .flat_map(|&shape| ports.iter().map(move |t| (shape, t)))
            .map(|(shape, t)| {
                let (scopes, why) =
                    plan_for(shape, t.fqdn, t.port, virtual_services, cluster_domain);
                warnings.extend(why);
                (shape, t, scopes)
            })
            .collect();
        let list: Vec<RoutePatch<'_>> = scopes
            .iter()
            .flat_map(|(shape, t, scopes)| {
                scopes.iter().map(|s| RoutePatch::for_shape(*shape, t, s))
            })
            .collect();
        if !list.is_empty() {
            each(first.fqdn, &list);
        }
        start = end;
    }
    warnings
}

/// The name of a service's route EnvoyFilter: dots cannot occur in a
/// namespace or Service name, so no two services share one.
pub fn envoy_filter_name(namespace: &str, service: &str) -> String {
    format!("{ENVOY_FILTER_NAME}.{namespace}.{service}")
}

/// The name of a service's waypoint route EnvoyFilter (a separate object:
/// it targets the waypoint GatewayClass, which sidecars are not).
pub fn waypoint_envoy_filter_name(namespace: &str, service: &str) -> String {
    format!("{}{WAYPOINT_SUFFIX}", envoy_filter_name(namespace, service))
}

/// Suffix of [`waypoint_envoy_filter_name`].
pub const WAYPOINT_SUFFIX: &str = ".waypoint";

/// The GatewayClass of Istio's waypoints: a waypoint patch targets it.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Destination, HttpRoute};
    use serde_json::json;

    /// The typed patch serializes exactly as its `Value` does (sorted keys),
    /// so the content hashes of EnvoyFilters did not change with it.
    #[test]
    fn patch_json_is_the_value_json() {
        let targets = PortTargets {
            fqdn: GO,
            port: 8080,
            targets: vec![
                "outbound|8080|dev-proj1|go.demo.svc.cluster.local",
                "outbound|8080|dev|go.demo.svc.cluster.local",
            ],
        };
        for scope in [Scope::WholeVhost, Scope::Route("api".into())] {
            let typed =
                serde_json::to_string(&RoutePatch::new(&targets, &scope)).unwrap_or_default();
            let value = serde_json::to_string(&patch(&targets, &scope)).unwrap_or_default();
            assert_eq!(typed, value);
            assert!(
                typed.contains("outbound|8080||go.demo.svc.cluster.local"),
                "{typed}"
            );
        }
    }

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
            for_gateway: false,
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
            for_gateway: true,
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
