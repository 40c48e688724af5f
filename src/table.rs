//! The compiled routing table: built once per config push, then shared
//! read-only by every request. A lookup hashes the request host once and each
//! env level once: O(chain depth).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::IpAddr;

use crate::callers::CallerTable;
use crate::config::{ConfigError, EnvAlias, Mode, PluginConfig, Proxy, ServiceEntry};
use crate::edge_rules::EdgeRules;
use crate::limits::{MAX_ENDPOINTS, MAX_PAIRS, MAX_TARGETS};
use crate::names::{check_env, EnvName, ServiceHost, Splitter, SubsetName};
use crate::pod_ips::{text_len, write_socket_address};

/// Where the caller sidecar runs, from its node metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    /// `NAMESPACE`: lets short names (`go`, `go.ns`) be resolved.
    pub namespace: Option<String>,
    /// The caller pod's env label value, as read (may be invalid).
    pub env_label: Option<String>,
}

/// Where an alias reads the env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AliasSource {
    Header(Box<str>),
    Cookie(Box<str>),
}

/// Settings the request path needs, checked and normalised.
#[derive(Debug, Clone)]
pub struct Settings {
    pub env_header: Box<str>,
    pub baggage_key: Option<Box<str>>,
    pub aliases: Box<[AliasSource]>,
    pub auto_inject: bool,
    pub splitter: Splitter,
    pub mode: Mode,
    pub debug_header: Box<str>,
    /// Explanations are given (`debug`).
    pub debug: bool,
    /// Runs at the mesh edge: assigns envs by rule and strips (`edge`).
    pub edge: bool,
    /// Where the filter runs.
    pub proxy: Proxy,
    /// The caller's own env, when its label holds a valid one (sidecars only:
    /// a shared proxy has no env of its own).
    pub own_env: Option<EnvName>,
    pub revision: Option<Box<str>>,
}

#[derive(Debug)]
struct Service {
    fqdn: ServiceHost,
    ports: Box<[u16]>,
    /// (env id, index of its first target), sorted by env id. Cluster mode has
    /// one target per port from there on, host mode one, endpoint mode per
    /// port the env's `IP:TARGETPORT`s (`sizes` of them).
    envs: Box<[(u32, u32)]>,
    /// Endpoint mode: how many endpoints each env of `envs` has (same
    /// order); empty in the other modes.
    sizes: Box<[u32]>,
    /// Endpoint mode: the target slot of the first port's ORIGINAL_DST
    /// cluster name (one per port from there on).
    clusters: u32,
}

/// The immutable lookup structure.
#[derive(Debug)]
pub struct RoutingTable {
    pub settings: Settings,
    env_ids: FastMap<u32>,
    env_names: Box<[EnvName]>,
    hosts: FastMap<u32>,
    services: Box<[Service]>,
    targets: Targets,
    default_env: Option<u32>,
    callers: CallerTable,
    edge_rules: EdgeRules,
}

/// A resolved service, as found from a request's `:authority`.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRef<'t> {
    service: &'t Service,
    port_slot: usize,
    table: &'t RoutingTable,
}

impl<'t> ServiceRef<'t> {
    pub fn fqdn(&self) -> &'t str {
        self.service.fqdn.as_str()
    }

    /// The target for `env_id`, when this service has that env (endpoint
    /// mode: the port's ORIGINAL_DST cluster).
    pub fn target(&self, env_id: u32) -> Option<&'t str> {
        let envs = &self.service.envs;
        let at = envs.binary_search_by_key(&env_id, |&(id, _)| id).ok()?;
        let (_, first) = envs.get(at)?;
        let slot = match self.table.settings.mode {
            Mode::Cluster => *first as usize + self.port_slot,
            Mode::Host => *first as usize,
            Mode::Endpoint => self.service.clusters as usize + self.port_slot,
        };
        self.table.targets.get(slot)
    }

    /// Endpoint mode: the `pick`-th (modulo their number) `IP:TARGETPORT`
    /// of `env_id`'s pods on this port. `None` in the other modes.
    pub fn endpoint(&self, env_id: u32, pick: u32) -> Option<&'t str> {
        let envs = &self.service.envs;
        let at = envs.binary_search_by_key(&env_id, |&(id, _)| id).ok()?;
        let (_, first) = envs.get(at)?;
        let n = *self.service.sizes.get(at)? as usize;
        if n == 0 {
            return None;
        }
        let slot = *first as usize + self.port_slot * n + pick as usize % n;
        self.table.targets.get(slot)
    }

    /// Endpoint mode: how many endpoints `env_id` has here.
    pub fn endpoint_count(&self, env_id: u32) -> usize {
        let envs = &self.service.envs;
        envs.binary_search_by_key(&env_id, |&(id, _)| id)
            .ok()
            .and_then(|at| self.service.sizes.get(at))
            .map_or(0, |n| *n as usize)
    }
}

