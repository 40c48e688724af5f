//! The plugin config: the one schema the filter parses and `envlane-sync`
//! writes. Plain serde data; [`crate::table::RoutingTable::compile`] checks it
//! and turns it into the lookup structure.
//!
//! Compact by design: env names are listed once in `envs` and each service
//! names its envs by index, so a (service, env) pair costs a few bytes.

use serde::{Deserialize, Serialize};

use crate::limits::MAX_CONFIG_BYTES;
use crate::pod_ips::EnvPodIps;

pub const DEFAULT_ENV_HEADER: &str = "x-virtual-env";
pub const DEFAULT_ENV_LABEL: &str = "virtual-env";
pub const DEFAULT_SPLITTER: &str = ".";
pub const DEFAULT_DEBUG_HEADER: &str = "x-envlane-debug";
pub const DECISION_HEADER: &str = "x-envlane-decision";
/// The filter-state property the filter writes, in a stream, with the
/// cluster it chose (Envoy stores it as `wasm.envlane_route`). The route
/// patch envlane-sync renders reads only this: no request header can set
/// it. One path part: Envoy joins several with a NUL byte.
pub const ROUTE_STATE_PROPERTY: &str = "envlane_route";
/// The filter-state key the route patch's matcher reads.
pub const ROUTE_STATE_KEY: &str = "wasm.envlane_route";
/// The Envoy filter-state key endpoint mode writes with the chosen pod's
/// `IP:PORT`: an ORIGINAL_DST cluster connects there (Envoy's
/// `envoy.network.transport_socket.original_dst_address`; only the filter
/// writes it, no request header does).
pub const ORIGINAL_DST_STATE_KEY: &str = "envoy.network.transport_socket.original_dst_address";
/// Placeholder of an edge rule's `previewHost`: the env, as one or more DNS
/// labels (`{env}.preview.example.com`).
pub const PREVIEW_ENV_PLACEHOLDER: &str = "{env}";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_HOST_TEMPLATE: &str = "{name}-{subset}.{namespace}.svc.{clusterDomain}";

// The JSON Schema of the config (`envlane-sync schema`, feature `schema`):
// what the filter checks, as far as a schema can say it. The patterns are
// ECMA-262 regexes; sync/tests/schema_cli.rs checks them against the filter.

/// `$id` of the plugin config's JSON Schema.
pub const SCHEMA_ID: &str = "https://envlane.io/schemas/plugin-config.schema.json";
/// `title` of the plugin config's JSON Schema.
pub const SCHEMA_TITLE: &str = "envlane plugin config";
/// An RFC 7230 token: header names (`envHeader`, `debugHeader`, alias
/// headers; never a `:` pseudo-header) and W3C baggage keys.
pub const TOKEN_PATTERN: &str = r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$";
/// An env name with the default splitter `.`: 1 to
/// [`crate::names::MAX_ENV_LEVELS`] levels of `[A-Za-z0-9_-]`.
pub const ENV_NAME_PATTERN: &str = r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+){0,7}$";
/// An env name with another splitter: printable ASCII (the filter checks the
/// levels when it loads the table).
pub const ENV_NAME_ANY_SPLITTER_PATTERN: &str = r"^[!-~]+$";
/// Lower-case DNS labels joined by `.`: service hosts, `clusterDomain`.
pub const DNS_NAME_PATTERN: &str =
    r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$";
/// A DNS-1123 label: DestinationRule subsets.
pub const DNS_LABEL_PATTERN: &str = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$";
/// `splitter`: one printable ASCII character that is not a letter or a digit.
pub const SPLITTER_PATTERN: &str = r"^[!-/:-@\[-`{-~]$";
/// A cookie name (`envAliases[].cookie`).
pub const COOKIE_NAME_PATTERN: &str = r"^[^;= ,]+$";
/// `hostTemplate`: text without `{` and the placeholders `{name}`,
/// `{namespace}`, `{subset}`, `{clusterDomain}`; `{subset}` at least once.
pub const HOST_TEMPLATE_PATTERN: &str = r"^(?:[^{]|\{(?:name|namespace|subset|clusterDomain)\})*\{subset\}(?:[^{]|\{(?:name|namespace|subset|clusterDomain)\})*$";
/// Longest `envLabel`: a Kubernetes label key, `prefix/name` (253 + 1 + 63).
pub const MAX_LABEL_KEY_LEN: usize = 317;
/// Longest DNS name (service hosts, `clusterDomain`).
pub const MAX_DNS_NAME_LEN: usize = 253;
/// Longest DNS label (subsets).
pub const MAX_DNS_LABEL_LEN: usize = 63;

