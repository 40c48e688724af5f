//! What the filter does at each host callback, written against [`Host`]: the
//! few host calls it needs. `filter.rs` implements `Host` with proxy-wasm (the
//! only module that touches it); tests drive this module with a fake host
//! that fails, omits and oversizes at will.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;

use crate::config::{self, DECISION_HEADER, ORIGINAL_DST_STATE_KEY, ROUTE_STATE_PROPERTY};
use crate::decide::{plan_with, Caller, Outcome};
use crate::edge::{edge_plan, Rewrite};
use crate::limits::MAX_CONFIG_BYTES;
use crate::table::{Node, RoutingTable};
use crate::wire::HeaderMap;

/// The host calls the filter makes. Each reports failure as `None`/`false`;
/// none may panic.
pub trait Host {
    /// The plugin configuration (`size` bytes, as announced by the host).
    fn plugin_config(&self, size: usize) -> Option<Vec<u8>>;
    /// A property such as `["xds", "node", "metadata", "NAMESPACE"]`.
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
    /// All request headers, serialized (see [`crate::wire`]).
    fn request_headers(&self) -> Option<Vec<u8>>;
    fn remove_request_header(&self, name: &str) -> bool;
    fn set_request_header(&self, name: &str, value: &[u8]) -> bool;
    fn set_response_header(&self, name: &str, value: &[u8]) -> bool;
    /// Writes filter state `wasm.<name>` (only inside a stream).
    fn set_filter_state(&self, name: &str, value: &[u8]) -> bool;
    /// Writes an Envoy filter-state object `key` (one Envoy knows how to
    /// make from a string, e.g. [`ORIGINAL_DST_STATE_KEY`]), with Envoy's
    /// `set_envoy_filter_state` foreign function (only inside a stream).
    fn set_envoy_filter_state(&self, key: &str, value: &[u8], span: LifeSpan) -> bool;
    /// Makes Envoy pick the route again after the headers changed.
    fn clear_route_cache(&self);
    fn define_counter(&self, name: &str) -> Option<u32>;
    fn increment(&self, id: u32);
    /// Data shared by every VM of this plugin in the Envoy process.
    fn shared_data(&self, key: &str) -> Option<Vec<u8>>;
    fn set_shared_data(&self, key: &str, value: &[u8]) -> bool;
}

/// How long Envoy keeps a filter-state object (its `LifeSpan` enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifeSpan {
    FilterChain = 0,
    DownstreamRequest = 1,
    DownstreamConnection = 2,
}

/// The argument of Envoy's `set_envoy_filter_state` foreign function: the
/// protobuf `envoy.source.extensions.common.wasm.SetEnvoyFilterStateArguments`
/// (1: path, 2: value, 3: span; a zero span is left out, as protobuf does).
pub fn envoy_filter_state_args(key: &str, value: &[u8], span: LifeSpan) -> Vec<u8> {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut out = Vec::with_capacity(key.len() + value.len() + 12);
    for (tag, bytes) in [(0x0a, key.as_bytes()), (0x12, value)] {
        out.push(tag);
        varint(&mut out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    if span != LifeSpan::FilterChain {
        out.push(0x18);
        varint(&mut out, span as u64);
    }
    out
}

/// Counter names (Envoy shows them as `wasmcustom.<name>`).
pub const COUNTER_INVALID_ENV: &str = "envlane.env.invalid";
pub const COUNTER_CONFIG_UNKNOWN_FIELDS: &str = "envlane.config.unknown_fields";
pub const COUNTER_CONFIG_INVALID: &str = "envlane.config.invalid";
pub const COUNTER_ROUTE_FAILED: &str = "envlane.route.failed";
pub const COUNTER_EDGE_STRIPPED: &str = "envlane.edge.stripped";

/// Envoy's counter ids.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    outcomes: [Option<u32>; 4],
    invalid_env: Option<u32>,
    unknown_fields: Option<u32>,
    config_invalid: Option<u32>,
    route_failed: Option<u32>,
    edge_stripped: Option<u32>,
}

impl Counters {
    fn define(host: &impl Host) -> Self {
        let mut c = Self::default();
        for (slot, outcome) in c.outcomes.iter_mut().zip(Outcome::ALL) {
            *slot = host.define_counter(&format!("envlane.decision.{}", outcome.as_str()));
        }
        c.invalid_env = host.define_counter(COUNTER_INVALID_ENV);
        c.unknown_fields = host.define_counter(COUNTER_CONFIG_UNKNOWN_FIELDS);
        c.config_invalid = host.define_counter(COUNTER_CONFIG_INVALID);
        c.route_failed = host.define_counter(COUNTER_ROUTE_FAILED);
        c.edge_stripped = host.define_counter(COUNTER_EDGE_STRIPPED);
        c
    }

    fn bump(host: &impl Host, id: Option<u32>) {
        if let Some(id) = id {
            host.increment(id);
        }
    }

    fn outcome(&self, host: &impl Host, outcome: Outcome) {
        let at = Outcome::ALL.iter().position(|o| *o == outcome);
        Self::bump(
            host,
            at.and_then(|i| self.outcomes.get(i).copied().flatten()),
        );
    }
}

/// The plugin's state between configs.
#[derive(Default)]
pub struct Root {
    /// `None`: pass-through (no valid config yet).
    table: Option<Rc<RoutingTable>>,
    counters: Counters,
    /// Endpoint mode's pick counter (this VM's streams).
    picks: Cell<u32>,
}

/// What `configure` did, for the caller's return value and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Configured {
    /// A valid table is in use.
    Loaded,
    /// The first config is invalid: accepted as pass-through, so the sidecar
    /// routes as if envlane were not installed instead of failing requests.
    PassThrough,
    /// An invalid update: refused, so Envoy keeps the last good table.
    Refused,
}