impl RoutingTable {
    /// Checks every field and builds the lookup structure.
    pub fn compile(config: &PluginConfig, node: &Node) -> Result<Self, ConfigError> {
        let splitter =
            Splitter::try_new(&config.splitter).map_err(|e| ConfigError::new("splitter", e))?;
        let settings = Settings {
            env_header: header_name("envHeader", &config.env_header)?,
            baggage_key: match &config.baggage_key {
                Some(k) => Some(baggage_key(k)?),
                None => None,
            },
            aliases: config
                .env_aliases
                .iter()
                .enumerate()
                .map(|(i, a)| alias(i, a))
                .collect::<Result<_, _>>()?,
            auto_inject: config.auto_inject,
            splitter,
            mode: config.mode,
            debug_header: header_name("debugHeader", &config.debug_header)?,
            debug: config.debug,
            edge: config.edge,
            proxy: config.proxy,
            own_env: match config.proxy {
                Proxy::Sidecar => own_env(&config.env_label, node, splitter)?,
                Proxy::Gateway | Proxy::Waypoint => None,
            },
            revision: config.revision.as_deref().map(Into::into),
        };
        check_cluster_domain(&config.cluster_domain)?;
        let template = HostTemplate::parse(&config.host_template)?;

        let mut env_ids = FastMap::default();
        let mut env_names = Vec::with_capacity(config.envs.len());
        let mut subsets = Vec::with_capacity(config.envs.len());
        for (i, entry) in config.envs.iter().enumerate() {
            let name = EnvName::try_new(&entry.name, splitter).map_err(|e| {
                ConfigError::new(format!("envs[{i}].name"), format!("`{}` {e}", entry.name))
            })?;
            let subset = match &entry.subset {
                Some(s) => SubsetName::try_new(s)
                    .map_err(|e| ConfigError::new(format!("envs[{i}].subset"), e))?,
                None => SubsetName::for_env(&name),
            };
            let id = u32::try_from(i).map_err(|_| ConfigError::new("envs", "too many envs"))?;
            if env_ids.insert(name.as_str().into(), id).is_some() {
                return Err(ConfigError::new(
                    format!("envs[{i}].name"),
                    format!("`{}` is listed twice", entry.name),
                ));
            }
            env_names.push(name);
            subsets.push(subset);
        }

        let default_env = match &config.default_env {
            None => None,
            Some(d) => {
                let name = EnvName::try_new(d, splitter)
                    .map_err(|e| ConfigError::new("defaultEnv", format!("`{d}` {e}")))?;
                // A default no service has is legal (nothing deployed yet); it
                // then never matches.
                env_ids.get(name.as_str()).copied()
            }
        };

        // Full name plus up to three short ones per service.
        let mut hosts = FastMap::with_capacity_and_hasher(
            config.services.len().saturating_mul(4),
            BuildHasherDefault::default(),
        );
        let mut services = Vec::with_capacity(config.services.len());
        check_sizes(config)?;
        let mut targets = Targets::sized_for(config, &subsets);
        // Subset names must differ among one service's envs (they are that
        // service's DestinationRule subsets); envs of different services may
        // share one, so no tenant's env can take another tenant's subset.
        // Checked without hashing per pair: envs that share a subset name
        // share a class (its first env's id); `seen[class]` holds the service
        // that last used the class and with which env.
        let subset_class = subset_classes(&subsets);
        let mut seen: Vec<(usize, u32)> = vec![(usize::MAX, 0); subsets.len()];
        // One service's `outbound|PORT|` heads, end offsets into `head_text`
        // (reused: no allocation per service).
        let mut head_text = String::new();
        let mut head_ends: Vec<usize> = Vec::new();
        for (i, entry) in config.services.iter().enumerate() {
            let field = |f: &str| format!("services[{i}].{f}");
            let fqdn = ServiceHost::try_new(&entry.host)
                .map_err(|e| ConfigError::new(field("host"), e))?;
            if entry.ports.is_empty() || entry.ports.contains(&0) {
                return Err(ConfigError::new(field("ports"), "must list ports 1-65535"));
            }
            // (port, target port), sorted by port; a port listed twice must
            // name one target port.
            let mut port_pairs: Vec<(u16, u16)> = match (config.mode, entry.target_ports.len()) {
                (Mode::Endpoint, 0) => entry.ports.iter().map(|&p| (p, p)).collect(),
                (Mode::Endpoint, n) if n == entry.ports.len() => {
                    if entry.target_ports.contains(&0) {
                        return Err(ConfigError::new(
                            field("targetPorts"),
                            "must list ports 1-65535",
                        ));
                    }
                    entry
                        .ports
                        .iter()
                        .copied()
                        .zip(entry.target_ports.iter().copied())
                        .collect()
                }
                (Mode::Endpoint, _) => {
                    return Err(ConfigError::new(
                        field("targetPorts"),
                        "must list one target port per port (or none)",
                    ))
                }
                (_, 0) => entry.ports.iter().map(|&p| (p, p)).collect(),
                (_, _) => {
                    return Err(ConfigError::new(
                        field("targetPorts"),
                        "only endpoint mode (`mode`: endpoint) uses target ports",
                    ))
                }
            };
            port_pairs.sort_unstable();
            port_pairs.dedup();
            if port_pairs
                .windows(2)
                .any(|w| matches!(w, [a, b] if a.0 == b.0))
            {
                return Err(ConfigError::new(
                    field("targetPorts"),
                    "a port listed twice has two target ports",
                ));
            }
            let ports: Vec<u16> = port_pairs.iter().map(|&(p, _)| p).collect();
            match (config.mode, entry.endpoints.len()) {
                (Mode::Endpoint, n) if n == entry.envs.len() => {}
                (Mode::Endpoint, _) => {
                    return Err(ConfigError::new(
                        field("endpoints"),
                        "must list one list of pod IPs per env of `envs` (same order)",
                    ))
                }
                (_, 0) => {}
                (_, _) => {
                    return Err(ConfigError::new(
                        field("endpoints"),
                        "only endpoint mode (`mode`: endpoint) uses endpoints",
                    ))
                }
            }
            // Endpoint mode: the service ports' ORIGINAL_DST clusters first.
            let clusters = targets.next_slot()?;
            if config.mode == Mode::Endpoint {
                for &p in &ports {
                    targets.push_endpoint_cluster(p, fqdn.as_str())?;
                }
            }
            // `outbound|PORT|`, rendered once per port, not once per target.
            head_text.clear();
            head_ends.clear();
            if config.mode == Mode::Cluster {
                for p in &ports {
                    write_cluster_head(&mut head_text, config.proxy, *p);
                    head_ends.push(head_text.len());
                }
            }
            let parts = FqdnParts::of(fqdn.as_str(), &config.cluster_domain);
            if config.mode == Mode::Host && parts.is_none() {
                return Err(ConfigError::new(
                    field("host"),
                    format!(
                        "host mode needs name.namespace.svc.{}, got `{}`",
                        config.cluster_domain, entry.host
                    ),
                ));
            }
            let mut envs = Vec::with_capacity(entry.envs.len());
            for (j, &env_id) in entry.envs.iter().enumerate() {
                let subset = subsets.get(env_id as usize).ok_or_else(|| {
                    ConfigError::new(
                        format!("services[{i}].envs[{j}]"),
                        format!("{env_id} is not an index into envs"),
                    )
                })?;
                let class = subset_class.get(env_id as usize).copied().unwrap_or(env_id);
                if let Some(slot) = seen.get_mut(class as usize) {
                    let (service, prev) = *slot;
                    if service == i && prev != env_id {
                        return Err(ConfigError::new(
                            format!("services[{i}].envs[{j}]"),
                            format!("envs {prev} and {env_id} share subset `{subset}`"),
                        ));
                    }
                    *slot = (i, env_id);
                }
                let first = targets.next_slot()?;
                let mut size = 0u32;
                match (config.mode, &parts) {
                    (Mode::Cluster, _) => {
                        let mut start = 0;
                        for &end in &head_ends {
                            let head = head_text.get(start..end).unwrap_or_default();
                            start = end;
                            targets.push_cluster(head, subset.as_str(), fqdn.as_str())?;
                        }
                    }
                    (Mode::Host, Some(p)) => {
                        let host = template.render(
                            p.name,
                            p.namespace,
                            subset.as_str(),
                            &config.cluster_domain,
                        );
                        let host = ServiceHost::try_new(&host)
                            .map_err(|e| ConfigError::new("hostTemplate", e))?;
                        targets.push(host.as_str())?;
                    }
                    (Mode::Host, None) => {}
                    (Mode::Endpoint, _) => {
                        // Each address was checked (canonical) while parsing.
                        let ips = entry.endpoints.get(j).unwrap_or_default();
                        let n = ips.clone().count();
                        if n == 0 {
                            return Err(ConfigError::new(
                                format!("services[{i}].endpoints[{j}]"),
                                "an env of the service has at least one pod IP",
                            ));
                        }
                        size = u32::try_from(n)
                            .map_err(|_| ConfigError::new(field("endpoints"), "too many"))?;
                        for &(_, target_port) in &port_pairs {
                            for ip in ips.clone() {
                                targets.push_endpoint(&ip, target_port)?;
                            }
                        }
                    }
                }
                envs.push((env_id, first, size));
            }
            envs.sort_unstable_by_key(|&(id, _, _)| id);
            if envs.windows(2).any(|w| matches!(w, [a, b] if a.0 == b.0)) {
                return Err(ConfigError::new(field("envs"), "lists an env twice"));
            }
            let sizes: Box<[u32]> = if config.mode == Mode::Endpoint {
                envs.iter().map(|&(_, _, n)| n).collect()
            } else {
                Box::default()
            };
            let envs: Vec<(u32, u32)> = envs.iter().map(|&(id, first, _)| (id, first)).collect();
            let index = u32::try_from(i).map_err(|_| ConfigError::new("services", "too many"))?;
            if hosts.insert(fqdn.as_str().into(), index).is_some() {
                return Err(ConfigError::new(
                    field("host"),
                    format!("`{}` is listed twice", entry.host),
                ));
            }
            services.push(Service {
                fqdn,
                ports: ports.into(),
                envs: envs.into(),
                sizes,
                clusters,
            });
        }

        // Short names second, so a full name always wins over another
        // service's short alias.
        for (index, service) in (0u32..).zip(services.iter()) {
            let parts = FqdnParts::of(service.fqdn.as_str(), &config.cluster_domain);
            for alias in short_aliases(
                service.fqdn.as_str(),
                parts.as_ref(),
                node.namespace.as_deref(),
            )
            .into_iter()
            .flatten()
            {
                if !hosts.contains_key(alias) {
                    hosts.insert(alias.into(), index);
                }
            }
        }

        let callers =
            CallerTable::compile(&config.callers, &config.caller_workloads, env_names.len())?;
        if !callers.is_empty() && !config.proxy.is_shared() {
            return Err(ConfigError::new(
                "callers",
                "only a shared proxy (`proxy`: gateway or waypoint) looks callers up",
            ));
        }
        if config.proxy == Proxy::Waypoint && config.mode == Mode::Endpoint {
            return Err(ConfigError::new(
                "mode",
                "a waypoint routes by its service's clusters (`cluster`): endpoint mode's ORIGINAL_DST clusters are for sidecars and gateways",
            ));
        }
        if config.proxy == Proxy::Waypoint && config.mode == Mode::Host {
            return Err(ConfigError::new(
                "mode",
                "a waypoint routes by its service's clusters (`cluster`): a new `:authority` does not change where it sends a request",
            ));
        }
        let edge_rules = EdgeRules::compile(&config.edge_rules, splitter)?;
        if !edge_rules.is_empty() && !config.edge {
            return Err(ConfigError::new(
                "edgeRules",
                "rules assign envs only at the edge (`edge`: true)",
            ));
        }

        Ok(Self {
            settings,
            env_ids,
            env_names: env_names.into(),
            hosts,
            services: services.into(),
            targets,
            default_env,
            callers,
            edge_rules,
        })
    }