/// How a decision is applied to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Write the Istio subset cluster `outbound|PORT|SUBSET|FQDN` to filter
    /// state; envlane's patch of the service's routes sends the request there,
    /// keeping the route's own policy (timeouts, retries, faults, ...).
    #[default]
    Cluster,
    /// Rewrite `:authority` to a per-env Service host made from `hostTemplate`.
    Host,
    /// Pick one Ready pod of the env (spread by a scrambled per-VM request
    /// counter over `endpoints`), write
    /// its `IP:TARGETPORT` to Envoy filter state
    /// `envoy.network.transport_socket.original_dst_address` and the service
    /// port's ORIGINAL_DST cluster (`outbound|PORT|envlane-endpoints|FQDN`,
    /// added with Istio's mTLS by envlane-sync) to `wasm.envlane_route`. No
    /// Envoy cluster per (service, env).
    Endpoint,
}

/// Where the filter runs, which says where a request's env may come from
/// besides the request itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "camelCase")]
pub enum Proxy {
    /// In the caller's pod: a request without an env gets the pod's own env
    /// label (`envLabel`, from node metadata).
    #[default]
    Sidecar,
    /// A shared router carrying many pods' east-west traffic (a centralized
    /// gateway): the proxy has no env of its own; a request without an env
    /// gets its caller's, looked up by source address in `callers`.
    Gateway,
    /// An Istio ambient waypoint: like `gateway`, and the caller may also be
    /// found by the (namespace, workload) the waypoint knows for its peer
    /// (`callerWorkloads`).
    Waypoint,
}

impl Proxy {
    /// Shared proxies have no env of their own.
    pub fn is_shared(self) -> bool {
        !matches!(self, Self::Sidecar)
    }
}

