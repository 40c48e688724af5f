//! The plugin config: the one schema the filter parses and `envlane-sync`
//! writes. Plain serde data; [`crate::table::RoutingTable::compile`] checks it
//! and turns it into the lookup structure.
//!
//! Compact by design: env names are listed once in `envs` and each service
//! names its envs by index, so a (service, env) pair costs a few bytes.

use serde::{Deserialize, Serialize};

use crate::limits::MAX_CONFIG_BYTES;

pub const DEFAULT_ENV_HEADER: &str = "x-virtual-env";
pub const DEFAULT_ENV_LABEL: &str = "virtual-env";
pub const DEFAULT_SPLITTER: &str = ".";
pub const DEFAULT_ROUTE_HEADER: &str = "x-envlane-cluster";
pub const DEFAULT_DEBUG_HEADER: &str = "x-envlane-debug";
pub const DECISION_HEADER: &str = "x-envlane-decision";
/// The filter-state property the filter writes, in a stream, with the cluster
/// it chose (Envoy stores it as `wasm.envlane_route`). envlane's route
/// matches only on it: a client header alone can never select that route.
/// One path part: Envoy joins several with a NUL byte.
pub const ROUTE_STATE_PROPERTY: &str = "envlane_route";
/// The filter-state key Envoy's route match names.
pub const ROUTE_STATE_KEY: &str = "wasm.envlane_route";
/// Every value the filter writes there starts so (an Istio cluster name).
pub const ROUTE_STATE_PREFIX: &str = "outbound|";
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
pub const DEFAULT_HOST_TEMPLATE: &str = "{name}-{subset}.{namespace}.svc.{clusterDomain}";

/// How a decision is applied to the request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Mode {
    /// Set `routeHeader` to the Istio subset cluster `outbound|PORT|SUBSET|FQDN`;
    /// a route with `cluster_header` sends the request there.
    #[default]
    Cluster,
    /// Rewrite `:authority` to a per-env Service host made from `hostTemplate`.
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginConfig {
    /// Request header that carries the env.
    #[serde(default = "default_env_header")]
    pub env_header: String,
    /// W3C `baggage` member key that carries the env; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baggage_key: Option<String>,
    /// More places to read the env from, tried after the header and baggage.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "crate::limits::aliases"
    )]
    pub env_aliases: Vec<EnvAlias>,
    /// Pod label whose value (from node metadata) is the caller's own env.
    #[serde(default = "default_env_label")]
    pub env_label: String,
    /// When the env comes from the caller's label, add `envHeader` to the
    /// request so the next hop sees it.
    #[serde(default = "default_true")]
    pub auto_inject: bool,
    /// Separates env levels.
    #[serde(default = "default_splitter")]
    pub splitter: String,
    /// Env used when no level of the request's env has the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_env: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    /// Internal header holding the chosen cluster (cluster mode). Always
    /// stripped from incoming requests first.
    #[serde(default = "default_route_header")]
    pub route_header: String,
    /// When `debug` is on and a request carries this header, the response
    /// explains the decision in `x-envlane-decision`.
    #[serde(default = "default_debug_header")]
    pub debug_header: String,
    /// Answer `debugHeader` with an explanation. Off by default: the
    /// explanation names clusters, envs and the caller's label.
    #[serde(default, skip_serializing_if = "is_false")]
    pub debug: bool,
    /// The filter runs at the mesh edge (an ingress gateway): it removes from
    /// every request what outsiders must not set (`envHeader`, the baggage
    /// member, alias headers and cookies, `routeHeader`, `debugHeader`) and
    /// routes nothing.
    #[serde(default, skip_serializing_if = "is_false")]
    pub edge: bool,
    /// Kubernetes cluster domain, used to resolve short service names.
    #[serde(default = "default_cluster_domain")]
    pub cluster_domain: String,
    /// Host mode: the per-env Service host. Placeholders: `{name}`,
    /// `{namespace}`, `{subset}`, `{clusterDomain}`.
    #[serde(default = "default_host_template")]
    pub host_template: String,
    /// Free-form label of this table (e.g. a hash), logged when it is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Every env the table mentions; services refer to them by index.
    #[serde(default, deserialize_with = "crate::limits::envs")]
    pub envs: Vec<EnvEntry>,
    #[serde(default, deserialize_with = "crate::limits::services")]
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
            route_header: default_route_header(),
            debug_header: default_debug_header(),
            debug: false,
            edge: false,
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
#[serde(rename_all = "camelCase")]
pub struct EnvAlias {
    /// A request header whose whole value is the env (e.g. `x-lane`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A cookie (inside `cookie` headers) whose value is the env.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvEntry {
    pub name: String,
    /// DestinationRule subset for this env; derived from the name when absent
    /// (see `SubsetName::for_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntry {
    /// The Service FQDN, `name.namespace.svc.<clusterDomain>` (or any other
    /// host, matched as written).
    pub host: String,
    /// Service ports; a request to another port is left untouched.
    #[serde(deserialize_with = "crate::limits::ports")]
    pub ports: Vec<u16>,
    /// Indexes into `envs`: the envs that have Ready pods of this service.
    #[serde(deserialize_with = "crate::limits::env_ids")]
    pub envs: Vec<u32>,
}

fn default_env_header() -> String {
    DEFAULT_ENV_HEADER.into()
}
fn default_env_label() -> String {
    DEFAULT_ENV_LABEL.into()
}
fn default_splitter() -> String {
    DEFAULT_SPLITTER.into()
}
fn default_route_header() -> String {
    DEFAULT_ROUTE_HEADER.into()
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