    /// The service `:authority` names, and which of its ports it uses. `None`
    /// when the host is not in the table or the port is not one of its ports.
    pub fn service(&self, authority: &str) -> Option<ServiceRef<'_>> {
        let (host, port) = split_authority(authority)?;
        let host = host.strip_suffix('.').unwrap_or(host);
        let index = if host.bytes().any(|b| b.is_ascii_uppercase()) {
            *self.hosts.get(host.to_ascii_lowercase().as_str())?
        } else {
            *self.hosts.get(host)?
        } as usize;
        let service = self.services.get(index)?;
        let port_slot = match port {
            Some(p) => service.ports.iter().position(|&q| q == p)?,
            // No port: HTTP's 80 when the service has it, else its only port.
            None => match service.ports.iter().position(|&q| q == 80) {
                Some(slot) => slot,
                None if service.ports.len() == 1 => 0,
                None => return None,
            },
        };
        Some(ServiceRef {
            service,
            port_slot,
            table: self,
        })
    }

    /// Whether the host of `authority` is in the table (on any port): tells
    /// an unknown host from an unknown port when explaining a passthrough.
    pub fn knows_host(&self, authority: &str) -> bool {
        split_authority(authority).is_some_and(|(host, _)| {
            let host = host.strip_suffix('.').unwrap_or(host);
            self.hosts.contains_key(host.to_ascii_lowercase().as_str())
        })
    }

    pub fn env_id(&self, env: &str) -> Option<u32> {
        self.env_ids.get(env).copied()
    }

    pub fn env_name(&self, id: u32) -> Option<&EnvName> {
        self.env_names.get(id as usize)
    }

    pub fn default_env(&self) -> Option<u32> {
        self.default_env
    }

    /// Shared proxies: the caller table.
    pub fn callers(&self) -> &CallerTable {
        &self.callers
    }

    /// The edge's env assignment rules.
    pub fn edge_rules(&self) -> &EdgeRules {
        &self.edge_rules
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn pair_count(&self) -> usize {
        self.services.iter().map(|s| s.envs.len()).sum()
    }

    /// Cluster and endpoint mode: for every service port, the clusters the
    /// filter may write to filter state (what envlane-sync's route patch
    /// must map): the subset clusters, or the one ORIGINAL_DST cluster.
    /// Empty in host mode.
    pub fn cluster_targets(&self) -> Vec<PortTargets<'_>> {
        let mut out = Vec::new();
        if self.settings.mode == Mode::Host {
            return out;
        }
        for service in self.services.iter() {
            for (slot, &port) in service.ports.iter().enumerate() {
                if self.settings.mode == Mode::Endpoint {
                    out.push(PortTargets {
                        fqdn: service.fqdn.as_str(),
                        port,
                        targets: self
                            .targets
                            .get(service.clusters as usize + slot)
                            .into_iter()
                            .collect(),
                    });
                    continue;
                }
                let targets = service
                    .envs
                    .iter()
                    .filter_map(|&(_, first)| self.targets.get(first as usize + slot))
                    .collect();
                out.push(PortTargets {
                    fqdn: service.fqdn.as_str(),
                    port,
                    targets,
                });
            }
        }
        out
    }
}