/// The WasmPlugin's `pluginConfig`: what the filter reads and envlane-sync
/// writes. Besides what this schema says, the filter checks when it loads
/// the table that env indexes are in range, env names, subsets and hosts are
/// unique, host mode has `name.namespace.svc.<clusterDomain>` hosts, env
/// names have valid levels with a custom splitter, and the limits on
/// (service, env) pairs and targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(deny_unknown_fields, transform = schema::env_names)
)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    /// Request header that carries the env.
    #[serde(default = "default_env_header")]
    #[cfg_attr(feature = "schema", schemars(pattern(TOKEN_PATTERN)))]
    pub env_header: String,
    /// W3C `baggage` member key that carries the env; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(TOKEN_PATTERN)))]
    pub baggage_key: Option<String>,
    /// More places to read the env from, tried after the header and baggage.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::limits::aliases"
    )]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_ALIASES)))]
    pub env_aliases: Vec<EnvAlias>,
    /// Pod label whose value (from node metadata) is the caller's own env.
    #[serde(default = "default_env_label")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_LABEL_KEY_LEN)))]
    pub env_label: String,
    /// When the env comes from the caller's label, add `envHeader` to the
    /// request so the next hop sees it.
    #[serde(default = "default_true")]
    pub auto_inject: bool,
    /// Separates env levels.
    #[serde(default = "default_splitter")]
    #[cfg_attr(feature = "schema", schemars(pattern(SPLITTER_PATTERN)))]
    pub splitter: String,
    /// Env used when no level of the request's env has the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = crate::names::MAX_ENV_LEN)))]
    pub default_env: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// When `debug` is on and a request carries this header, the response
    /// explains the decision in `x-envlane-decision`.
    #[serde(default = "default_debug_header")]
    #[cfg_attr(feature = "schema", schemars(pattern(TOKEN_PATTERN)))]
    pub debug_header: String,
    /// Answer `debugHeader` with an explanation. Off by default: the
    /// explanation names clusters, envs and the caller's label.
    #[serde(default, skip_serializing_if = "is_false")]
    #[cfg_attr(feature = "schema", schemars(extend("default" = false)))]
    pub debug: bool,
    /// The filter runs at the mesh edge (an ingress gateway): it removes from
    /// every request what outsiders must not set (`envHeader`, the baggage
    /// member, alias headers and cookies, `debugHeader`); the env is only
    /// what `edgeRules` give (then set as `envHeader` for the hops behind).
    /// Routes only hosts in its own table (none in the shipped edge config).
    #[serde(default, skip_serializing_if = "is_false")]
    #[cfg_attr(feature = "schema", schemars(extend("default" = false)))]
    pub edge: bool,
    /// Where the filter runs (see [`Proxy`]).
    #[serde(default, skip_serializing_if = "is_default")]
    pub proxy: Proxy,
    /// Shared proxies: the env of each caller pod, by pod IP (the TCP peer's
    /// address, never a header). Only Ready pods; an IP held by pods of
    /// different envs is left out.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::limits::callers"
    )]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_CALLER_IPS)))]
    pub callers: Vec<CallerEntry>,
    /// Waypoints: the env of each caller workload, by (namespace, workload
    /// name), for peers the waypoint knows by identity rather than address.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::limits::caller_workloads"
    )]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_CALLER_WORKLOADS)))]
    pub caller_workloads: Vec<CallerWorkloadEntry>,
    /// With `edge`: rules that give a request entering the mesh its env,
    /// tried in order (first match wins) before the request is cleaned of
    /// what outsiders must not set.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::limits::edge_rules"
    )]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_EDGE_RULES)))]
    pub edge_rules: Vec<EdgeRule>,
    /// Kubernetes cluster domain, used to resolve short service names.
    #[serde(default = "default_cluster_domain")]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_DNS_NAME_LEN), pattern(DNS_NAME_PATTERN)))]
    pub cluster_domain: String,
    /// Host mode: the per-env Service host. Placeholders: `{name}`,
    /// `{namespace}`, `{subset}`, `{clusterDomain}`.
    #[serde(default = "default_host_template")]
    #[cfg_attr(feature = "schema", schemars(pattern(HOST_TEMPLATE_PATTERN)))]
    pub host_template: String,
    /// Free-form label of this table (e.g. a hash), logged when it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Every env the table mentions; services refer to them by index.
    #[serde(default, deserialize_with = "crate::limits::envs")]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_ENVS)))]
    pub envs: Vec<EnvEntry>,
    #[serde(default, deserialize_with = "crate::limits::services")]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_SERVICES)))]
    pub services: Vec<ServiceEntry>,
}

impl Default for PluginConfig {
    fn default() -> Self {
        Self {
            env_header: default_env_header(),
            baggage_key: None,
            env_aliases: Vec::new(),
            env_label: default_env_label(),
            auto_inject: true,
            splitter: default_splitter(),
            default_env: None,
            mode: Mode::Cluster,
            debug_header: default_debug_header(),
            debug: false,
            edge: false,
            proxy: Proxy::Sidecar,
            callers: Vec::new(),
            caller_workloads: Vec::new(),
            edge_rules: Vec::new(),
            cluster_domain: default_cluster_domain(),
            host_template: default_host_template(),
            revision: None,
            envs: Vec::new(),
            services: Vec::new(),
        }
    }
}

