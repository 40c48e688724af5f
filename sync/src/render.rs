//! Pure rendering: namespaces, pods and services in, the routing table and the
//! Kubernetes objects to apply out. No I/O, no clock: the same inputs (in any
//! order) give the same bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use envlane::config::{ConfigError, EnvEntry, Mode, PluginConfig, Proxy, ServiceEntry};
use envlane::names::{fnv1a64, EnvName, Splitter, SubsetName};
use envlane::pod_ips::EnvPodIps;
use envlane::table::{HostTemplate, Node, RoutingTable};
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::endpoints;
use crate::model::{
    Labels, Namespace, Pod, Service, VirtualService, HASH_ANNOTATION, MANAGED_BY_KEY,
    MANAGED_BY_VALUE,
};
use crate::routes;
use crate::selector::LabelSelector;
use crate::shared::{self, SharedProxy};
use crate::warning::{Reason, Regarding, Warning};

/// Where the WasmPlugin runs: `AUTHN` is the earliest phase Istio offers, so
/// the filter sets its route header before any other extension and long
/// before the router picks the cluster.
pub const WASM_PHASE: &str = "AUTHN";
/// Higher runs first within a phase.
pub const WASM_PRIORITY: i64 = 1000;
/// Label on host mode's per-env Services naming the Service they copy.
pub const SERVICE_LABEL: &str = "envlane.io/service";
/// Label on route EnvoyFilters naming the namespace of their Service.
pub const SERVICE_NAMESPACE_LABEL: &str = "envlane.io/service-namespace";
/// A WasmPlugin's status for operators: its table's revision and size.
pub const TABLE_REVISION_ANNOTATION: &str = "envlane.io/table-revision";
pub const TABLE_PAIRS_ANNOTATION: &str = "envlane.io/table-pairs";
pub const TABLE_SERVICES_ANNOTATION: &str = "envlane.io/table-services";
pub const TABLE_ENVS_ANNOTATION: &str = "envlane.io/table-envs";
/// Label on host mode's per-env Services naming their subset.
pub const SUBSET_LABEL: &str = "envlane.io/subset";
pub const DEFAULT_WASM_URL: &str = "oci://ghcr.io/envlane/envlane-filter:0.1.0";

/// Everything `render` needs besides the cluster's objects.
#[derive(Debug, Clone)]
pub struct RenderOptions {
    /// Filter settings; `envs`, `services` and `revision` are filled in here.
    /// `env_label` is the pod label that holds the env.
    pub settings: PluginConfig,
    pub namespace_selector: LabelSelector,
    pub wasm_plugin_name: String,
    pub wasm_url: String,
    pub wasm_sha256: Option<String>,
    /// Istio's root namespace (`meshConfig.rootNamespace`): EnvoyFilters
    /// there apply to every sidecar.
    pub istio_root_namespace: String,
    /// Observed, not configured: objects envlane-sync cannot write, because
    /// someone else holds the name or the API server refused the write in
    /// this pass. A Service whose DestinationRule or route EnvoyFilter is
    /// among them is left out of the table: the filter must not choose
    /// subset clusters envlane cannot define (a 503).
    pub blocked: BTreeSet<ObjectKey>,
    /// Gateway mode: the centralized gateways and waypoints that get a
    /// WasmPlugin with the caller table.
    pub shared_proxies: Vec<SharedProxy>,
    /// Most caller addresses a shared proxy's table carries.
    pub max_callers: usize,
    /// Endpoint mode: the mesh's trust domain, for the SPIFFE identities
    /// the ORIGINAL_DST clusters check.
    pub trust_domain: String,
}

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Istio's default root namespace.
pub const DEFAULT_ISTIO_ROOT_NAMESPACE: &str = "istio-system";

impl Default for RenderOptions {
    fn default() -> Self {
        Self {
            settings: PluginConfig::default(),
            namespace_selector: LabelSelector::parse("envlane.io/enabled=true").unwrap_or_default(),
            wasm_plugin_name: "envlane".into(),
            wasm_url: DEFAULT_WASM_URL.into(),
            wasm_sha256: None,
            istio_root_namespace: DEFAULT_ISTIO_ROOT_NAMESPACE.into(),
            blocked: BTreeSet::new(),
            shared_proxies: Vec::new(),
            max_callers: shared::DEFAULT_MAX_CALLERS,
            trust_domain: DEFAULT_TRUST_DOMAIN.into(),
        }
    }
}

/// The kinds envlane-sync writes. The order is the output order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    WasmPlugin,
    EnvoyFilter,
    DestinationRule,
    Service,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::WasmPlugin,
        Kind::EnvoyFilter,
        Kind::DestinationRule,
        Kind::Service,
    ];

    pub fn group(self) -> &'static str {
        match self {
            Kind::WasmPlugin => "extensions.istio.io",
            Kind::EnvoyFilter | Kind::DestinationRule => "networking.istio.io",
            Kind::Service => "",
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            Kind::WasmPlugin => "v1alpha1",
            Kind::EnvoyFilter => "v1alpha3",
            Kind::DestinationRule | Kind::Service => "v1",
        }
    }

    pub fn api_version(self) -> String {
        match self.group() {
            "" => self.version().to_string(),
            g => format!("{g}/{}", self.version()),
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            Kind::WasmPlugin => "WasmPlugin",
            Kind::EnvoyFilter => "EnvoyFilter",
            Kind::DestinationRule => "DestinationRule",
            Kind::Service => "Service",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Kind::WasmPlugin => "wasmplugins",
            Kind::EnvoyFilter => "envoyfilters",
            Kind::DestinationRule => "destinationrules",
            Kind::Service => "services",
        }
    }
}

