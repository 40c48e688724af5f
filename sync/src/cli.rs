//! Command line: `envlane-sync [FLAGS]` runs the controller,
//! `envlane-sync render -f FILE [FLAGS]` prints what it would apply,
//! `envlane-sync validate FILE` checks a plugin config strictly,
//! `envlane-sync schema` and `envlane-sync settings` print the config's JSON
//! Schema and the filter settings.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::render::{RenderOptions, DEFAULT_WASM_URL};
use crate::selector::LabelSelector;
use crate::shared::SharedProxy;

#[derive(Debug, Parser)]
#[command(
    name = "envlane-sync",
    version,
    about = "Publishes envlane's routing table from the Ready pods of each env",
    long_about = "Watches Namespaces, Pods and Services. In every namespace that matches \
--namespace-selector, each Service with at least one Ready pod of an env (pod label \
--env-label) gets a routing table entry; the table goes into a WasmPlugin per opted-in \
namespace, with a DestinationRule per Service (cluster mode) or a Service per env \
(host mode). Writes use server-side apply and only touch objects labelled \
app.kubernetes.io/managed-by=envlane-sync. Without a subcommand, runs the controller.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (the default).
    Run(RunArgs),
    /// Print the manifests that would be applied for the objects in a file,
    /// as multi-document YAML on stdout. Input: `kubectl get ns,pods,svc -A
    /// -o yaml` (or `-o json`) output.
    Render(RenderArgs),
    /// Check a plugin config (the WasmPlugin's pluginConfig, JSON or YAML)
    /// strictly: unknown fields, limits and every check the filter makes.
    /// Prints one line; exits non-zero when the config is invalid.
    Validate(ValidateArgs),
    /// Print, as JSON, the route patches cluster mode writes for a plugin
    /// config (the `configPatches` of the route EnvoyFilters, every service
    /// in one list), why routes were left alone, and every cluster the
    /// filter can choose (`targets`).
    RoutePatches(RoutePatchesArgs),
    /// Print the JSON Schema (draft 2020-12) of the plugin config (the
    /// WasmPlugin's pluginConfig), made from the filter's own config types.
    /// Strict: unknown fields are refused, as `validate` refuses them. Checks
    /// a schema cannot express (indexes in range, unique names, pair and
    /// target limits) are left to `validate`.
    Schema,
    /// Print filter settings as JSON: the file --settings takes (a plugin
    /// config without `envs`, `services` and `revision`). With no flags, the
    /// defaults; with --settings FILE, that file's settings, checked.
    Settings(SettingsArgs),
    /// Print, as JSON, the fixed names envlane-sync writes under that the
    /// manifests must agree with (RBAC resourceNames, labels): made from
    /// the constants render uses.
    Names,
    /// Print, as JSON, the ValidatingAdmissionPolicy (and its binding) that
    /// lets envlane-sync's ServiceAccount write only its own objects: the
    /// ownership label, envlane's names, opted-in namespaces.
    AdmissionPolicy(AdmissionPolicyArgs),
    /// Print a routing table readably: each service with its ports and envs
    /// by name. From a file (a WasmPlugin's pluginConfig, or the WasmPlugin)
    /// or live from the cluster (`--namespace`).
    Table(TableSourceArgs),
    /// Answer where a request goes and why: the env found (and where), the
    /// chain of envs tried for the service, the outcome and the cluster, as
    /// the filter decides it (its own code). Offline from a file or live.
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct TableSourceArgs {
    /// A file (`-`: stdin) with the pluginConfig, or a WasmPlugin holding it
    /// (`kubectl get wasmplugin envlane -n NS -o yaml`).
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with = "namespace"
    )]
    pub file: Option<PathBuf>,
    /// Read the WasmPlugin of this namespace from the cluster (KUBECONFIG or
    /// in-cluster config).
    #[arg(short = 'n', long, value_name = "NAMESPACE")]
    pub namespace: Option<String>,
    /// The WasmPlugin's name (live).
    #[arg(long, value_name = "NAME", default_value = "envlane")]
    pub wasm_plugin_name: String,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub source: TableSourceArgs,
    /// The request's `:authority` (`host[:port]`), e.g. `go.demo.svc.cluster.local:8080`.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub authority: String,
    /// The request's env (sent as the env header).
    #[arg(long, value_name = "ENV")]
    pub env: Option<String>,
    /// Another request header, `name: value` (repeatable): baggage, cookies, aliases.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    pub headers: Vec<String>,
    /// The calling pod's env label (what its sidecar uses without a header).
    #[arg(long, value_name = "ENV")]
    pub caller_env: Option<String>,
    /// Gateway mode: the calling pod's IP (what a shared proxy looks up in
    /// its caller table when the request has no env).
    #[arg(long, value_name = "IP")]
    pub caller_ip: Option<String>,
}