impl Configured {
    /// The answer to Envoy's `on_configure`.
    pub fn accepted(self) -> bool {
        !matches!(self, Self::Refused)
    }
}

/// Shared-data key that records that this plugin loaded a good table in this
/// Envoy process. Envoy checks every new config on a fresh VM, so VM state
/// cannot tell a first config from an update; process-wide shared data can.
fn loaded_key(host: &impl Host) -> String {
    let name = host.property(&["plugin_name"]).unwrap_or_default();
    format!("envlane.loaded.{}", String::from_utf8_lossy(&name))
}

/// `xds.node.metadata.<path>` as text (Envoy ≥ 1.33 path).
fn node_metadata(host: &impl Host, path: &[&str]) -> Option<String> {
    let mut full = vec!["xds", "node", "metadata"];
    full.extend_from_slice(path);
    let bytes = host.property(&full)?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

impl Root {
    pub fn configure(&mut self, host: &impl Host, size: usize) -> Configured {
        self.counters = Counters::define(host);
        let compiled = if size > MAX_CONFIG_BYTES {
            // Refused before the host copies it into this VM.
            Err(config::too_big(size))
        } else {
            let raw = host.plugin_config(size).unwrap_or_default();
            let parsed = config::parse_forward_compatible(&raw);
            // The JSON text is not needed while compiling: free it first (a
            // 100k-pair table is a 1 MB text; linear memory never shrinks).
            drop(raw);
            parsed.and_then(|parsed| {
                let node = Node {
                    namespace: node_metadata(host, &["NAMESPACE"]),
                    env_label: node_metadata(host, &["LABELS", &parsed.config.env_label]),
                };
                RoutingTable::compile(&parsed.config, &node).map(|t| (t, parsed.unknown_fields))
            })
        };
        let key = loaded_key(host);
        match compiled {
            Ok((table, unknown)) => {
                if !unknown.is_empty() {
                    log::warn!(
                        "envlane: ignoring config fields this version does not know: {}",
                        unknown.join(", ")
                    );
                    if let Some(id) = self.counters.unknown_fields {
                        host.increment(id);
                    }
                }
                log::info!(
                    "envlane: loaded table revision={} services={} pairs={} own_env={}{}",
                    table.settings.revision.as_deref().unwrap_or("-"),
                    table.service_count(),
                    table.pair_count(),
                    table.settings.own_env.as_ref().map_or("-", |e| e.as_str()),
                    if table.settings.edge { " edge" } else { "" },
                );
                let _ = host.set_shared_data(&key, b"1");
                self.table = Some(Rc::new(table));
                Configured::Loaded
            }
            Err(e) => {
                Counters::bump(host, self.counters.config_invalid);
                if host.shared_data(&key).is_some_and(|v| v == b"1") {
                    log::error!("{e}; refused, the last good table stays in use");
                    Configured::Refused
                } else {
                    log::error!("{e}; routing nothing (pass-through) until a valid config arrives");
                    self.table = None;
                    Configured::PassThrough
                }
            }
        }
    }

    /// The state of a new stream.
    pub fn stream(&self) -> Stream {
        let n = self.picks.get();
        self.picks.set(n.wrapping_add(1));
        Stream {
            table: self.table.clone(),
            counters: self.counters,
            explanation: None,
            pick: scramble(n),
        }
    }
}

/// The `n`-th stream's endpoint pick: the counter mixed (a bijection on
/// `u32`, murmur3's finalizer), so a VM's requests to several services do
/// not fall into step (two services called in turn, two pods each, would
/// otherwise each get the same pod every time).
fn scramble(n: u32) -> u32 {
    let mut x = n;
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

/// One HTTP stream.
pub struct Stream {
    table: Option<Rc<RoutingTable>>,
    counters: Counters,
    explanation: Option<String>,
    /// Endpoint mode: which of the env's endpoints (modulo their number).
    pick: u32,
}

impl Stream {
    pub fn on_request_headers(&mut self, host: &impl Host) {
        let Some(table) = self.table.clone() else {
            return;
        };
        let Some(wire) = host.request_headers() else {
            return;
        };
        let Some(request) = HeaderMap::parse(&wire) else {
            // Not expected from Envoy. Nothing is routed: envlane's route only
            // matches filter state this filter writes.
            log::warn!("envlane: malformed request header map from the host");
            return;
        };
        // The peer is read only if the request carries no env and this is a
        // shared proxy with a caller table.
        let plan = plan_with(&table, &request, &PeerOf(host), self.pick);
        let s = &table.settings;
        // At the edge the rules read the request as it came; what outsiders
        // must not set goes before the env a rule gave is added.
        let mut changed = s.edge && self.strip_at_edge(host, &table, &request);
        if let Some(cluster) = plan.route_to_cluster {
            // Endpoint mode: the pod's address first; the ORIGINAL_DST
            // cluster is chosen only if Envoy took it (else it would have no
            // host to connect to).
            let addressed = plan.original_dst.is_none_or(|addr| {
                host.set_envoy_filter_state(
                    ORIGINAL_DST_STATE_KEY,
                    addr.as_bytes(),
                    LifeSpan::DownstreamRequest,
                )
            });
            // Only this filter writes `wasm.*` state: no request header can
            // make envlane's route patch pick a cluster.
            if addressed && host.set_filter_state(ROUTE_STATE_PROPERTY, cluster.as_bytes()) {
                changed = true;
            } else {
                Counters::bump(host, self.counters.route_failed);
            }
        }
        if let Some(authority) = &plan.rewrite_authority {
            changed |= host.set_request_header(":authority", authority.as_bytes());
        }
        if let Some(env) = plan.inject_env {
            changed |= host.set_request_header(&s.env_header, env.as_bytes());
        }
        if changed {
            // Envoy picked the route before this filter ran; make it pick again.
            host.clear_route_cache();
        }
        self.counters.outcome(host, plan.outcome);
        if plan.invalid_env {
            Counters::bump(host, self.counters.invalid_env);
        }
        self.explanation = plan.explanation;
    }

    /// Removes what outsiders must not set; whether anything changed.
    fn strip_at_edge(
        &self,
        host: &impl Host,
        table: &RoutingTable,
        request: &HeaderMap<'_>,
    ) -> bool {
        let plan = edge_plan(table, request);
        if plan.is_empty() {
            return false;
        }
        for name in &plan.remove {
            let _ = host.remove_request_header(name);
        }
        for (name, rewrite) in [("baggage", &plan.baggage), ("cookie", &plan.cookie)] {
            match rewrite {
                Rewrite::Keep => {}
                Rewrite::Remove => {
                    let _ = host.remove_request_header(name);
                }
                Rewrite::Set(value) => {
                    let _ = host.set_request_header(name, value.as_bytes());
                }
            }
        }
        Counters::bump(host, self.counters.edge_stripped);
        true
    }

    pub fn on_response_headers(&mut self, host: &impl Host) {
        if let Some(text) = self.explanation.take() {
            Self::explain(host, &text);
        }
    }

    /// The debug explanation `on_request_headers` made, if any, for a caller
    /// that keeps it until the response instead of keeping the stream.
    pub fn take_explanation(&mut self) -> Option<String> {
        self.explanation.take()
    }

    /// Adds the debug response header.
    pub fn explain(host: &impl Host, text: &str) {
        let _ = host.set_response_header(DECISION_HEADER, text.as_bytes());
    }
}

/// Envoy property paths of what a shared proxy knows of its peer.
pub const SOURCE_ADDRESS_PATH: [&str; 2] = ["source", "address"];
/// Istio's peer metadata (a waypoint's `downstream_peer` filter state, set
/// from the HBONE peer's identity): its namespace and workload name.
pub const PEER_NAMESPACE_PATH: [&str; 3] = ["filter_state", "downstream_peer", "namespace"];
pub const PEER_WORKLOAD_PATH: [&str; 3] = ["filter_state", "downstream_peer", "workload"];
/// The filter chain a request arrived on (a waypoint's is per service).
pub const FILTER_CHAIN_PATH: [&str; 2] = ["xds", "filter_chain_name"];

/// The stream's peer, read from host properties only when asked.
struct PeerOf<'h, H: Host>(&'h H);

impl<H: Host> Caller for PeerOf<'_, H> {
    fn address(&self) -> Option<String> {
        let bytes = self.0.property(&SOURCE_ADDRESS_PATH)?;
        String::from_utf8(bytes).ok()
    }

    fn workload(&self) -> Option<(String, String)> {
        let text = |path: &[&str]| {
            self.0
                .property(path)
                .and_then(|b| String::from_utf8(b).ok())
                .filter(|s| !s.is_empty())
        };
        Some((text(&PEER_NAMESPACE_PATH)?, text(&PEER_WORKLOAD_PATH)?))
    }

    fn filter_chain(&self) -> Option<String> {
        let bytes = self.0.property(&FILTER_CHAIN_PATH)?;
        String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
    }
}