/// The subset part of endpoint mode's cluster names. Reserved: no
/// DestinationRule of a Service in endpoint mode may have a subset of this
/// name (endpoint mode writes no subsets).
pub const ENDPOINT_CLUSTER_SUBSET: &str = "envlane-endpoints";

/// Endpoint mode's ORIGINAL_DST cluster of a service port,
/// `outbound|PORT|envlane-endpoints|FQDN`: Istio's naming (its telemetry
/// reads service and port from it), a subset no env gets in this mode.
/// envlane-sync's CLUSTER ADD patch and the filter both name it from here.
pub fn endpoint_cluster(port: u16, fqdn: &str) -> String {
    istio_cluster(port, ENDPOINT_CLUSTER_SUBSET, fqdn)
}

/// `IP:PORT` (`[IP]:PORT` for IPv6), as Envoy parses a socket address.
pub fn socket_address(ip: &IpAddr, port: u16) -> String {
    let mut out = String::new();
    let _ = write_socket_address(&mut out, ip, port);
    out
}

/// Istio's name of a service port's cluster, `outbound|PORT|SUBSET|FQDN`;
/// `subset` is empty for the service's own cluster (all its pods).
pub fn istio_cluster(port: u16, subset: &str, fqdn: &str) -> String {
    format!("outbound|{port}|{subset}|{fqdn}")
}