#[derive(Debug, Args)]
pub struct AdmissionPolicyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// envlane-sync's ServiceAccount, `namespace/name`.
    #[arg(
        long,
        value_name = "NAMESPACE/NAME",
        default_value = "envlane-system/envlane-sync"
    )]
    pub service_account: String,
}

#[derive(Debug, Args)]
pub struct SettingsArgs {
    /// Settings to print instead of the defaults (JSON or YAML, `-` for
    /// stdin); fields it leaves out keep their defaults.
    #[arg(long, value_name = "FILE")]
    pub settings: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The config file (`-` for stdin).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct RoutePatchesArgs {
    /// The plugin config (JSON or YAML).
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// VirtualServices to take into account (`kubectl get vs -A -o yaml`).
    #[arg(long, value_name = "FILE")]
    pub virtual_services: Option<PathBuf>,
}

/// Flags shared by the controller and `render`.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// Filter settings: a JSON or YAML PluginConfig without `envs` and
    /// `services` (envHeader, baggageKey, defaultEnv, mode, splitter, ...).
    /// Default: all defaults.
    #[arg(long, value_name = "FILE")]
    pub settings: Option<PathBuf>,

    /// Pod label whose value is the pod's env. Overrides `envLabel` in
    /// --settings; default: that, else `virtual-env`.
    #[arg(long, value_name = "LABEL")]
    pub env_label: Option<String>,