/// Ordered by namespace, then kind, then name: the output order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub kind: Kind,
    pub name: String,
}

impl ObjectKey {
    /// The Service a DestinationRule or route EnvoyFilter is for:
    /// `(namespace, name)`.
    pub fn service(&self) -> Option<(&str, &str)> {
        match self.kind {
            Kind::DestinationRule => self
                .name
                .strip_prefix(DESTINATION_RULE_PREFIX)
                .map(|svc| (self.namespace.as_str(), svc)),
            // `envlane-routes.NS.SVC`, and `….waypoint` for its waypoints'.
            Kind::EnvoyFilter => self
                .name
                .strip_prefix(routes::ENVOY_FILTER_NAME)
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|rest| rest.split_once('.'))
                .map(|(ns, svc)| (ns, svc.strip_suffix(routes::WAYPOINT_SUFFIX).unwrap_or(svc))),
            Kind::WasmPlugin | Kind::Service => None,
        }
    }

    /// The namespace whose tenant the object serves: a route EnvoyFilter
    /// lives in Istio's root namespace but belongs to its Service's.
    pub fn tenant(&self) -> &str {
        match (self.kind, self.service()) {
            (Kind::EnvoyFilter, Some((namespace, _))) => namespace,
            _ => &self.namespace,
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.kind.kind(), self.namespace, self.name)
    }
}

/// One object to apply, with the hash of its content (also stored in its
/// `envlane.io/content-hash` annotation).
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredObject {
    pub key: ObjectKey,
    pub hash: String,
    /// The object as compact JSON: a few KB each, where a parsed `Value` of
    /// a route EnvoyFilter was ~10x that (thousands of them per pass). A
    /// WasmPlugin's `spec.pluginConfig` holds the table's hash here, and the
    /// table itself is `table`.
    json: Box<str>,
    /// The table, one copy shared by every namespace's WasmPlugin: with 400
    /// opted-in namespaces, 400 copies of a 20k-pair table were ~0.5 GiB.
    table: Option<Arc<Value>>,
    /// Bytes of `table` as JSON (0 without one).
    table_bytes: usize,
}

impl DesiredObject {
    /// The whole object as written, built when needed (one at a time).
    pub fn body(&self) -> Value {
        let mut full: Value = serde_json::from_str(&self.json).unwrap_or(Value::Null);
        if let (Some(table), Some(slot)) = (&self.table, full.pointer_mut("/spec/pluginConfig")) {
            *slot = Value::clone(table);
        }
        full
    }

    /// The size of the object as sent (within a few bytes): what the API
    /// server's request limit is checked against.
    pub fn size_bytes(&self) -> usize {
        self.json.len().saturating_add(self.table_bytes)
    }

    #[cfg(test)]
    pub(crate) fn json_for_tests(&self) -> &str {
        &self.json
    }

    /// An object of about `bytes` bytes, for plan tests.
    #[cfg(test)]
    pub(crate) fn for_tests(key: ObjectKey, hash: &str, bytes: usize) -> Self {
        Self {
            key,
            hash: hash.into(),
            json: "{}".into(),
            table: None,
            table_bytes: bytes.saturating_sub(2),
        }
    }
}

/// A pod whose env label value is not a valid env: skipped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InvalidLabel {
    pub namespace: String,
    pub pod: String,
    pub value: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableStats {
    pub envs: usize,
    pub services: usize,
    /// (service, env) pairs.
    pub pairs: usize,
}

#[derive(Debug, Clone)]
pub struct Rendered {
    /// The table, as written into every WasmPlugin.
    pub table: PluginConfig,
    /// Sorted by key.
    pub objects: Vec<DesiredObject>,
    /// Sorted.
    pub invalid_labels: Vec<InvalidLabel>,
    /// Pods with a valid env in opted-in namespaces that are not Ready (or
    /// terminating), `namespace/name`, sorted: their envs count only once
    /// they are Ready.
    pub not_ready: Vec<String>,
    /// Services in the table without a pod of the default env (or with no
    /// default env set), `namespace/name`, sorted: requests without an env
    /// spread over all their envs' pods.
    pub spreading: Vec<String>,
    /// Pairs left out for another reason (host mode: per-env Service name
    /// too long; envs of one Service sharing a subset name).
    pub warnings: Vec<Warning>,
    /// Envs of one Service whose subset names are equal: left out of it.
    pub subset_collisions: Vec<SubsetCollision>,
    pub stats: TableStats,
}

/// Envs of one Service that map to one subset name (e.g. `dev.proj1` and a
/// label spelled like its derived name): a DestinationRule cannot tell them
/// apart, so none of them is routed to for that Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsetCollision {
    pub namespace: String,
    pub service: String,
    pub subset: String,
    pub envs: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("settings: {0}")]
    Settings(String),
    /// The filter would refuse this table: nothing is published.
    #[error("the rendered table does not pass the filter's check: {0}")]
    InvalidTable(ConfigError),
}

/// A Ready pod with a valid env, as far as the matching needs it.
struct Candidate<'a> {
    labels: &'a Labels,
    env: &'a str,
    pod: &'a Pod,
}