/// Another place the env may be found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "schema",
    schemars(deny_unknown_fields, transform = schema::exactly_one_source)
)]
#[serde(rename_all = "camelCase")]
pub struct EnvAlias {
    /// A request header whose whole value is the env (e.g. `x-lane`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(TOKEN_PATTERN)))]
    pub header: Option<String>,
    /// A cookie (inside `cookie` headers) whose value is the env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(COOKIE_NAME_PATTERN)))]
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(rename_all = "camelCase")]
pub struct EnvEntry {
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = crate::names::MAX_ENV_LEN)))]
    pub name: String,
    /// DestinationRule subset for this env; derived from the name when absent
    /// (see `SubsetName::for_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_DNS_LABEL_LEN), pattern(DNS_LABEL_PATTERN)))]
    pub subset: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    /// The Service FQDN, `name.namespace.svc.<clusterDomain>` (or any other
    /// host, matched as written).
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_DNS_NAME_LEN), pattern(DNS_NAME_PATTERN)))]
    pub host: String,
    /// Service ports; a request to another port is left untouched.
    #[serde(deserialize_with = "crate::limits::ports")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = crate::limits::MAX_PORTS_PER_SERVICE), inner(range(min = 1))))]
    pub ports: Vec<u16>,
    /// Indexes into `envs`: the envs that have Ready pods of this service.
    #[serde(deserialize_with = "crate::limits::env_ids")]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_ENVS)))]
    pub envs: Vec<u32>,
    /// Endpoint mode: the pods' port of each of `ports` (same order); empty:
    /// the same numbers as `ports`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::limits::ports"
    )]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_PORTS_PER_SERVICE), inner(range(min = 1))))]
    pub target_ports: Vec<u16>,
    /// Endpoint mode: for each of `envs` (same order), the IPs of the
    /// service's Ready pods of that env, as Kubernetes writes them
    /// (canonical IPv4 or IPv6 text).
    #[serde(default, skip_serializing_if = "EnvPodIps::is_empty")]
    #[cfg_attr(feature = "schema", schemars(with = "Vec<Vec<String>>", length(max = crate::limits::MAX_ENVS), inner(length(min = 1, max = crate::limits::MAX_ENDPOINTS))))]
    pub endpoints: EnvPodIps,
}

/// Caller pods of one env, by IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(rename_all = "camelCase")]
pub struct CallerEntry {
    /// Index into `envs`.
    pub env: u32,
    /// IPv4 or IPv6 addresses, as Kubernetes writes `status.podIPs`.
    #[serde(deserialize_with = "crate::limits::caller_ips")]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_CALLER_IPS)))]
    pub ips: Vec<String>,
}

/// Caller workloads of one env in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(rename_all = "camelCase")]
pub struct CallerWorkloadEntry {
    /// Index into `envs`.
    pub env: u32,
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = MAX_DNS_LABEL_LEN)))]
    pub namespace: String,
    /// Workload names as Istio reports them (a Deployment's name).
    #[serde(deserialize_with = "crate::limits::caller_workload_names")]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_CALLER_WORKLOADS)))]
    pub workloads: Vec<String>,
}

/// One rule of env assignment at the edge. Exactly one input: `header`,
/// `cookie` or `previewHost`. A header or cookie rule gives `env` when the
/// value is one of `values` (e.g. a list of user ids) or falls in the
/// stable `percent` share of values (by a hash, the same value always in or
/// out). A `previewHost` rule reads the env from the request's host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(feature = "schema", schemars(deny_unknown_fields))]
#[serde(rename_all = "camelCase")]
pub struct EdgeRule {
    /// The env given (header and cookie rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(min = 1, max = crate::names::MAX_ENV_LEN)))]
    pub env: Option<String>,
    /// Request header to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(TOKEN_PATTERN)))]
    pub header: Option<String>,
    /// Cookie to read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(COOKIE_NAME_PATTERN)))]
    pub cookie: Option<String>,
    /// Exact values that match.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::limits::rule_values"
    )]
    #[cfg_attr(feature = "schema", schemars(length(max = crate::limits::MAX_RULE_VALUES)))]
    pub values: Vec<String>,
    /// Share of values that match, 0 to 100 (hundredths count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 100.0)))]
    pub percent: Option<f64>,
    /// A host template with `{env}` once, e.g. `{env}.preview.example.com`:
    /// a request for `dev.proj1.preview.example.com` gets env `dev.proj1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(length(max = MAX_DNS_NAME_LEN)))]
    pub preview_host: Option<String>,
}