/// Debug explanations waiting for their response (at most this many: a
/// stream that never sees its response headers must not keep one forever).
pub const MAX_PENDING_EXPLANATIONS: usize = 256;

/// Every plugin (root context) of one VM, by plugin name, and the debug
/// explanations waiting for their responses. This is the filter's state
/// between callbacks; `filter.rs` keeps one per VM and hands it each call.
///
/// A new config of a plugin (a new root context in Envoy) updates that
/// plugin's [`Root`], so the table it replaces is freed at once: the module
/// exports no `proxy_on_delete` and never hears of a root's end. A stream is
/// matched to its plugin without `proxy_on_context_create`: with one plugin
/// in the VM (the usual case) it is that one, else the host's `plugin_name`
/// property says. Nothing is kept per stream unless the debug header asked
/// for an explanation.
#[derive(Default)]
pub struct Plugins {
    plugins: Vec<(Vec<u8>, Root)>,
    explanations: VecDeque<(u32, String)>,
}

impl Plugins {
    /// `proxy_on_configure`: a (new) config for the calling plugin.
    pub fn configure(&mut self, host: &impl Host, size: usize) -> bool {
        let name = host.property(&["plugin_name"]).unwrap_or_default();
        let at = match self.plugins.iter().position(|(n, _)| *n == name) {
            Some(at) => at,
            None => {
                self.plugins.push((name, Root::default()));
                self.plugins.len() - 1
            }
        };
        self.plugins
            .get_mut(at)
            .is_some_and(|(_, root)| root.configure(host, size).accepted())
    }