/// Renders the table and the objects.
pub fn render<'a>(
    namespaces: impl IntoIterator<Item = &'a Namespace>,
    pods: impl IntoIterator<Item = &'a Pod>,
    services: impl IntoIterator<Item = &'a Service>,
    virtual_services: impl IntoIterator<Item = &'a VirtualService>,
    opts: &RenderOptions,
) -> Result<Rendered, RenderError> {
    let settings = &opts.settings;
    let splitter = Splitter::try_new(&settings.splitter)
        .map_err(|e| RenderError::Settings(format!("splitter: {e}")))?;
    let env_label = settings.env_label.as_str();
    let template = host_template(settings)?;

    let opted: BTreeSet<&str> = namespaces
        .into_iter()
        .filter(|ns| !ns.terminating && opts.namespace_selector.matches(&ns.labels))
        .map(|ns| ns.name.as_str())
        .collect();

    // Ready pods with a valid env, by namespace; invalid values reported.
    let mut invalid_labels = Vec::new();
    let mut not_ready = Vec::new();
    let mut by_namespace: HashMap<&str, Vec<Candidate<'_>>> = HashMap::new();
    let shared_plugins = shared::plugins(&opts.shared_proxies).map_err(RenderError::Settings)?;
    let want_callers = !shared_plugins.is_empty();
    let mut caller_pods: Vec<(&Pod, &str)> = Vec::new();
    for pod in pods {
        if !opted.contains(pod.namespace.as_str()) {
            continue;
        }
        let Some(value) = pod.labels.get(env_label) else {
            continue;
        };
        if let Err(e) = EnvName::try_new(value, splitter) {
            invalid_labels.push(InvalidLabel {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                value: value.clone(),
                reason: e.to_string(),
            });
            continue;
        }
        if pod.ready && want_callers {
            caller_pods.push((pod, value.as_str()));
        }
        if pod.ready {
            by_namespace
                .entry(pod.namespace.as_str())
                .or_default()
                .push(Candidate {
                    labels: &pod.labels,
                    env: value.as_str(),
                    pod,
                });
        } else {
            not_ready.push(format!("{}/{}", pod.namespace, pod.name));
        }
    }
    not_ready.sort();
    invalid_labels.sort();
    invalid_labels.dedup();

    let mut warnings = Vec::new();
    let services: Vec<&Service> = services.into_iter().collect();
    // Services envlane-sync did not write: host mode never takes their names.
    let foreign_names: HashSet<(&str, &str)> = services
        .iter()
        .filter(|svc| !svc.is_managed())
        .map(|svc| (svc.namespace.as_str(), svc.name.as_str()))
        .collect();
    let usable: Vec<&Service> = services
        .into_iter()
        .filter(|svc| {
            opted.contains(svc.namespace.as_str())
                && !svc.is_managed()
                && !svc.external_name
                && !svc.selector.is_empty()
                && !svc.ports.is_empty()
        })
        .collect();
    // Only label keys some selector uses are indexed.
    let selector_keys: HashSet<&str> = usable
        .iter()
        .flat_map(|svc| svc.selector.keys().map(String::as_str))
        .collect();
    // Each namespace's pods indexed by label pair, built when a service needs it.
    let mut indexes: HashMap<&str, HashMap<(&str, &str), Vec<u32>>> = HashMap::new();
    let mut with_envs: Vec<(&Service, BTreeSet<&str>)> = Vec::new();
    // Endpoint mode: each Service's pods by env, its ports' target ports.
    let mut endpoint_of: HashMap<(&str, &str), endpoints::Endpoints> = HashMap::new();
    for svc in usable {
        let Some(pods) = by_namespace.get(svc.namespace.as_str()) else {
            continue;
        };
        let index = indexes
            .entry(svc.namespace.as_str())
            .or_insert_with(|| index_pods(pods, &selector_keys));
        let mut envs = matching_envs(svc, pods, index);
        if envs.is_empty() {
            continue;
        }
        if svc.headless {
            warnings.push(Warning::new(
                Regarding::service(&svc.namespace, &svc.name),
                Reason::HeadlessService,
                format!(
                    "service {}/{} is headless (clusterIP None): Istio sends its requests to the address the client resolved, so env routing cannot apply; left out",
                    svc.namespace, svc.name
                ),
            ));
            continue;
        }
        if settings.mode == Mode::Endpoint {
            let selected: Vec<(&Pod, &str)> = matching_pods(svc, pods, index)
                .map(|c| (c.pod, c.env))
                .collect();
            let (found, why) = endpoints::of(svc, &selected, &opts.trust_domain);
            warnings.extend(why);
            envs.retain(|env| found.by_env.contains_key(*env));
            if envs.is_empty() {
                continue;
            }
            let key = ObjectKey {
                namespace: opts.istio_root_namespace.clone(),
                kind: Kind::EnvoyFilter,
                name: routes::envoy_filter_name(&svc.namespace, &svc.name),
            };
            if opts.blocked.contains(&key) {
                warnings.push(Warning::new(
                    Regarding::service(&svc.namespace, &svc.name),
                    Reason::ServiceBlocked,
                    format!(
                        "service {}/{}: {key} cannot be written (someone else's, too large, or refused); the service is left out of the table",
                        svc.namespace, svc.name
                    ),
                ));
                continue;
            }
            endpoint_of.insert((svc.namespace.as_str(), svc.name.as_str()), found);
        }
        if settings.mode == Mode::Cluster {
            let mut held = vec![
                ObjectKey {
                    namespace: svc.namespace.clone(),
                    kind: Kind::DestinationRule,
                    name: destination_rule_name(svc),
                },
                ObjectKey {
                    namespace: opts.istio_root_namespace.clone(),
                    kind: Kind::EnvoyFilter,
                    name: routes::envoy_filter_name(&svc.namespace, &svc.name),
                },
            ];
            if shared_plugins.iter().any(|p| p.proxy == Proxy::Waypoint) {
                held.push(ObjectKey {
                    namespace: opts.istio_root_namespace.clone(),
                    kind: Kind::EnvoyFilter,
                    name: routes::waypoint_envoy_filter_name(&svc.namespace, &svc.name),
                });
            }
            if let Some(key) = held.iter().find(|k| opts.blocked.contains(k)) {
                warnings.push(Warning::new(
                    Regarding::service(&svc.namespace, &svc.name),
                    Reason::ServiceBlocked,
                    format!(
                        "service {}/{}: {key} cannot be written (someone else's, too large, or refused); the service is left out of the table",
                        svc.namespace, svc.name
                    ),
                ));
                continue;
            }
        }
        with_envs.push((svc, envs));
    }
    with_envs.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
    // Two Services with the same namespace/name cannot exist; a duplicate in
    // the input (e.g. a file listing it twice) keeps the first.
    with_envs.dedup_by(|b, a| a.0.namespace == b.0.namespace && a.0.name == b.0.name);

    // Subset names are a function of the env alone, so nothing another
    // namespace deploys can rename a subset. A DestinationRule holds one
    // Service's subsets, so names only need to differ among one Service's
    // envs: envs of a Service that share a name are left out of that Service
    // (and reported); no other Service is touched.
    let subset_of: HashMap<&str, String> = with_envs
        .iter()
        .flat_map(|(_, e)| e.iter().copied())
        .map(|env| (env, subset_for_env(env, splitter)))
        .collect();
    let mut subset_collisions = Vec::new();
    for (svc, envs) in &mut with_envs {
        let mut by_subset: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for env in envs.iter() {
            let subset = subset_of.get(env).map_or("", String::as_str);
            by_subset.entry(subset).or_default().push(env);
        }
        let mut clashing: HashSet<&str> = HashSet::new();
        for (subset, names) in by_subset.iter().filter(|(_, v)| v.len() > 1) {
            warnings.push(Warning::new(
                Regarding::service(&svc.namespace, &svc.name),
                Reason::SubsetCollision,
                format!(
                    "service {}/{}: envs {} all map to subset `{subset}`; left out of this service",
                    svc.namespace,
                    svc.name,
                    names
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
            ));
            subset_collisions.push(SubsetCollision {
                namespace: svc.namespace.clone(),
                service: svc.name.clone(),
                subset: (*subset).to_string(),
                envs: names.iter().map(|n| (*n).to_string()).collect(),
            });
            clashing.extend(names.iter().copied());
        }
        envs.retain(|e| !clashing.contains(e));
    }
    with_envs.retain(|(_, envs)| !envs.is_empty());
    let subset_of: HashMap<&str, &str> = subset_of
        .iter()
        .map(|(env, subset)| (*env, subset.as_str()))
        .collect();

    // Host mode: a pair is left out, with a warning naming both sides, when
    // its per-env Service name is not a valid name, is also another pair's
    // (`go` + `dev-x` and `go-dev` + `x` both give `go-dev-x`), or is the
    // name of a Service envlane-sync does not own (`api` + `v2` vs the
    // user's `api-v2`): decided before anything is written.
    if settings.mode == Mode::Host {
        let name_of = |svc: &Service, env: &str| {
            let subset = subset_of.get(env).copied().unwrap_or_default();
            per_env_service_name(&template, svc, subset, &settings.cluster_domain)
                .unwrap_or_default()
        };
        let mut claims: HashMap<(String, String), Vec<String>> = HashMap::new();
        for (svc, envs) in &with_envs {
            for env in envs {
                claims
                    .entry((svc.namespace.clone(), name_of(svc, env)))
                    .or_default()
                    .push(format!(
                        "service {}/{} env `{env}`",
                        svc.namespace, svc.name
                    ));
            }
        }
        for (svc, envs) in &mut with_envs {
            envs.retain(|env| {
                let name = name_of(svc, env);
                let pair = format!("service {}/{} env `{env}`", svc.namespace, svc.name);
                let problem = if !is_dns1035_label(&name) {
                    Some("is not a DNS label of at most 63 characters".to_string())
                } else if foreign_names.contains(&(svc.namespace.as_str(), name.as_str())) {
                    Some("is the name of an existing Service envlane-sync does not own".to_string())
                } else {
                    claims
                        .get(&(svc.namespace.clone(), name.clone()))
                        .filter(|c| c.len() > 1)
                        .map(|c| format!("is also the per-env Service of {}", others(c, &pair)))
                };
                if let Some(problem) = &problem {
                    warnings.push(Warning::new(
                        Regarding::service(&svc.namespace, &svc.name),
                        Reason::HostNameClash,
                        format!("{pair}: per-env Service name `{name}` {problem}; left out"),
                    ));
                }
                problem.is_none()
            });
        }
        with_envs.retain(|(_, envs)| !envs.is_empty());
    }

    // Requests without an env (unlabelled callers, the filter's default)
    // reach only the default env's pods where it is deployed; elsewhere they
    // keep the Service's own route: every pod of every env.
    let default_env = settings.default_env.as_deref();
    let mut spreading: Vec<String> = with_envs
        .iter()
        .filter(|(_, envs)| default_env.is_none_or(|d| !envs.contains(d)))
        .map(|(svc, _)| format!("{}/{}", svc.namespace, svc.name))
        .collect();
    spreading.sort();
    for (svc, envs) in &with_envs {
        if default_env.is_some_and(|d| envs.contains(d)) {
            continue;
        }
        warnings.push(Warning::new(
            Regarding::service(&svc.namespace, &svc.name),
            Reason::NoDefaultEnv,
            match default_env {
                Some(d) => format!(
                    "service {}/{} has pods of envs {} but none of the default env `{d}`: requests without an env reach every env's pods",
                    svc.namespace,
                    svc.name,
                    envs.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(", ")
                ),
                None => format!(
                    "service {}/{} has pods of envs {} and no defaultEnv is set: requests without an env reach every env's pods",
                    svc.namespace,
                    svc.name,
                    envs.iter().map(|e| format!("`{e}`")).collect::<Vec<_>>().join(", ")
                ),
            },
        ));
    }

    let used: BTreeSet<&str> = with_envs
        .iter()
        .flat_map(|(_, e)| e.iter().copied())
        .collect();
    let env_index: HashMap<&str, u32> = used.iter().copied().zip(0u32..).collect();
    let mut table = settings.clone();
    table.revision = None;
    table.envs = used
        .iter()
        .map(|env| EnvEntry {
            name: (*env).to_string(),
            subset: subset_of.get(env).map(|s| (*s).to_string()),
        })
        .collect();
    let mut service_entries: Vec<ServiceEntry> = with_envs
        .iter()
        .map(|(svc, envs)| {
            let mut ports: Vec<u16> = svc.ports.iter().map(|p| p.port).collect();
            ports.sort_unstable();
            ports.dedup();
            let envs: Vec<&str> = envs
                .iter()
                .copied()
                .filter(|e| env_index.contains_key(e))
                .collect();
            let host = fqdn(svc, &settings.cluster_domain);
            let (target_ports, endpoints) = match endpoint_of
                .get(&(svc.namespace.as_str(), svc.name.as_str()))
            {
                Some(found) => (
                    found.ports.iter().map(|p| p.target).collect(),
                    EnvPodIps::try_new(
                        envs.iter()
                            .map(|e| found.by_env.get(*e).map(Vec::as_slice).unwrap_or_default()),
                    )
                    .map_err(|e| {
                        RenderError::InvalidTable(ConfigError::new(format!("{host}: endpoints"), e))
                    })?,
                ),
                None => (Vec::new(), EnvPodIps::default()),
            };
            Ok(ServiceEntry {
                host,
                ports,
                envs: envs
                    .iter()
                    .filter_map(|e| env_index.get(e).copied())
                    .collect(),
                target_ports,
                endpoints,
            })
        })
        .collect::<Result<_, RenderError>>()?;
    service_entries.sort_by(|a, b| a.host.cmp(&b.host));
    table.services = service_entries;
    table.revision = Some(short_hash(&table));
    let compiled =
        RoutingTable::compile(&table, &Node::default()).map_err(RenderError::InvalidTable)?;
    // Cluster mode: the route patch for every service port (empty in host mode).
    let virtual_services: Vec<&VirtualService> = virtual_services.into_iter().collect();
    let port_targets = compiled.cluster_targets();

    let stats = TableStats {
        envs: table.envs.len(),
        services: table.services.len(),
        pairs: table.services.iter().map(|s| s.envs.len()).sum(),
    };

    let mut objects = Vec::new();
    let mesh_table = SerializedTable::of(&table)?;
    let status = TableStatus {
        revision: table.revision.as_deref().unwrap_or_default(),
        pairs: stats.pairs.to_string(),
        services: stats.services.to_string(),
        envs: stats.envs.to_string(),
    };
    for ns in &opted {
        objects.push(wasm_plugin(
            ns,
            &opts.wasm_plugin_name,
            PluginTarget::Namespace,
            &mesh_table,
            &status,
            opts,
        ));
    }
    // Gateway mode: each shared proxy's table is the mesh's plus the callers.
    let callers = shared::bounded(
        shared::callers(caller_pods),
        opts.max_callers,
        shared_plugins.first().map_or("", |p| p.namespace.as_str()),
    );
    if want_callers {
        warnings.extend(callers.warnings.iter().cloned());
    }
    for plugin in &shared_plugins {
        let shared_table = shared::table_for(&table, plugin.proxy, &callers);
        RoutingTable::compile(&shared_table, &Node::default())
            .map_err(RenderError::InvalidTable)?;
        let serialized = SerializedTable::of(&shared_table)?;
        let target = match &plugin.selector {
            Some(labels) => PluginTarget::Selector(labels),
            None => PluginTarget::Waypoints(&plugin.waypoints),
        };
        objects.push(wasm_plugin(
            &plugin.namespace,
            plugin.name,
            target,
            &serialized,
            &status,
            opts,
        ));
    }
    let by_fqdn: HashMap<String, &Service> = with_envs
        .iter()
        .map(|(svc, _)| (fqdn(svc, &settings.cluster_domain), *svc))
        .collect();
    // One service's route patches at a time, straight into its object.
    // A centralized gateway's routes get the same patch (same clusters).
    let shapes: &[routes::Shape] = if shared_plugins.iter().any(|p| p.proxy == Proxy::Gateway) {
        &[routes::Shape::Sidecar, routes::Shape::Gateway]
    } else {
        &[routes::Shape::Sidecar]
    };
    let route_warnings = routes::each_service_patches_for(
        shapes,
        &port_targets,
        &virtual_services,
        &settings.cluster_domain,
        |host, patches| {
            if let Some(svc) = by_fqdn.get(host) {
                // Endpoint mode: the ORIGINAL_DST clusters the patched
                // routes map, in the same object (written together).
                let clusters: Vec<Value> = endpoint_of
                    .get(&(svc.namespace.as_str(), svc.name.as_str()))
                    .map(|found| {
                        shapes
                            .iter()
                            .flat_map(|shape| {
                                let context = match shape {
                                    routes::Shape::Gateway => "GATEWAY",
                                    _ => "SIDECAR_OUTBOUND",
                                };
                                found.ports.iter().map(move |p| {
                                    endpoints::cluster_patch(context, host, p, &found.identities)
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                objects.push(route_envoy_filter(
                    svc,
                    &routes::envoy_filter_name(&svc.namespace, &svc.name),
                    &EnvoyFilterSpec {
                        config_patches: Patches {
                            clusters: &clusters,
                            routes: patches,
                        },
                        target_refs: None,
                    },
                    opts,
                ));
            }
        },
    );
    warnings.extend(route_warnings);
    // Waypoints: their own clusters (`inbound-vip|…`), their own objects.
    if shared_plugins.iter().any(|p| p.proxy == Proxy::Waypoint) {
        let waypoint_table = PluginConfig {
            proxy: Proxy::Waypoint,
            ..table.clone()
        };
        let compiled = RoutingTable::compile(&waypoint_table, &Node::default())
            .map_err(RenderError::InvalidTable)?;
        let waypoint_targets = compiled.cluster_targets();
        let waypoint_warnings = routes::each_service_patches_for(
            &[routes::Shape::Waypoint],
            &waypoint_targets,
            &virtual_services,
            &settings.cluster_domain,
            |host, patches| {
                if let Some(svc) = by_fqdn.get(host) {
                    objects.push(route_envoy_filter(
                        svc,
                        &routes::waypoint_envoy_filter_name(&svc.namespace, &svc.name),
                        &EnvoyFilterSpec {
                            config_patches: Patches {
                                clusters: &[],
                                routes: patches,
                            },
                            target_refs: Some([TargetRef {
                                group: "gateway.networking.k8s.io",
                                kind: "GatewayClass",
                                name: routes::WAYPOINT_GATEWAY_CLASS,
                            }]),
                        },
                        opts,
                    ));
                }
            },
        );
        warnings.extend(waypoint_warnings);
    }
    for (svc, envs) in &with_envs {
        let pairs: Vec<(&str, &str)> = envs
            .iter()
            .map(|e| (*e, subset_of.get(e).copied().unwrap_or_default()))
            .collect();
        match settings.mode {
            Mode::Cluster => objects.push(destination_rule(svc, &pairs, opts)),
            // One cluster per Service port, in the route EnvoyFilter.
            Mode::Endpoint => {}
            Mode::Host => {
                for (env, subset) in pairs {
                    let name =
                        per_env_service_name(&template, svc, subset, &settings.cluster_domain)
                            .unwrap_or_default();
                    objects.push(per_env_service(svc, &name, env, subset, env_label));
                }
            }
        }
    }
    objects.sort_by(|a, b| a.key.cmp(&b.key));

    Ok(Rendered {
        table,
        objects,
        invalid_labels,
        not_ready,
        spreading,
        warnings,
        subset_collisions,
        stats,
    })
}

fn index_pods<'a>(
    pods: &[Candidate<'a>],
    keys: &HashSet<&str>,
) -> HashMap<(&'a str, &'a str), Vec<u32>> {
    let mut index: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
    for (i, pod) in (0u32..).zip(pods) {
        for (k, v) in pod.labels {
            if keys.contains(k.as_str()) {
                index.entry((k.as_str(), v.as_str())).or_default().push(i);
            }
        }
    }
    index
}

/// The envs of the Ready pods `svc` selects.
fn matching_envs<'a>(
    svc: &Service,
    pods: &[Candidate<'a>],
    index: &HashMap<(&str, &str), Vec<u32>>,
) -> BTreeSet<&'a str> {
    matching_pods(svc, pods, index).map(|pod| pod.env).collect()
}

/// The Ready pods `svc` selects: candidates from the selector's rarest
/// label pair, each checked against the whole selector.
fn matching_pods<'p, 'a>(
    svc: &'p Service,
    pods: &'p [Candidate<'a>],
    index: &'p HashMap<(&str, &str), Vec<u32>>,
) -> impl Iterator<Item = &'p Candidate<'a>> + 'p {
    let mut rarest: Option<&Vec<u32>> = None;
    for (k, v) in &svc.selector {
        match index.get(&(k.as_str(), v.as_str())) {
            // A selector pair no pod has: nothing matches.
            None => {
                rarest = None;
                break;
            }
            Some(list) if rarest.is_none_or(|r| list.len() < r.len()) => rarest = Some(list),
            Some(_) => {}
        }
    }
    rarest
        .into_iter()
        .flatten()
        .filter_map(move |&i| pods.get(i as usize))
        .filter(move |pod| {
            svc.selector
                .iter()
                .all(|(k, v)| pod.labels.get(k) == Some(v))
        })
}

pub fn fqdn(svc: &Service, cluster_domain: &str) -> String {
    format!("{}.{}.svc.{cluster_domain}", svc.name, svc.namespace)
}

/// Host mode's per-env Service: the first label of the host the filter's
/// `hostTemplate` renders for (service, subset) — `<service>-<subset>` with
/// the default `{name}-{subset}.{namespace}.svc.{clusterDomain}`. `None` when
/// the host is not a Service of the service's own namespace.
pub fn per_env_service_name(
    template: &HostTemplate,
    svc: &Service,
    subset: &str,
    cluster_domain: &str,
) -> Option<String> {
    let host = template.render(&svc.name, &svc.namespace, subset, cluster_domain);
    let rest = format!(".{}.svc.{cluster_domain}", svc.namespace);
    host.strip_suffix(&rest)
        .filter(|name| !name.contains('.'))
        .map(str::to_string)
}

/// The host template, checked once: every host it renders must name a
/// Service in the service's own namespace, or envlane-sync could not create
/// the Services the filter routes to.
fn host_template(settings: &PluginConfig) -> Result<HostTemplate, RenderError> {
    let template = HostTemplate::parse(&settings.host_template)
        .map_err(|e| RenderError::Settings(e.to_string()))?;
    let sample = Service {
        namespace: "ns".into(),
        name: "svc".into(),
        ..Service::default()
    };
    match per_env_service_name(&template, &sample, "subset", &settings.cluster_domain) {
        Some(name) if is_dns1035_label(&name) => Ok(template),
        _ => Err(RenderError::Settings(format!(
            "hostTemplate `{}` renders `{}`, not `<name>.<namespace>.svc.{}`: \
             envlane-sync can only create per-env Services in the Service's own namespace",
            settings.host_template,
            template.render("svc", "ns", "subset", &settings.cluster_domain),
            settings.cluster_domain
        ))),
    }
}

fn is_dns1035_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(u8::is_ascii_lowercase)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// The other claimants of a name, for a warning.
fn others(claims: &[String], me: &str) -> String {
    claims
        .iter()
        .filter(|c| c.as_str() != me)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ")
}

/// The subset name of `env`: `SubsetName::for_env` (the env itself when it
/// is a DNS label, else its sanitised form and a hash). Depends on nothing
/// but the env, so no other env, namespace or tenant can change it.
pub fn subset_for_env(env: &str, splitter: Splitter) -> String {
    match EnvName::try_new(env, splitter) {
        Ok(name) => SubsetName::for_env(&name).as_str().to_string(),
        // Pods with invalid env labels never get here; a 64-bit hash anyway.
        Err(_) => SubsetName::hashed(env, 16).as_str().to_string(),
    }
}

/// A short stable hash of the table (12 hex digits of FNV-1a over its JSON).
fn short_hash(table: &PluginConfig) -> String {
    let bytes = serde_json::to_vec(table).unwrap_or_default();
    format!("{:012x}", fnv1a64(&bytes) & 0xffff_ffff_ffff)
}

/// An object as envlane-sync writes it. Fields and label keys are in sorted
/// order, as a `serde_json::Value` of it would serialize them, so hashes stay
/// what they were when objects were built as `Value`s.
#[derive(Serialize)]
struct ObjectJson<'a, S: Serialize> {
    #[serde(rename = "apiVersion")]
    api_version: &'a str,
    kind: &'a str,
    metadata: MetadataJson<'a>,
    spec: &'a S,
}

#[derive(Serialize)]
struct MetadataJson<'a> {
    labels: BTreeMap<&'a str, &'a str>,
    name: &'a str,
    namespace: &'a str,
}

#[derive(Serialize)]
struct EnvoyFilterSpec<'a> {
    #[serde(rename = "configPatches")]
    config_patches: Patches<'a>,
    /// Waypoints' patches: the waypoint GatewayClass (sidecars have none).
    #[serde(rename = "targetRefs", skip_serializing_if = "Option::is_none")]
    target_refs: Option<[TargetRef; 1]>,
}

/// An EnvoyFilter's patches: endpoint mode's clusters, then the routes
/// (without clusters, the same JSON as the route list alone).
struct Patches<'a> {
    clusters: &'a [Value],
    routes: &'a [routes::RoutePatch<'a>],
}

