//! The decision: request headers + routing table → what to change. Pure; the
//! proxy-wasm glue only reads headers for it and applies the [`Plan`].

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::config::{Mode, Proxy};
use crate::names::{check_env, Chain};
use crate::sources::{baggage_value, cookie_value};
use crate::table::{split_authority, AliasSource, RoutingTable, ServiceRef};

/// Read access to the request headers (names lower-case), borrowed: the
/// decision copies nothing it does not keep.
pub trait Headers {
    /// Every value of `name`, in order, as the bytes the client sent.
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's;
}

/// The first value of `name` as text. Bytes that are not UTF-8 become U+FFFD,
/// which no env name or host accepts, so such a value counts as invalid.
fn first<'h>(headers: &'h impl Headers, name: &'h str) -> Option<Cow<'h, str>> {
    headers.values(name).next().map(String::from_utf8_lossy)
}

/// Every value of `name` that is text (for `baggage` and `cookie`).
fn texts<'h>(headers: &'h impl Headers, name: &'h str) -> impl Iterator<Item = &'h str> + 'h {
    headers
        .values(name)
        .filter_map(|v| std::str::from_utf8(v).ok())
}

/// What a shared proxy (gateway, waypoint) knows of a request's caller. Read
/// only when the request carries no env: each answer is a host call.
pub trait Caller {
    /// The TCP peer's address as Envoy writes it (`10.244.1.5:43210`).
    fn address(&self) -> Option<String>;
    /// The peer's (namespace, workload), when the proxy knows it by identity.
    fn workload(&self) -> Option<(String, String)>;
    /// Waypoints: the filter chain the request arrived on,
    /// `inbound-vip|PORT|PROTOCOL|FQDN`, chosen by the destination address
    /// (not by anything the client writes in the request).
    fn filter_chain(&self) -> Option<String> {
        None
    }
}

/// A caller nothing is known of (sidecars, tools).
pub struct NoCaller;

impl Caller for NoCaller {
    fn address(&self) -> Option<String> {
        None
    }
    fn workload(&self) -> Option<(String, String)> {
        None
    }
}

/// A caller known by address only (tests, `envlane-sync explain`).
pub struct CallerAt<'a>(pub &'a str);

impl Caller for CallerAt<'_> {
    fn address(&self) -> Option<String> {
        Some(self.0.to_string())
    }
    fn workload(&self) -> Option<(String, String)> {
        None
    }
}

/// Where the env came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Header,
    Baggage,
    Alias,
    /// The sidecar's own pod label.
    Label,
    /// A shared proxy's caller table.
    Caller,
    /// An edge rule.
    Edge,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Header => "header",
            Self::Baggage => "baggage",
            Self::Alias => "alias",
            Self::Label => "label",
            Self::Caller => "caller",
            Self::Edge => "edge-rule",
        }
    }
}

/// What resolution found; each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The request's own env has the service.
    Exact,
    /// A less specific level of the env has it.
    Fallback,
    /// No level has it; the default env does.
    Default,
    /// Nothing to route to: the request goes on untouched.
    Passthrough,
}

impl Outcome {
    pub const ALL: [Outcome; 4] = [
        Self::Exact,
        Self::Fallback,
        Self::Default,
        Self::Passthrough,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Fallback => "fallback",
            Self::Default => "default",
            Self::Passthrough => "passthrough",
        }
    }
}

/// The result of walking one env's chain for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution<'t> {
    pub outcome: Outcome,
    pub target: Option<&'t str>,
    /// The env whose target it is.
    pub env: Option<u32>,
    /// How many levels of the env were looked up.
    pub levels_tried: usize,
}