/// The cluster istiod gives a service port (`subset` empty) or one of its
/// DestinationRule subsets in the proxy the filter runs in: sidecars and
/// gateways `outbound|PORT|SUBSET|FQDN`, waypoints
/// `inbound-vip|PORT|http/SUBSET|FQDN` (`inbound-vip|PORT|http|FQDN` for the
/// whole service), as istiod 1.31 names them.
pub fn cluster_name(proxy: Proxy, port: u16, subset: &str, fqdn: &str) -> String {
    let mut out = String::new();
    write_cluster_head(&mut out, proxy, port);
    if subset.is_empty() && proxy == Proxy::Waypoint {
        // `inbound-vip|PORT|http/` → `inbound-vip|PORT|http|`
        out.pop();
        out.push('|');
    } else {
        out.push_str(subset);
        out.push('|');
    }
    out.push_str(fqdn);
    out
}

/// `outbound|PORT|` or `inbound-vip|PORT|http/`: what precedes the subset.
fn write_cluster_head(out: &mut String, proxy: Proxy, port: u16) {
    let _ = match proxy {
        Proxy::Sidecar | Proxy::Gateway => write!(out, "outbound|{port}|"),
        Proxy::Waypoint => write!(out, "{WAYPOINT_CLUSTER_PREFIX}|{port}|http/"),
    };
}

/// Prefix of the clusters istiod gives a waypoint for a service.
pub const WAYPOINT_CLUSTER_PREFIX: &str = "inbound-vip";

/// One port of a service and the clusters the filter can choose for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortTargets<'t> {
    pub fqdn: &'t str,
    pub port: u16,
    /// The subset clusters, in env-id order.
    pub targets: Vec<&'t str>,
}

/// Every target string in one buffer: a 100k-pair table is one allocation
/// for its targets, not 100k.
#[derive(Debug, Default)]
struct Targets {
    text: String,
    /// End offset of each target in `text`.
    ends: Vec<u32>,
}

impl Targets {
    /// Room for every target of `config`, reserved once: growing a buffer of
    /// megabytes by doubling would leave the old copies behind in the VM's
    /// linear memory, which never shrinks.
    fn sized_for(config: &PluginConfig, subsets: &[SubsetName]) -> Self {
        let mut count = 0usize;
        let mut bytes = 0usize;
        for s in &config.services {
            count = count.saturating_add(target_count(s, config.mode));
            if config.mode == Mode::Endpoint {
                bytes = bytes.saturating_add(endpoint_bytes(s));
            }
            if config.mode == Mode::Cluster {
                // outbound|PORT|SUBSET|FQDN
                // `outbound|` + `|` + `|` (11) or `inbound-vip|` + `|http/` + `|` (19).
                let head = match config.proxy {
                    Proxy::Waypoint => 19,
                    Proxy::Sidecar | Proxy::Gateway => 11,
                };
                let fixed: usize = s.ports.iter().map(|p| head + decimal_len(*p)).sum();
                for &env in &s.envs {
                    let subset = subsets.get(env as usize).map_or(0, |n| n.as_str().len());
                    let each = subset.saturating_add(s.host.len());
                    bytes = bytes
                        .saturating_add(fixed)
                        .saturating_add(each.saturating_mul(s.ports.len()));
                }
            }
        }
        Self {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(count),
        }
    }

    fn next_slot(&self) -> Result<u32, ConfigError> {
        u32::try_from(self.ends.len()).map_err(|_| ConfigError::new("services", "too many targets"))
    }

    fn close(&mut self) -> Result<(), ConfigError> {
        let end = u32::try_from(self.text.len())
            .map_err(|_| ConfigError::new("services", "targets too large"))?;
        self.ends.push(end);
        Ok(())
    }

    fn push(&mut self, target: &str) -> Result<(), ConfigError> {
        self.text.push_str(target);
        self.close()
    }

    /// Istio's subset cluster name, `outbound|PORT|SUBSET|FQDN`; `head` is
    /// `outbound|PORT|`.
    fn push_cluster(&mut self, head: &str, subset: &str, fqdn: &str) -> Result<(), ConfigError> {
        self.text.push_str(head);
        self.text.push_str(subset);
        self.text.push('|');
        self.text.push_str(fqdn);
        self.close()
    }

    /// Endpoint mode's cluster of a service port.
    fn push_endpoint_cluster(&mut self, port: u16, fqdn: &str) -> Result<(), ConfigError> {
        let _ = write!(
            self.text,
            "outbound|{port}|{ENDPOINT_CLUSTER_SUBSET}|{fqdn}"
        );
        self.close()
    }