    /// Label selector (`k=v`, `k!=v`, `k`, `!k`, comma-separated) of the
    /// namespaces envlane-sync manages. Others are never read for routing nor
    /// written to.
    #[arg(
        long,
        value_name = "SELECTOR",
        default_value = "envlane.io/enabled=true"
    )]
    pub namespace_selector: String,

    /// Name of the WasmPlugin written in each opted-in namespace.
    #[arg(long, value_name = "NAME", default_value = "envlane")]
    pub wasm_plugin_name: String,

    /// Gateway mode: a centralized east-west gateway, as
    /// NAMESPACE:KEY=VALUE[,KEY=VALUE] (its pods' labels). Gets WasmPlugin
    /// `envlane-gateway` there with the caller table; label the namespace
    /// `envlane.io/gateway=true` (the admission policy checks it).
    /// Repeatable.
    #[arg(long = "gateway", value_name = "NS:SELECTOR")]
    pub gateways: Vec<String>,

    /// Gateway mode: an Istio ambient waypoint, as NAMESPACE/NAME (a Gateway
    /// of class istio-waypoint). Its namespace gets WasmPlugin
    /// `envlane-waypoint` targeting it, with the caller table. Repeatable.
    #[arg(long = "waypoint", value_name = "NS/NAME")]
    pub waypoints: Vec<String>,

    /// Gateway mode: most caller addresses in a shared proxy's table; past
    /// it the caller table is left out (with a CallerTableTooLarge warning).
    #[arg(long, value_name = "N", default_value_t = crate::shared::DEFAULT_MAX_CALLERS)]
    pub max_callers: usize,

    /// Endpoint mode: the mesh's trust domain (`meshConfig.trustDomain`):
    /// the ORIGINAL_DST clusters accept a pod only with the SPIFFE identity
    /// spiffe://TRUST_DOMAIN/ns/NS/sa/SA of a Ready pod of the Service.
    #[arg(long, value_name = "DOMAIN", default_value = crate::render::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,

    /// WasmPlugin `url`: where Istio fetches the filter module.
    #[arg(long, value_name = "URL", default_value = DEFAULT_WASM_URL)]
    pub wasm_url: String,

    /// WasmPlugin `sha256` (64 lower-case hex digits); unset by default.
    /// For an `oci://` URL Istio checks it against the image's manifest
    /// digest (what `./build.sh images` prints), not the module's own
    /// sha256; for an `http(s)://` URL it is the module's sha256.
    #[arg(long, value_name = "HEX")]
    pub wasm_sha256: Option<String>,

    /// Istio's root namespace (`meshConfig.rootNamespace`). Cluster mode
    /// writes one route EnvoyFilter per Service there, so every sidecar
    /// re-targets the Service's routes on the filter's decision.
    #[arg(long, value_name = "NAMESPACE", default_value = crate::render::DEFAULT_ISTIO_ROOT_NAMESPACE)]
    pub istio_root_namespace: String,

    /// Log filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or
    /// tracing directives such as `info,kube=warn`.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Address of the /healthz, /readyz and /metrics endpoint.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9090")]
    pub listen: SocketAddr,

    /// How long to gather changes before rendering and writing (e.g. `1s`,
    /// `250ms`).
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub debounce: Duration,

    /// How often to re-read the objects envlane-sync owns and repair any
    /// drift, even without changes (e.g. `5m`; `0s` = never).
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    pub resync: Duration,

    /// Longest wait between retries after API errors (the wait doubles from
    /// 500ms up to this).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// `/readyz` answers 503 while a watch (namespaces, pods, services,
    /// VirtualServices) has kept failing for longer than this: the tables
    /// may be going stale.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub watch_stale_after: Duration,

    /// Objects larger than this (bytes of JSON) are refused, with an Event,
    /// before writing: etcd refuses requests over 1.5 MiB.
    #[arg(long, value_name = "BYTES", default_value_t = crate::plan::DEFAULT_MAX_OBJECT_BYTES)]
    pub max_object_bytes: usize,

    /// Write only while holding a coordination.k8s.io Lease, so two
    /// replicas (e.g. during a rollout) never write at once.
    #[arg(long, value_name = "BOOL", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Namespace of the leader Lease (the pod's own, from `POD_NAMESPACE`).
    #[arg(
        long,
        value_name = "NAMESPACE",
        env = "POD_NAMESPACE",
        default_value = "envlane-system"
    )]
    pub leader_elect_namespace: String,

    /// Name of the leader Lease.
    #[arg(long, value_name = "NAME", default_value = "envlane-sync")]
    pub leader_elect_lease_name: String,

    /// How long a leader's claim lasts without renewal: the longest a
    /// standby waits after a leader dies without releasing the Lease.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_elect_lease_duration: Duration,

    /// A leader that could not renew for this long stops writing (shorter
    /// than the lease duration).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub leader_elect_renew_deadline: Duration,

    /// How often the Lease is read and renewed.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub leader_elect_retry_period: Duration,
}

impl RunArgs {
    /// The election, if enabled, with its timings checked.
    pub fn election(&self) -> Result<Option<crate::kube_io::Election>, String> {
        if !self.leader_elect {
            return Ok(None);
        }
        let config = crate::leader::ElectionConfig::try_new(
            self.leader_elect_lease_duration,
            self.leader_elect_renew_deadline,
            self.leader_elect_retry_period,
        )?;
        Ok(Some(crate::kube_io::Election {
            namespace: self.leader_elect_namespace.clone(),
            name: self.leader_elect_lease_name.clone(),
            config,
        }))
    }
}