/// Walks `env` (already valid) from most to least specific; the first level
/// the service has wins, then the default env, else passthrough.
pub fn resolve<'t>(
    table: &'t RoutingTable,
    env: Option<&str>,
    service: &ServiceRef<'t>,
) -> Resolution<'t> {
    let mut levels_tried = 0;
    if let Some(env) = env {
        for level in Chain::new(env, table.settings.splitter) {
            levels_tried += 1;
            let hit = table
                .env_id(level)
                .and_then(|id| Some((id, service.target(id)?)));
            if let Some((id, target)) = hit {
                let outcome = if levels_tried == 1 {
                    Outcome::Exact
                } else {
                    Outcome::Fallback
                };
                return Resolution {
                    outcome,
                    target: Some(target),
                    env: Some(id),
                    levels_tried,
                };
            }
        }
    }
    match table
        .default_env()
        .and_then(|id| Some((id, service.target(id)?)))
    {
        Some((id, target)) => Resolution {
            outcome: Outcome::Default,
            target: Some(target),
            env: Some(id),
            levels_tried,
        },
        None => Resolution {
            outcome: Outcome::Passthrough,
            target: None,
            env: None,
            levels_tried,
        },
    }
}

/// What to do to the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan<'t> {
    pub outcome: Outcome,
    /// An env value was present but refused (counted; the next source was used).
    pub invalid_env: bool,
    /// Cluster and endpoint mode: the cluster to write to filter state.
    pub route_to_cluster: Option<&'t str>,
    /// Endpoint mode: the pod's `IP:PORT` to write to filter state
    /// `envoy.network.transport_socket.original_dst_address` (before
    /// `route_to_cluster`, which is written only if this was).
    pub original_dst: Option<&'t str>,
    /// Host mode: new `:authority`.
    pub rewrite_authority: Option<String>,
    /// Add the env header with this value (auto-inject of the pod's own or
    /// the caller's env, or the env an edge rule gave).
    pub inject_env: Option<Cow<'t, str>>,
    /// Present when `debug` is on and the request asked with the debug header.
    pub explanation: Option<String>,
}

impl Plan<'_> {
    /// Whether the route must be picked again (a header or the filter state
    /// changes).
    pub fn reroutes(&self) -> bool {
        self.route_to_cluster.is_some()
            || self.rewrite_authority.is_some()
            || self.inject_env.is_some()
    }
}

/// The env of a request, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundEnv<'a> {
    pub env: Option<(Cow<'a, str>, Source)>,
    /// The first refused value, if any.
    pub invalid: Option<String>,
    pub env_header_present: bool,
}

/// Looks for the env: header, baggage, aliases, then the pod's own label
/// (sidecars) or the caller table (shared proxies). The first valid value
/// wins; invalid values are noted and skipped.
pub fn find_env<'a>(
    table: &'a RoutingTable,
    headers: &'a impl Headers,
    caller: &impl Caller,
) -> FoundEnv<'a> {
    let s = &table.settings;
    let mut found = FoundEnv {
        env: None,
        invalid: None,
        env_header_present: false,
    };
    let consider = |found: &mut FoundEnv<'a>, value: Cow<'a, str>, source: Source| -> bool {
        if check_env(&value, s.splitter).is_ok() {
            found.env = Some((value, source));
            true
        } else {
            found.invalid.get_or_insert_with(|| value.into_owned());
            false
        }
    };
    if let Some(v) = first(headers, &s.env_header) {
        found.env_header_present = true;
        if consider(&mut found, v, Source::Header) {
            return found;
        }
    }
    if let Some(key) = &s.baggage_key {
        if let Some(v) = baggage_value(texts(headers, "baggage"), key) {
            if consider(&mut found, v, Source::Baggage) {
                return found;
            }
        }
    }
    for alias in s.aliases.iter() {
        let value = match alias {
            AliasSource::Header(h) => first(headers, h),
            AliasSource::Cookie(c) => cookie_value(texts(headers, "cookie"), c).map(Cow::Borrowed),
        };
        if let Some(v) = value {
            if consider(&mut found, v, Source::Alias) {
                return found;
            }
        }
    }
    if let Some(own) = &s.own_env {
        found.env = Some((Cow::Borrowed(own.as_str()), Source::Label));
    } else if let Some(id) = caller_env(table, headers, caller) {
        found.env = table
            .env_name(id)
            .map(|name| (Cow::Borrowed(name.as_str()), Source::Caller));
    }
    found
}