    /// `IP:PORT` or `[IP]:PORT`.
    fn push_endpoint(&mut self, ip: &IpAddr, port: u16) -> Result<(), ConfigError> {
        let _ = write_socket_address(&mut self.text, ip, port);
        self.close()
    }

    fn get(&self, slot: usize) -> Option<&str> {
        let end = *self.ends.get(slot)? as usize;
        let start = match slot.checked_sub(1) {
            Some(prev) => *self.ends.get(prev)? as usize,
            None => 0,
        };
        self.text.get(start..end)
    }
}

/// A service's targets: one per env and port in cluster mode, per env in
/// host mode.
fn target_count(s: &ServiceEntry, mode: Mode) -> usize {
    match mode {
        Mode::Cluster => s.envs.len().saturating_mul(s.ports.len()),
        Mode::Host => s.envs.len(),
        // One cluster per port, one address per pod IP and port.
        Mode::Endpoint => endpoint_count(s)
            .saturating_add(1)
            .saturating_mul(s.ports.len()),
    }
}

/// Endpoint mode: the pod IPs a service lists, all envs together.
fn endpoint_count(s: &ServiceEntry) -> usize {
    s.endpoints.addr_count()
}

/// Endpoint mode: the bytes of a service's targets (an upper bound when the
/// config is invalid, exact otherwise): `outbound|PORT|envlane-endpoints|FQDN`
/// per port, `IP:TARGETPORT` (`[IP]:TARGETPORT`) per IP and port.
fn endpoint_bytes(s: &ServiceEntry) -> usize {
    let mut bytes = 0usize;
    for (k, &port) in s.ports.iter().enumerate() {
        let target = s.target_ports.get(k).copied().unwrap_or(port);
        bytes = bytes.saturating_add(
            "outbound|".len()
                + decimal_len(port)
                + 1
                + ENDPOINT_CLUSTER_SUBSET.len()
                + 1
                + s.host.len(),
        );
        for ips in s.endpoints.iter() {
            for ip in ips {
                let brackets = if ip.is_ipv6() { 2 } else { 0 };
                let each = text_len(&ip) + brackets + 1 + decimal_len(target);
                bytes = bytes.saturating_add(each);
            }
        }
    }
    bytes
}

/// The pair and target limits, counted before the target buffer is sized.
fn check_sizes(config: &PluginConfig) -> Result<(), ConfigError> {
    let mut pairs = 0usize;
    let mut targets = 0usize;
    let mut endpoints = 0usize;
    for s in &config.services {
        pairs = pairs.saturating_add(s.envs.len());
        targets = targets.saturating_add(target_count(s, config.mode));
        endpoints = endpoints.saturating_add(endpoint_count(s));
    }
    if endpoints > MAX_ENDPOINTS {
        return Err(ConfigError::new(
            "services",
            format!("{endpoints} endpoint addresses is over the limit of {MAX_ENDPOINTS}"),
        ));
    }
    if pairs > MAX_PAIRS {
        return Err(ConfigError::new(
            "services",
            format!("{pairs} (service, env) pairs is over the limit of {MAX_PAIRS}"),
        ));
    }
    if targets > MAX_TARGETS {
        return Err(ConfigError::new(
            "services",
            format!("{targets} targets (pairs x ports) is over the limit of {MAX_TARGETS}"),
        ));
    }
    Ok(())
}

fn decimal_len(n: u16) -> usize {
    match n {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        1000..=9999 => 4,
        _ => 5,
    }
}

/// `name.namespace.svc.<domain>` split up.
struct FqdnParts<'a> {
    name: &'a str,
    namespace: &'a str,
}

impl<'a> FqdnParts<'a> {
    fn of(fqdn: &'a str, cluster_domain: &str) -> Option<Self> {
        let rest = fqdn.strip_suffix(cluster_domain)?.strip_suffix(".svc.")?;
        let (name, namespace) = rest.split_once('.')?;
        (!namespace.contains('.')).then_some(Self { name, namespace })
    }
}

/// The other names a request may use for a Kubernetes service: `name.ns.svc`,
/// `name.ns`, and `name` when the caller is in the same namespace. All are
/// prefixes of the FQDN `name.ns.svc.<domain>`, so nothing is formatted.
fn short_aliases<'a>(
    fqdn: &'a str,
    parts: Option<&FqdnParts<'_>>,
    caller_namespace: Option<&str>,
) -> [Option<&'a str>; 3] {
    let Some(p) = parts else {
        return [None; 3];
    };
    let name_ns = p.name.len() + 1 + p.namespace.len();
    [
        fqdn.get(..name_ns + ".svc".len()),
        fqdn.get(..name_ns),
        (caller_namespace == Some(p.namespace))
            .then(|| fqdn.get(..p.name.len()))
            .flatten(),
    ]
}

/// Splits `host[:port]`; `[v6]:port` keeps the brackets. `None` for a bad port.
pub fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let port_at = match authority.rfind(':') {
        Some(i) if !authority.ends_with(']') => i,
        _ => return Some((authority, None)),
    };
    let host = authority.get(..port_at)?;
    if host.contains(':') && !host.ends_with(']') {
        // A bare IPv6 address without brackets: no port.
        return Some((authority, None));
    }
    let port = parse_port(authority.get(port_at + 1..)?)?;
    Some((host, Some(port)))
}