impl Serialize for Patches<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.clusters.len() + self.routes.len()))?;
        for c in self.clusters {
            seq.serialize_element(c)?;
        }
        for r in self.routes {
            seq.serialize_element(r)?;
        }
        seq.end()
    }
}

#[derive(Serialize)]
struct TargetRef {
    group: &'static str,
    kind: &'static str,
    name: &'static str,
}

/// An object with `labels`, `spec` and, besides the content hash (of
/// everything else), `annotations`: facts derived from what the hash
/// already covers, for operators (`kubectl get -o yaml`).
fn object<S: Serialize>(
    kind: Kind,
    namespace: &str,
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
    spec: &S,
) -> DesiredObject {
    let mut all: BTreeMap<&str, &str> = labels.iter().copied().collect();
    all.insert(MANAGED_BY_KEY, MANAGED_BY_VALUE);
    let api_version = kind.api_version();
    let plain = serde_json::to_string(&ObjectJson {
        api_version: &api_version,
        kind: kind.kind(),
        metadata: MetadataJson {
            labels: all,
            name,
            namespace,
        },
        spec,
    })
    .unwrap_or_default();
    let hash = format!("{:016x}", fnv1a64(plain.as_bytes()));
    // The annotations go in as the first key of `metadata` (`annotations`
    // sorts before `labels`): one serialization instead of a second one.
    let mut all_annotations: BTreeMap<&str, &str> = annotations.iter().copied().collect();
    all_annotations.insert(HASH_ANNOTATION, &hash);
    let annotations_json = serde_json::to_string(&all_annotations).unwrap_or_default();
    let json = match plain.split_once(r#""metadata":{"#) {
        Some((head, tail)) => {
            format!(r#"{head}"metadata":{{"annotations":{annotations_json},{tail}"#)
        }
        None => plain,
    };
    DesiredObject {
        key: ObjectKey {
            kind,
            namespace: namespace.to_string(),
            name: name.to_string(),
        },
        hash,
        json: json.into(),
        table: None,
        table_bytes: 0,
    }
}

/// The content hash covers the table through `table_hash` (the hash of its
/// JSON), so the large table is serialized once, not once per namespace.
/// What the WasmPlugin's annotations say about its table.
struct TableStatus<'a> {
    revision: &'a str,
    pairs: String,
    services: String,
    envs: String,
}