/// The caller's env from the caller table. A waypoint knows its peer by
/// identity (mTLS) as well as by address: identity first. A waypoint's HTTP
/// listener does not use the remote address (`use_remote_address: false`),
/// so Envoy takes the source address from `x-forwarded-for` when a request
/// has one: such a request is not looked up by address there.
fn caller_env(table: &RoutingTable, headers: &impl Headers, caller: &impl Caller) -> Option<u32> {
    let callers = table.callers();
    if !table.settings.proxy.is_shared() || callers.is_empty() {
        return None;
    }
    let by_workload = || {
        let (namespace, name) = caller.workload()?;
        callers.env_of_workload(&namespace, &name)
    };
    let by_address = || callers.env_of_address(&caller.address()?);
    match table.settings.proxy {
        Proxy::Waypoint => by_workload().or_else(|| {
            if headers.values("x-forwarded-for").next().is_some() {
                None
            } else {
                by_address()
            }
        }),
        _ => by_address(),
    }
}

/// A waypoint's filter chain `inbound-vip|PORT|PROTOCOL|FQDN` as the
/// `FQDN:PORT` it serves.
pub fn waypoint_destination(filter_chain: &str) -> Option<String> {
    let mut parts = filter_chain.split('|');
    let (Some(prefix), Some(port), Some(_protocol), Some(fqdn), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    if prefix != crate::table::WAYPOINT_CLUSTER_PREFIX || fqdn.is_empty() {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    Some(format!("{fqdn}:{port}"))
}

/// The env at the edge: only what a rule gives (everything a request
/// brings is an outsider's and is removed).
fn edge_env<'t>(table: &'t RoutingTable, headers: &impl Headers) -> FoundEnv<'t> {
    FoundEnv {
        env: table
            .edge_rules()
            .assign(headers, table.settings.splitter)
            .map(|a| (Cow::Owned(a.env), Source::Edge)),
        invalid: None,
        env_header_present: false,
    }
}

/// The whole decision for one request, from a caller nothing is known of.
pub fn plan<'t>(table: &'t RoutingTable, headers: &impl Headers) -> Plan<'t> {
    plan_for(table, headers, &NoCaller)
}

/// The whole decision for one request, endpoint mode picking its env's
/// first endpoint (see [`plan_with`]).
pub fn plan_for<'t>(
    table: &'t RoutingTable,
    headers: &impl Headers,
    caller: &impl Caller,
) -> Plan<'t> {
    plan_with(table, headers, caller, 0)
}

/// The whole decision for one request. At the edge the env is what a rule
/// gives; elsewhere it is found in the request, then the caller. Endpoint
/// mode picks endpoint `pick` modulo the env's number of endpoints (the
/// glue hands in a scrambled per-VM counter: spread, not strict round robin).
pub fn plan_with<'t>(
    table: &'t RoutingTable,
    headers: &impl Headers,
    caller: &impl Caller,
    pick: u32,
) -> Plan<'t> {
    let s = &table.settings;
    let found = if s.edge {
        edge_env(table, headers)
    } else {
        find_env(table, headers, caller)
    };
    let env = found.env.as_ref().map(|(e, _)| e.as_ref());
    // A waypoint serves the service whose address the request was sent to
    // (its filter chain): the `:authority` a client writes cannot make it
    // decide for another service.
    let destination = match s.proxy {
        Proxy::Waypoint => caller
            .filter_chain()
            .and_then(|chain| waypoint_destination(&chain)),
        Proxy::Sidecar | Proxy::Gateway => None,
    };
    let authority = match destination {
        Some(d) => Some(Cow::Owned(d)),
        None => first(headers, ":authority"),
    };
    let service = authority.as_deref().and_then(|a| table.service(a));
    let resolution = match &service {
        Some(svc) => resolve(table, env, svc),
        None => Resolution {
            outcome: Outcome::Passthrough,
            target: None,
            env: None,
            levels_tried: 0,
        },
    };

    let mut original_dst = None;
    let (route_to_cluster, rewrite_authority) = match (s.mode, resolution.target) {
        (Mode::Cluster, Some(t)) => (Some(t), None),
        (Mode::Endpoint, Some(t)) => {
            original_dst = service
                .as_ref()
                .zip(resolution.env)
                .and_then(|(svc, id)| svc.endpoint(id, pick));
            (original_dst.map(|_| t), None)
        }
        (Mode::Host, Some(t)) => {
            let port = authority
                .as_deref()
                .and_then(split_authority)
                .and_then(|(_, p)| p);
            (
                None,
                Some(match port {
                    Some(p) => format!("{t}:{p}"),
                    None => t.to_string(),
                }),
            )
        }
        (_, None) => (None, None),
    };
    let inject_env = match &found.env {
        // The edge removed whatever the request brought: the rule's env is
        // the one the mesh sees.
        Some((env, Source::Edge)) => Some(Cow::Owned(env.to_string())),
        Some((_, Source::Label)) if s.auto_inject && !found.env_header_present => {
            s.own_env.as_ref().map(|e| Cow::Borrowed(e.as_str()))
        }
        Some((env, Source::Caller)) if s.auto_inject && !found.env_header_present => table
            .env_id(env)
            .and_then(|id| table.env_name(id))
            .map(|e| Cow::Borrowed(e.as_str())),
        _ => None,
    };
    // Never at the edge: the debug header there is an outsider's.
    let asked = !s.edge && s.debug && headers.values(&s.debug_header).next().is_some();
    let explanation = asked.then(|| {
        let why = passthrough_reason(table, authority.as_deref(), service.as_ref(), env);
        let mut text = explain(table, &found, service.as_ref(), &resolution, why);
        if let Some(addr) = original_dst {
            let _ = write!(text, "; endpoint={addr}");
        }
        text
    });
    Plan {
        outcome: resolution.outcome,
        invalid_env: found.invalid.is_some(),
        route_to_cluster,
        original_dst,
        rewrite_authority,
        inject_env,
        explanation,
    }
}

