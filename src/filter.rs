//! The proxy-wasm glue: the only module that talks to the host. It reads
//! inputs for the pure core ([`crate::decide::plan`]) and applies its plan.

use std::rc::Rc;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType, Status};

use crate::config::{self, DECISION_HEADER};
use crate::decide::{plan, Outcome};
use crate::table::{Node, RoutingTable};
use crate::wire::HeaderMap;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| Box::<EnvlaneRoot>::default());
}}

/// Envoy's counter ids, one per outcome plus one for refused env values.
/// (Incremented per request: a host call of ~1.2k Envoy instructions, 0.5%
/// of the filter's cost, measured against batching them on a timer.)
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    outcomes: [Option<u32>; 4],
    invalid: Option<u32>,
}

impl Counters {
    fn define() -> Self {
        let define = |name: &str| hostcalls::define_metric(MetricType::Counter, name).ok();
        let mut c = Self::default();
        for (slot, outcome) in c.outcomes.iter_mut().zip(Outcome::ALL) {
            *slot = define(&format!("envlane.decision.{}", outcome.as_str()));
        }
        c.invalid = define("envlane.env.invalid");
        c
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn count(&self, outcome: Outcome, invalid: bool) {
        let at = Outcome::ALL.iter().position(|o| *o == outcome);
        Self::bump(at.and_then(|i| self.outcomes.get(i).copied().flatten()));
        if invalid {
            Self::bump(self.invalid);
        }
    }
}

#[derive(Default)]
struct EnvlaneRoot {
    table: Option<Rc<RoutingTable>>,
    counters: Counters,
}

impl Context for EnvlaneRoot {}

impl RootContext for EnvlaneRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let raw = hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX)
            .ok()
            .flatten()
            .unwrap_or_default();
        let node = Node {
            namespace: node_metadata(&["NAMESPACE"]),
            env_label: None,
        };
        let parsed = config::parse(&raw);
        // The JSON text is not needed while compiling: free it first (a
        // 100k-pair table is a 1 MB text; linear memory never shrinks).
        drop(raw);
        let compiled = parsed.and_then(|cfg| {
            let node = Node {
                env_label: node_metadata(&["LABELS", &cfg.env_label]),
                ..node
            };
            RoutingTable::compile(&cfg, &node)
        });
        match compiled {
            Ok(table) => {
                log::info!(
                    "envlane: loaded table revision={} services={} pairs={} own_env={}",
                    table.settings.revision.as_deref().unwrap_or("-"),
                    table.service_count(),
                    table.pair_count(),
                    table.settings.own_env.as_ref().map_or("-", |e| e.as_str()),
                );
                self.counters = Counters::define();
                self.table = Some(Rc::new(table));
                true
            }
            Err(e) => {
                log::error!("{e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let table = self.table.clone()?;
        Some(Box::new(EnvlaneHttp {
            table,
            counters: self.counters,
            explanation: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// `xds.node.metadata.<path>` as a string (Envoy ≥ 1.33 path).
fn node_metadata(path: &[&str]) -> Option<String> {
    let mut full = vec!["xds", "node", "metadata"];
    full.extend_from_slice(path);
    let bytes = hostcalls::get_property(full).ok().flatten()?;
    String::from_utf8(bytes).ok().filter(|s| !s.is_empty())
}

struct EnvlaneHttp {
    table: Rc<RoutingTable>,
    counters: Counters,
    explanation: Option<String>,
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
}

/// All request headers in proxy-wasm's serialized form, with one host call
/// (read in place by [`HeaderMap`]). Empty when the host has none.
///
/// The SDK's `get_map`/`get_map_value` would copy every header into its own
/// `String` and panic on a value that is not UTF-8, which a client can send.
fn request_header_bytes() -> Vec<u8> {
    let mut data: *mut u8 = std::ptr::null_mut();
    let mut size: usize = 0;
    // SAFETY: the host writes a pointer it got from this module's
    // `proxy_on_memory_allocate` (the SDK's: a boxed `[u8]` of exactly
    // `size` bytes), or leaves it null. Ownership passes to us, as in the
    // SDK's own `get_map`.
    unsafe {
        let status =
            proxy_get_header_map_pairs(MapType::HttpRequestHeaders as u32, &mut data, &mut size);
        if status == Status::Ok as u32 && !data.is_null() {
            Vec::from_raw_parts(data, size, size)
        } else {
            Vec::new()
        }
    }
}

impl Context for EnvlaneHttp {}

impl HttpContext for EnvlaneHttp {
    fn on_http_request_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        let table = Rc::clone(&self.table);
        let wire = request_header_bytes();
        let Some(request) = HeaderMap::parse(&wire) else {
            // Not expected from Envoy; still never let a client pick the cluster.
            log::warn!("envlane: malformed request header map from the host");
            let _ = hostcalls::remove_map_value(
                MapType::HttpRequestHeaders,
                &table.settings.route_header,
            );
            return Action::Continue;
        };
        let plan = plan(&table, &request);
        let s = &table.settings;
        let headers = MapType::HttpRequestHeaders;
        if plan.strip_route_header {
            let _ = hostcalls::remove_map_value(headers, &s.route_header);
        }
        if let Some(cluster) = plan.route_to_cluster {
            let _ = hostcalls::set_map_value(headers, &s.route_header, Some(cluster));
        }
        if let Some(authority) = &plan.rewrite_authority {
            let _ = hostcalls::set_map_value(headers, ":authority", Some(authority));
        }
        if let Some(env) = plan.inject_env {
            let _ = hostcalls::set_map_value(headers, &s.env_header, Some(env));
        }
        if plan.changes_headers() {
            // Envoy picked the route before this filter ran; make it pick again.
            // Absent (NotFound) on hosts without the function: nothing to clear.
            let _ = hostcalls::call_foreign_function("clear_route_cache", None);
        }
        self.counters.count(plan.outcome, plan.invalid_env);
        self.explanation = plan.explanation;
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _headers: usize, _end_of_stream: bool) -> Action {
        if let Some(text) = self.explanation.take() {
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                DECISION_HEADER,
                Some(&text),
            );
        }
        Action::Continue
    }
}