// `percent` is a float: compared as written, never NaN after parsing JSON.
impl Eq for EdgeRule {}

fn default_env_header() -> String {
    DEFAULT_ENV_HEADER.into()
}
fn default_env_label() -> String {
    DEFAULT_ENV_LABEL.into()
}
fn default_splitter() -> String {
    DEFAULT_SPLITTER.into()
}
fn default_debug_header() -> String {
    DEFAULT_DEBUG_HEADER.into()
}
fn default_cluster_domain() -> String {
    DEFAULT_CLUSTER_DOMAIN.into()
}
fn default_host_template() -> String {
    DEFAULT_HOST_TEMPLATE.into()
}
fn default_true() -> bool {
    true
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// The JSON Schema (draft 2020-12) of [`PluginConfig`], as `envlane-sync
/// schema` prints it.
#[cfg(feature = "schema")]
pub fn json_schema() -> serde_json::Value {
    schema::root()
}

#[cfg(feature = "schema")]
mod schema {
    use schemars::Schema;
    use serde_json::{json, Value};

    use super::{
        PluginConfig, DEFAULT_SPLITTER, ENV_NAME_ANY_SPLITTER_PATTERN, ENV_NAME_PATTERN, SCHEMA_ID,
        SCHEMA_TITLE,
    };

    pub(super) fn root() -> Value {
        let generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
        let mut schema = generator.into_root_schema_for::<PluginConfig>();
        schema.insert("$id".into(), SCHEMA_ID.into());
        schema.insert("title".into(), SCHEMA_TITLE.into());
        schema.to_value()
    }

    /// Env names (`defaultEnv`, `envs[].name`): exact with the default
    /// splitter, printable ASCII with another (the filter checks the levels).
    pub(super) fn env_names(schema: &mut Schema) {
        let names = |pattern: &str| {
            json!({"properties": {
                "defaultEnv": {"pattern": pattern},
                "envs": {"items": {"properties": {"name": {"pattern": pattern}}}},
            }})
        };
        schema.insert(
            "if".into(),
            json!({"properties": {"splitter": {"const": DEFAULT_SPLITTER}}}),
        );
        schema.insert("then".into(), names(ENV_NAME_PATTERN));
        schema.insert("else".into(), names(ENV_NAME_ANY_SPLITTER_PATTERN));
    }

    /// An alias names a header or a cookie, never both.
    pub(super) fn exactly_one_source(schema: &mut Schema) {
        let one = |set: &str, unset: &str| {
            json!({
                "required": [set],
                "properties": {(set): {"type": "string"}, (unset): {"type": "null"}},
            })
        };
        schema.insert(
            "oneOf".into(),
            json!([one("header", "cookie"), one("cookie", "header")]),
        );
    }
}

/// A config error: the JSON path of the bad field and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub problem: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "invalid envlane config: field `{}`: {}",
            self.field, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}

/// A config as the filter reads it: fields this build does not know are
/// listed, not refused (forward compatible, as Envoy treats xDS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub config: PluginConfig,
    /// Paths of the ignored fields (at most [`crate::unknown::MAX_REPORTED`]).
    pub unknown_fields: Vec<String>,
}

/// The filter's parse: unknown fields are ignored and reported.
pub fn parse_forward_compatible(json: &[u8]) -> Result<Parsed, ConfigError> {
    let config = parse_known(json)?;
    Ok(Parsed {
        config,
        unknown_fields: crate::unknown::unknown_fields(json),
    })
}

/// The strict parse (`envlane-sync render` and `validate`): an unknown field
/// is an error that names it.
pub fn parse(json: &[u8]) -> Result<PluginConfig, ConfigError> {
    let config = parse_known(json)?;
    match crate::unknown::unknown_fields(json).into_iter().next() {
        Some(field) => Err(ConfigError::new(
            field,
            "unknown field (not in this version of the envlane config)",
        )),
        None => Ok(config),
    }
}