/// A port as a URI writes it: ASCII digits only, no sign, no leading zero,
/// 1-65535. (`str::parse` would take `+8080` and `08080`.)
pub fn parse_port(text: &str) -> Option<u16> {
    let bytes = text.as_bytes();
    let (&first, _) = bytes.split_first()?;
    if !(b'1'..=b'9').contains(&first) || bytes.len() > 5 {
        return None;
    }
    let mut port: u32 = 0;
    for &b in bytes {
        if !b.is_ascii_digit() {
            return None;
        }
        port = port * 10 + u32::from(b - b'0');
    }
    u16::try_from(port).ok()
}

/// Header names are compared lower-case (Envoy lower-cases them).
pub(crate) fn header_name(field: &str, name: &str) -> Result<Box<str>, ConfigError> {
    let ok = !name.is_empty()
        && !name.starts_with(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(name.to_ascii_lowercase().into())
    } else {
        Err(ConfigError::new(
            field,
            format!("`{name}` is not an HTTP header name"),
        ))
    }
}

fn baggage_key(key: &str) -> Result<Box<str>, ConfigError> {
    // W3C baggage keys are RFC 7230 tokens, compared as written.
    let ok = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(key.into())
    } else {
        Err(ConfigError::new(
            "baggageKey",
            format!("`{key}` is not a baggage key"),
        ))
    }
}

fn alias(i: usize, a: &EnvAlias) -> Result<AliasSource, ConfigError> {
    let field = format!("envAliases[{i}]");
    match (&a.header, &a.cookie) {
        (Some(h), None) => Ok(AliasSource::Header(header_name(
            &format!("{field}.header"),
            h,
        )?)),
        (None, Some(c)) if !c.is_empty() && !c.contains([';', '=', ' ', ',']) => {
            Ok(AliasSource::Cookie(c.as_str().into()))
        }
        (None, Some(c)) => Err(ConfigError::new(
            format!("{field}.cookie"),
            format!("`{c}` is not a cookie name"),
        )),
        _ => Err(ConfigError::new(
            field,
            "set exactly one of `header` and `cookie`",
        )),
    }
}

fn own_env(label: &str, node: &Node, splitter: Splitter) -> Result<Option<EnvName>, ConfigError> {
    if label.is_empty() || label.len() > 317 {
        return Err(ConfigError::new("envLabel", "must be a pod label key"));
    }
    // An invalid label value is the pod's problem, not the config's: no own env.
    Ok(node
        .env_label
        .as_deref()
        .filter(|v| check_env(v, splitter).is_ok())
        .and_then(|v| EnvName::try_new(v, splitter).ok()))
}

fn check_cluster_domain(domain: &str) -> Result<(), ConfigError> {
    ServiceHost::try_new(domain)
        .map(|_| ())
        .map_err(|e| ConfigError::new("clusterDomain", e))
}

/// `hostTemplate` split into literal text and placeholders. envlane-sync
/// renders host mode's per-env Services with the same template.
#[derive(Debug)]
pub struct HostTemplate(Vec<Piece>);

#[derive(Debug)]
enum Piece {
    Text(String),
    Name,
    Namespace,
    Subset,
    ClusterDomain,
}

impl HostTemplate {
    pub fn parse(template: &str) -> Result<Self, ConfigError> {
        let err = |m: String| ConfigError::new("hostTemplate", m);
        let mut pieces = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let (text, tail) = rest.split_at(open);
            if !text.is_empty() {
                pieces.push(Piece::Text(text.to_string()));
            }
            let close = tail
                .find('}')
                .ok_or_else(|| err(format!("unclosed `{{` in `{template}`")))?;
            pieces.push(match tail.get(1..close) {
                Some("name") => Piece::Name,
                Some("namespace") => Piece::Namespace,
                Some("subset") => Piece::Subset,
                Some("clusterDomain") => Piece::ClusterDomain,
                other => {
                    return Err(err(format!(
                        "unknown placeholder `{}`; use {{name}}, {{namespace}}, {{subset}}, {{clusterDomain}}", other.unwrap_or("")
                    )))
                }
            });
            rest = tail.get(close + 1..).unwrap_or("");
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Subset)) {
            return Err(err("must contain {subset}".into()));
        }
        Ok(Self(pieces))
    }

    pub fn render(&self, name: &str, namespace: &str, subset: &str, domain: &str) -> String {
        self.0
            .iter()
            .map(|p| match p {
                Piece::Text(t) => t.as_str(),
                Piece::Name => name,
                Piece::Namespace => namespace,
                Piece::Subset => subset,
                Piece::ClusterDomain => domain,
            })
            .collect()
    }
}

/// For each env id, the id of the first env with the same subset name.
fn subset_classes(subsets: &[SubsetName]) -> Vec<u32> {
    let mut first: HashMap<&str, u32, BuildHasherDefault<FxHasher>> =
        HashMap::with_capacity_and_hasher(subsets.len(), BuildHasherDefault::default());
    subsets
        .iter()
        .zip(0u32..)
        .map(|(s, id)| *first.entry(s.as_str()).or_insert(id))
        .collect()
}