#[derive(Debug, Clone, Args)]
pub struct RenderArgs {
    /// Input file (`-` for stdin): `kubectl get ns,pods,svc -A -o yaml|json`.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,

    /// Print the render time and table size to stderr.
    #[arg(long)]
    pub stats: bool,

    #[command(flatten)]
    pub common: CommonArgs,
}

/// `250ms`, `1s`, `1.5s`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 250ms, 1s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{s}`: {e}"))
}

impl CommonArgs {
    /// Reads --settings and checks every flag; the error says which is wrong.
    pub fn render_options(&self) -> Result<RenderOptions, String> {
        let mut settings = match &self.settings {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("--settings {}: {e}", path.display()))?;
                crate::input::parse_settings(&text)
                    .map_err(|e| format!("--settings {}: {e}", path.display()))?
            }
            None => envlane::config::PluginConfig::default(),
        };
        if let Some(label) = &self.env_label {
            settings.env_label = label.clone();
        }
        settings.revision = None;
        // The settings alone must pass the filter's check.
        envlane::table::RoutingTable::compile(&settings, &envlane::table::Node::default())
            .map_err(|e| format!("settings: {e}"))?;
        let namespace_selector = LabelSelector::parse(&self.namespace_selector)
            .map_err(|e| format!("--namespace-selector: {e}"))?;
        if let Some(sha) = &self.wasm_sha256 {
            let ok = sha.len() == 64
                && sha
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                return Err("--wasm-sha256: must be 64 lower-case hex digits".into());
            }
        }
        if self.wasm_url.is_empty() {
            return Err("--wasm-url: must not be empty".into());
        }
        let name_ok = !self.wasm_plugin_name.is_empty()
            && self.wasm_plugin_name.len() <= 253
            && self
                .wasm_plugin_name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !name_ok {
            return Err("--wasm-plugin-name: must be a DNS subdomain name".into());
        }
        let mut shared_proxies = Vec::new();
        for g in &self.gateways {
            shared_proxies.push(SharedProxy::parse_gateway(g)?);
        }
        for w in &self.waypoints {
            shared_proxies.push(SharedProxy::parse_waypoint(w)?);
        }
        crate::shared::plugins(&shared_proxies)?;
        Ok(RenderOptions {
            settings,
            namespace_selector,
            wasm_plugin_name: self.wasm_plugin_name.clone(),
            wasm_url: self.wasm_url.clone(),
            wasm_sha256: self.wasm_sha256.clone(),
            istio_root_namespace: self.istio_root_namespace.clone(),
            blocked: Default::default(),
            shared_proxies,
            max_callers: self.max_callers,
            trust_domain: self.trust_domain.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1d").is_err());
    }

    #[test]
    fn cli_parses_run_and_render() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from(["envlane-sync", "--debounce", "200ms"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.debounce, Duration::from_millis(200));
        let cli = Cli::try_parse_from([
            "envlane-sync",
            "render",
            "-f",
            "x.yaml",
            "--env-label",
            "lane",
        ])
        .unwrap();
        let Some(Command::Render(r)) = cli.command else {
            panic!("render expected")
        };
        assert_eq!(r.common.env_label.as_deref(), Some("lane"));
        let opts = r.common.render_options().unwrap();
        assert_eq!(opts.settings.env_label, "lane");
    }

    #[test]
    fn bad_flags_are_refused() {
        let cli = Cli::try_parse_from(["envlane-sync", "--wasm-sha256", "abc"]).unwrap();
        assert!(cli.run.common.render_options().is_err());
        let cli =
            Cli::try_parse_from(["envlane-sync", "--namespace-selector", "a in (b)"]).unwrap();
        assert!(cli.run.common.render_options().is_err());
    }
}