/// Why a request passes through untouched (only asked for explanations).
fn passthrough_reason(
    table: &RoutingTable,
    authority: Option<&str>,
    service: Option<&ServiceRef<'_>>,
    env: Option<&str>,
) -> &'static str {
    match (authority, service) {
        (None, _) => "no-authority",
        (Some(a), None) if table.knows_host(a) => "port-not-in-table",
        (Some(_), None) => "host-not-in-table",
        (Some(_), Some(svc)) => match table.default_env() {
            None if env.is_none() => "no-env-and-no-default-env",
            None => "env-not-deployed-and-no-default-env",
            Some(id) if svc.target(id).is_none() => "default-env-not-deployed",
            Some(_) => "-",
        },
    }
}

/// One line for the `x-envlane-decision` response header, e.g.
/// `env=dev.proj1.user9; source=header; service=go.demo.svc.cluster.local;
/// tried=dev.proj1.user9,dev.proj1; outcome=fallback; target=outbound|...`.
fn explain(
    table: &RoutingTable,
    found: &FoundEnv<'_>,
    service: Option<&ServiceRef<'_>>,
    r: &Resolution<'_>,
    passthrough_reason: &str,
) -> String {
    let mut out = String::with_capacity(160);
    let (env, source) = match &found.env {
        Some((e, src)) => (e.as_ref(), src.as_str()),
        None => ("-", "none"),
    };
    let _ = write!(out, "env={env}; source={source}; ");
    if let Some(bad) = &found.invalid {
        // Printable ASCII only: a response header must stay valid.
        let shown: String = bad
            .chars()
            .take(64)
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        let _ = write!(out, "invalid={shown}; ");
    }
    let _ = write!(out, "service={}; tried=", service.map_or("-", |s| s.fqdn()));
    if let Some((e, _)) = &found.env {
        let levels: Vec<&str> = Chain::new(e, table.settings.splitter)
            .take(r.levels_tried)
            .collect();
        out.push_str(&levels.join(","));
    }
    if r.outcome == Outcome::Default || (r.outcome == Outcome::Passthrough && service.is_some()) {
        if let Some(d) = table.default_env().and_then(|id| table.env_name(id)) {
            let _ = write!(
                out,
                "{}default:{d}",
                if r.levels_tried > 0 { "," } else { "" }
            );
        }
    }
    let _ = write!(
        out,
        "; outcome={}; target={}",
        r.outcome.as_str(),
        r.target.unwrap_or("-")
    );
    if r.outcome == Outcome::Passthrough {
        let _ = write!(out, "; why={passthrough_reason}");
    }
    out
}