/// Which proxies a WasmPlugin is for.
#[derive(Debug, Clone, Copy)]
enum PluginTarget<'a> {
    /// Every sidecar of the namespace, on its outbound (client) side.
    Namespace,
    /// A centralized gateway's pods, by label.
    Selector(&'a Labels),
    /// Waypoints (Gateway API `Gateway`s), by name.
    Waypoints(&'a [String]),
}

/// A Service's route EnvoyFilter (its sidecars' and gateways', or its
/// waypoints'): in Istio's root namespace, labelled with its Service.
fn route_envoy_filter(
    svc: &Service,
    name: &str,
    spec: &EnvoyFilterSpec<'_>,
    opts: &RenderOptions,
) -> DesiredObject {
    object(
        Kind::EnvoyFilter,
        &opts.istio_root_namespace,
        name,
        &[
            (SERVICE_LABEL, &svc.name),
            (SERVICE_NAMESPACE_LABEL, &svc.namespace),
        ],
        &[],
        spec,
    )
}

/// A table as a WasmPlugin carries it: one shared `Value`, its hash (what
/// the object's own content hash covers instead of the table) and its size.
struct SerializedTable {
    value: Arc<Value>,
    hash: String,
    bytes: usize,
}

impl SerializedTable {
    fn of(table: &PluginConfig) -> Result<Self, RenderError> {
        let value = serde_json::to_value(table)
            .map_err(|e| RenderError::Settings(format!("cannot serialize the table: {e}")))?;
        let json = serde_json::to_vec(table).unwrap_or_default();
        Ok(Self {
            value: Arc::new(value),
            hash: format!("{:016x}", fnv1a64(&json)),
            bytes: json.len(),
        })
    }
}

fn wasm_plugin(
    namespace: &str,
    name: &str,
    target: PluginTarget<'_>,
    table: &SerializedTable,
    status: &TableStatus<'_>,
    opts: &RenderOptions,
) -> DesiredObject {
    let table_hash = table.hash.as_str();
    let mut spec = json!({
        "url": opts.wasm_url,
        "phase": WASM_PHASE,
        "priority": WASM_PRIORITY,
        "type": "HTTP",
        "failStrategy": "FAIL_OPEN",
        "pluginConfig": table_hash,
    });
    if let Some(map) = spec.as_object_mut() {
        if let Some(sha) = &opts.wasm_sha256 {
            map.insert("sha256".into(), sha.clone().into());
        }
        match target {
            PluginTarget::Namespace => {
                map.insert("match".into(), json!([{"mode": "CLIENT"}]));
            }
            PluginTarget::Selector(labels) => {
                map.insert("selector".into(), json!({"matchLabels": labels}));
            }
            PluginTarget::Waypoints(names) => {
                let refs: Vec<Value> = names
                    .iter()
                    .map(|n| json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": n}))
                    .collect();
                map.insert("targetRefs".into(), refs.into());
            }
        }
    }
    let mut obj = object(
        Kind::WasmPlugin,
        namespace,
        name,
        &[],
        &[
            (TABLE_REVISION_ANNOTATION, status.revision),
            (TABLE_PAIRS_ANNOTATION, &status.pairs),
            (TABLE_SERVICES_ANNOTATION, &status.services),
            (TABLE_ENVS_ANNOTATION, &status.envs),
        ],
        &spec,
    );
    obj.table = Some(Arc::clone(&table.value));
    obj.table_bytes = table.bytes;
    obj
}

/// A DestinationRule's spec (keys in sorted order, see [`ObjectJson`]).
#[derive(Serialize)]
struct DestinationRuleSpec<'a> {
    host: String,
    subsets: Vec<SubsetJson<'a>>,
}

#[derive(Serialize)]
struct SubsetJson<'a> {
    labels: BTreeMap<&'a str, &'a str>,
    name: &'a str,
}