    fn root_of_stream(&self, host: &impl Host) -> Option<&Root> {
        match self.plugins.as_slice() {
            [] => None,
            [(_, only)] => Some(only),
            several => {
                let name = host.property(&["plugin_name"])?;
                several.iter().find(|(n, _)| *n == name).map(|(_, r)| r)
            }
        }
    }

    /// `proxy_on_request_headers` of stream `context_id`.
    pub fn on_request_headers(&mut self, host: &impl Host, context_id: u32) {
        let Some(root) = self.root_of_stream(host) else {
            return;
        };
        let mut stream = root.stream();
        stream.on_request_headers(host);
        if let Some(text) = stream.take_explanation() {
            if self.explanations.len() >= MAX_PENDING_EXPLANATIONS {
                self.explanations.pop_front();
            }
            self.explanations.push_back((context_id, text));
        }
    }

    /// `proxy_on_response_headers` of stream `context_id`.
    pub fn on_response_headers(&mut self, host: &impl Host, context_id: u32) {
        if self.explanations.is_empty() {
            return;
        }
        if let Some(at) = self
            .explanations
            .iter()
            .position(|(id, _)| *id == context_id)
        {
            if let Some((_, text)) = self.explanations.remove(at) {
                Stream::explain(host, &text);
            }
        }
    }

    /// Explanations waiting for their responses.
    pub fn pending_explanations(&self) -> usize {
        self.explanations.len()
    }
}