/// Parses the JSON straight into the typed config (a 100k-pair table builds
/// no JSON tree). On error the message names the field: the path of the
/// JSON value where serde stopped, e.g. `services[3].ports[0]`.
fn parse_known(json: &[u8]) -> Result<PluginConfig, ConfigError> {
    if json.len() > MAX_CONFIG_BYTES {
        return Err(too_big(json.len()));
    }
    let json = if json.iter().all(u8::is_ascii_whitespace) {
        b"{}".as_slice()
    } else {
        json
    };
    // serde would read a JSON array as the struct's fields in order.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ConfigError::new("(document)", "expected a JSON object"));
    }
    serde_json::from_slice::<PluginConfig>(json).map_err(|e| {
        let field = match e.classify() {
            serde_json::error::Category::Data => {
                // A missing field is reported inside its object, before the `}`.
                let object = e.to_string().starts_with("missing field");
                path_at(json, e.line(), e.column(), object)
            }
            _ => None,
        };
        ConfigError::new(field.unwrap_or_else(|| "(document)".into()), e.to_string())
    })
}

/// The error for a config over [`MAX_CONFIG_BYTES`] (also used by the filter,
/// which checks the size before reading the config).
pub fn too_big(bytes: usize) -> ConfigError {
    ConfigError::new(
        "(document)",
        format!("{bytes} bytes is over the limit of {MAX_CONFIG_BYTES} bytes"),
    )
}

/// One open JSON container while scanning.
enum Frame {
    /// The key read last, and whether the next string is a key.
    Object {
        key: Vec<u8>,
        want_key: bool,
    },
    Array {
        index: usize,
    },
}

/// The path (`a[1].b`) of the value at `line`:`column` (1-based, where
/// serde_json reported an error): the member or element being read there, or
/// the container that just closed; with `object`, the object being read.
/// `None` outside an object member.
fn path_at(json: &[u8], line: usize, column: usize, object: bool) -> Option<String> {
    let line_start = if line <= 1 {
        0
    } else {
        json.iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .nth(line - 2)
            .map(|(i, _)| i + 1)?
    };
    let end = line_start.checked_add(column)?.min(json.len());
    let text = json.get(..end)?;

    let mut stack: Vec<Frame> = Vec::new();
    let mut closed: Option<String> = None;
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        i += 1;
        if b.is_ascii_whitespace() || b == b':' {
            continue;
        }
        closed = None;
        match b {
            b'{' => stack.push(Frame::Object {
                key: Vec::new(),
                want_key: true,
            }),
            b'[' => stack.push(Frame::Array { index: 0 }),
            b'}' | b']' => {
                closed = Some(render_path(&stack));
                stack.pop();
            }
            b',' => match stack.last_mut() {
                Some(Frame::Object { want_key, .. }) => *want_key = true,
                Some(Frame::Array { index }) => *index += 1,
                None => {}
            },
            b'"' => {
                let start = i;
                while let Some(&c) = text.get(i) {
                    i += 1;
                    match c {
                        b'\\' => i += 1,
                        b'"' => break,
                        _ => {}
                    }
                }
                if let Some(Frame::Object { key, want_key }) = stack.last_mut() {
                    if *want_key {
                        *want_key = false;
                        *key = text.get(start..i.saturating_sub(1))?.to_vec();
                    }
                }
            }
            _ => {}
        }
    }
    if object {
        if let Some(Frame::Object { key, .. }) = stack.last_mut() {
            key.clear();
        }
        closed = None;
    }
    let path = closed.unwrap_or_else(|| render_path(&stack));
    (!path.is_empty() && !path.starts_with('[')).then_some(path)
}

fn render_path(stack: &[Frame]) -> String {
    let mut out = String::new();
    for frame in stack {
        match frame {
            Frame::Object { key, .. } if key.is_empty() => {}
            Frame::Object { key, .. } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&String::from_utf8_lossy(key));
            }
            Frame::Array { index } => {
                out.push('[');
                out.push_str(&index.to_string());
                out.push(']');
            }
        }
    }
    out
}