fn destination_rule(svc: &Service, pairs: &[(&str, &str)], opts: &RenderOptions) -> DesiredObject {
    let label = opts.settings.env_label.as_str();
    let spec = DestinationRuleSpec {
        host: fqdn(svc, &opts.settings.cluster_domain),
        subsets: pairs
            .iter()
            .map(|(env, subset)| SubsetJson {
                labels: BTreeMap::from([(label, *env)]),
                name: subset,
            })
            .collect(),
    };
    object(
        Kind::DestinationRule,
        &svc.namespace,
        &destination_rule_name(svc),
        &[(SERVICE_LABEL, &svc.name)],
        &[],
        &spec,
    )
}

/// DestinationRules are named `envlane-<service>`.
pub const DESTINATION_RULE_PREFIX: &str = "envlane-";

/// `envlane-<service>`, in the Service's namespace.
fn destination_rule_name(svc: &Service) -> String {
    format!("{DESTINATION_RULE_PREFIX}{}", svc.name)
}

fn per_env_service(
    svc: &Service,
    name: &str,
    env: &str,
    subset: &str,
    env_label: &str,
) -> DesiredObject {
    let mut selector: BTreeMap<&str, &str> = svc
        .selector
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    selector.insert(env_label, env);
    let mut ports: Vec<&crate::model::ServicePort> = svc.ports.iter().collect();
    ports.sort_by_key(|p| (p.port, p.protocol.clone()));
    ports.dedup_by_key(|p| (p.port, p.protocol.clone()));
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| {
            let mut m = Map::new();
            if let Some(name) = &p.name {
                m.insert("name".into(), name.clone().into());
            }
            m.insert("port".into(), p.port.into());
            if let Some(t) = &p.target_port {
                m.insert("targetPort".into(), t.clone());
            }
            if let Some(proto) = &p.protocol {
                m.insert("protocol".into(), proto.clone().into());
            }
            if let Some(ap) = &p.app_protocol {
                m.insert("appProtocol".into(), ap.clone().into());
            }
            Value::Object(m)
        })
        .collect();
    let spec = json!({
        "type": "ClusterIP",
        "selector": selector,
        "ports": ports,
    });
    object(
        Kind::Service,
        &svc.namespace,
        name,
        &[(SERVICE_LABEL, &svc.name), (SUBSET_LABEL, subset)],
        &[],
        &spec,
    )
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