/// FxHash (as in rustc): a few cycles per word. Keys come from the config,
/// so there is no untrusted insert to flood.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher(u64);

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let mut last = [0u8; 8];
        let rem = chunks.remainder();
        if let Some(dst) = last.get_mut(..rem.len()) {
            dst.copy_from_slice(rem);
        }
        self.add(u64::from_le_bytes(last) ^ ((rem.len() as u64) << 56));
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type FastMap<V> = HashMap<Box<str>, V, BuildHasherDefault<FxHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{EnvEntry, ServiceEntry};

    #[test]
    fn target_buffer_is_reserved_exactly() {
        let config = PluginConfig {
            envs: ["dev", "dev.a", "dev.a.b"]
                .iter()
                .map(|n| EnvEntry {
                    name: n.to_string(),
                    subset: None,
                })
                .collect(),
            services: (0..50)
                .map(|i| ServiceEntry {
                    host: format!("svc{i}.ns.svc.cluster.local"),
                    ports: vec![80, 8080, 9, 65535],
                    envs: vec![0, 2, 1],
                    target_ports: Vec::new(),
                    endpoints: Default::default(),
                })
                .collect(),
            ..PluginConfig::default()
        };
        for proxy in [Proxy::Sidecar, Proxy::Gateway, Proxy::Waypoint] {
            let config = PluginConfig {
                proxy,
                ..config.clone()
            };
            let table = RoutingTable::compile(&config, &Node::default()).expect("valid");
            let t = &table.targets;
            assert_eq!(t.ends.len(), 50 * 3 * 4);
            assert_eq!(
                (t.text.len(), t.ends.len()),
                (t.text.capacity(), t.ends.capacity()),
                "{proxy:?}"
            );
        }
    }

    #[test]
    fn waypoint_targets_are_its_inbound_vip_clusters() {
        let config = PluginConfig {
            proxy: Proxy::Waypoint,
            envs: vec![EnvEntry {
                name: "dev.a".into(),
                subset: Some("dev-a".into()),
            }],
            services: vec![ServiceEntry {
                host: "api.ns.svc.cluster.local".into(),
                ports: vec![8080],
                envs: vec![0],
                target_ports: Vec::new(),
                endpoints: Default::default(),
            }],
            ..PluginConfig::default()
        };
        let table = RoutingTable::compile(&config, &Node::default()).expect("valid");
        let got = table.cluster_targets();
        assert_eq!(
            got[0].targets,
            ["inbound-vip|8080|http/dev-a|api.ns.svc.cluster.local"]
        );
        assert_eq!(
            cluster_name(Proxy::Waypoint, 8080, "", "api.ns.svc.cluster.local"),
            "inbound-vip|8080|http|api.ns.svc.cluster.local"
        );
        assert_eq!(
            cluster_name(Proxy::Gateway, 8080, "dev-a", "api.ns.svc.cluster.local"),
            istio_cluster(8080, "dev-a", "api.ns.svc.cluster.local")
        );
    }

    #[test]
    fn cluster_targets_are_istio_cluster_names() {
        let config = PluginConfig {
            envs: ["dev", "dev.a"]
                .iter()
                .map(|n| EnvEntry {
                    name: n.to_string(),
                    subset: Some(n.replace('.', "-")),
                })
                .collect(),
            services: vec![ServiceEntry {
                host: "api.ns.svc.cluster.local".into(),
                ports: vec![9090, 80],
                envs: vec![1, 0],
                target_ports: Vec::new(),
                endpoints: Default::default(),
            }],
            ..PluginConfig::default()
        };
        let table = RoutingTable::compile(&config, &Node::default()).expect("valid");
        let fqdn = "api.ns.svc.cluster.local";
        let want: Vec<PortTargets<'_>> = [80u16, 9090]
            .iter()
            .map(|&port| PortTargets {
                fqdn,
                port,
                targets: vec![],
            })
            .collect();
        let got = table.cluster_targets();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert_eq!((g.fqdn, g.port), (w.fqdn, w.port));
            let expected: Vec<String> = ["dev", "dev-a"]
                .iter()
                .map(|s| istio_cluster(w.port, s, fqdn))
                .collect();
            assert_eq!(g.targets, expected);
        }
    }

    #[test]
    fn targets_share_one_buffer() {
        let mut t = Targets::default();
        for port in [1, 80, 8080, 65535, 10] {
            t.push_cluster(
                &format!("outbound|{port}|"),
                "dev-1",
                "a.b.svc.cluster.local",
            )
            .expect("fits");
        }
        t.push("host-1.b.svc.cluster.local").expect("fits");
        let all: Vec<_> = (0..7).map(|i| t.get(i)).collect();
        assert_eq!(
            all,
            [
                Some("outbound|1|dev-1|a.b.svc.cluster.local"),
                Some("outbound|80|dev-1|a.b.svc.cluster.local"),
                Some("outbound|8080|dev-1|a.b.svc.cluster.local"),
                Some("outbound|65535|dev-1|a.b.svc.cluster.local"),
                Some("outbound|10|dev-1|a.b.svc.cluster.local"),
                Some("host-1.b.svc.cluster.local"),
                None,
            ]
        );
    }
}
