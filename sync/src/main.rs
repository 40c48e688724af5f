use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use envlane_sync::cli::{
    AdmissionPolicyArgs, Cli, Command, CommonArgs, ExplainArgs, LogFormat, RenderArgs,
    RoutePatchesArgs, RunArgs, SettingsArgs, TableSourceArgs, ValidateArgs,
};
use envlane_sync::controller::LoopConfig;
use envlane_sync::metrics::Metrics;
use envlane_sync::{input, kube_io, output, render, schema, server};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Render(args)) => render_cmd(&args),
        Some(Command::Validate(args)) => validate_cmd(&args),
        Some(Command::RoutePatches(args)) => route_patches_cmd(&args),
        Some(Command::Schema) => print(schema::schema_json()),
        Some(Command::Names) => print(Ok(format!(
            "{:#}\n",
            serde_json::json!({
                "gatewayPlugin": envlane_sync::shared::GATEWAY_PLUGIN_NAME,
                "waypointPlugin": envlane_sync::shared::WAYPOINT_PLUGIN_NAME,
                "gatewayNamespaceLabel": envlane_sync::shared::GATEWAY_NAMESPACE_LABEL,
            })
        ))),
        Some(Command::Settings(args)) => settings_cmd(&args),
        Some(Command::AdmissionPolicy(args)) => admission_policy_cmd(&args),
        Some(Command::Table(args)) => table_cmd(&args),
        Some(Command::Explain(args)) => explain_cmd(&args),
        Some(Command::Run(args)) => run_cmd(args),
        None => run_cmd(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, plain: the log line would repeat it (with colour codes).
            eprintln!("envlane-sync: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(common: &CommonArgs) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&common.log_level)
        .map_err(|e| format!("--log-level: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let done = match common.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    done.map_err(|e| format!("logging: {e}"))
}

fn read_input(file: &std::path::Path) -> Result<String, String> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| format!("stdin: {e}"))?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))
    }
}

fn validate_cmd(args: &ValidateArgs) -> Result<(), String> {
    let text = read_input(&args.file)?;
    let summary = input::validate_plugin_config(&text)
        .map_err(|e| format!("{}: {e}", args.file.display()))?;
    println!("{}: {summary}", args.file.display());
    Ok(())
}

fn route_patches_cmd(args: &RoutePatchesArgs) -> Result<(), String> {
    let text = read_input(&args.file)?;
    let at = |e: String| format!("{}: {e}", args.file.display());
    input::validate_plugin_config(&text).map_err(at)?;
    let value = input::parse_documents(&text)?
        .pop()
        .ok_or_else(|| at("empty".into()))?;
    let config: envlane::config::PluginConfig =
        serde_json::from_value(value).map_err(|e| at(e.to_string()))?;
    let table = envlane::table::RoutingTable::compile(&config, &Default::default())
        .map_err(|e| at(e.to_string()))?;
    let virtual_services = match &args.virtual_services {
        Some(path) => input::read_snapshot(&read_input(path)?)?.virtual_services,
        None => Vec::new(),
    };
    let refs: Vec<_> = virtual_services.iter().collect();
    let port_targets = table.cluster_targets();
    // Every cluster the filter can choose for this table: what istiod must
    // have generated (the real-control-plane suite checks it does).
    let targets: Vec<&str> = port_targets
        .iter()
        .flat_map(|p| p.targets.iter().copied())
        .collect();
    // The routes of the proxy the table is for (its `proxy`).
    let shape = envlane_sync::routes::Shape::of(config.proxy);
    let (by_service, warnings) =
        envlane_sync::routes::patches_for(shape, &port_targets, &refs, &config.cluster_domain);
    let patches: Vec<_> = by_service.into_iter().flat_map(|(_, p)| p).collect();
    let warnings: Vec<&str> = warnings.iter().map(|w| w.message.as_str()).collect();
    let out =
        serde_json::json!({"configPatches": patches, "warnings": warnings, "targets": targets});
    print(serde_json::to_string_pretty(&out).map_err(|e| e.to_string()))
}

fn admission_policy_cmd(args: &AdmissionPolicyArgs) -> Result<(), String> {
    let opts = args.common.render_options()?;
    let (ns, name) = args
        .service_account
        .split_once('/')
        .filter(|(n, s)| !n.is_empty() && !s.is_empty())
        .ok_or_else(|| {
            format!(
                "--service-account {}: want namespace/name",
                args.service_account
            )
        })?;
    let user = format!("system:serviceaccount:{ns}:{name}");
    let docs = envlane_sync::policy::admission_policy(&opts, &user);
    print(serde_json::to_string_pretty(&docs).map_err(|e| e.to_string()))
}

/// The plugin config from a file (the config itself or a WasmPlugin) or live.
fn load_table(args: &TableSourceArgs) -> Result<envlane::config::PluginConfig, String> {
    let (what, value) = match (&args.file, &args.namespace) {
        (Some(file), _) => {
            let text = read_input(file)?;
            let value = input::parse_documents(&text)?
                .pop()
                .ok_or_else(|| format!("{}: empty", file.display()))?;
            (file.display().to_string(), value)
        }
        (None, Some(ns)) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("runtime: {e}"))?;
            let value = runtime.block_on(kube_io::plugin_config(ns, &args.wasm_plugin_name))?;
            (format!("WasmPlugin {ns}/{}", args.wasm_plugin_name), value)
        }
        (None, None) => return Err("give -f FILE or --namespace NS".into()),
    };
    let config = value
        .pointer("/spec/pluginConfig")
        .cloned()
        .unwrap_or(value);
    serde_json::from_value(config).map_err(|e| format!("{what}: not a plugin config: {e}"))
}

fn table_cmd(args: &TableSourceArgs) -> Result<(), String> {
    print(Ok(envlane_sync::explain::table_text(&load_table(args)?)))
}

fn explain_cmd(args: &ExplainArgs) -> Result<(), String> {
    let config = load_table(&args.source)?;
    let mut headers = Vec::new();
    if let Some(env) = &args.env {
        headers.push((config.env_header.clone(), env.clone()));
    }
    for h in &args.headers {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("--header {h}: want `name: value`"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    let request = envlane_sync::explain::Request {
        authority: args.authority.clone(),
        headers,
        caller_env: args.caller_env.clone(),
        caller_ip: args.caller_ip.clone(),
    };
    print(envlane_sync::explain::explain(&config, &request))
}

fn settings_cmd(args: &SettingsArgs) -> Result<(), String> {
    let settings = match &args.settings {
        Some(path) => {
            let text = read_input(path)?;
            schema::settings(Some(&text))
                .map_err(|e| format!("--settings {}: {e}", path.display()))?
        }
        None => schema::settings(None)?,
    };
    print(schema::settings_json(&settings))
}

fn print(text: Result<String, String>) -> Result<(), String> {
    std::io::stdout()
        .write_all(text?.as_bytes())
        .map_err(|e| format!("stdout: {e}"))
}

fn render_cmd(args: &RenderArgs) -> Result<(), String> {
    init_logging(&args.common)?;
    let opts = args.common.render_options()?;
    let text = read_input(&args.file)?;
    let snap = input::read_snapshot(&text).map_err(|e| format!("{}: {e}", args.file.display()))?;
    input::check_snapshot(&snap, &opts.namespace_selector)
        .map_err(|e| format!("{}: {e}", args.file.display()))?;
    let started = Instant::now();
    let rendered = render::render(
        &snap.namespaces,
        &snap.pods,
        &snap.services,
        &snap.virtual_services,
        &opts,
    )
    .map_err(|e| e.to_string())?;
    let took = started.elapsed();
    for bad in &rendered.invalid_labels {
        tracing::warn!(
            namespace = %bad.namespace, pod = %bad.pod, value = %bad.value, reason = %bad.reason,
            "pod env label is not a valid env; pod skipped"
        );
    }
    for w in &rendered.warnings {
        tracing::warn!("{w}");
    }
    for pod in &rendered.not_ready {
        tracing::debug!(pod = %pod, "pod not Ready: its env is not counted");
    }
    let yaml = output::to_yaml(&rendered.objects)?;
    std::io::stdout()
        .write_all(yaml.as_bytes())
        .map_err(|e| format!("stdout: {e}"))?;
    if args.stats {
        let s = rendered.stats;
        eprintln!(
            "render: {:.3} ms for {} namespaces, {} pods, {} services -> {} envs, {} services, {} pairs, {} objects ({} pods not Ready, {} warnings)",
            took.as_secs_f64() * 1000.0,
            snap.namespaces.len(),
            snap.pods.len(),
            snap.services.len(),
            s.envs,
            s.services,
            s.pairs,
            rendered.objects.len(),
            rendered.not_ready.len(),
            rendered.warnings.len()
        );
    }
    Ok(())
}

fn run_cmd(args: RunArgs) -> Result<(), String> {
    init_logging(&args.common)?;
    let opts = args.common.render_options()?;
    let cfg = LoopConfig {
        debounce: args.debounce,
        resync: (!args.resync.is_zero()).then_some(args.resync),
        backoff_initial: std::time::Duration::from_millis(500).min(args.max_backoff),
        backoff_max: args.max_backoff,
        watch_stale_after: args.watch_stale_after,
        max_object_bytes: args.max_object_bytes,
    };
    let election = args.election()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    runtime.block_on(async move {
        let metrics = Arc::new(Metrics::default());
        let (addr, serve) = server::bind(args.listen, metrics.clone())
            .await
            .map_err(|e| format!("--listen {}: {e}", args.listen))?;
        tracing::info!(%addr, "serving /healthz, /readyz, /metrics");
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("kubernetes client: {e}"))?;
        tracing::info!(
            namespace_selector = %opts.namespace_selector,
            env_label = %opts.settings.env_label,
            mode = ?opts.settings.mode,
            "starting"
        );
        let result = tokio::select! {
            r = serve => r.map_err(|e| format!("http server: {e}")),
            () = kube_io::run(client.clone(), opts, cfg, election.clone(), metrics) => Ok(()),
            s = shutdown_signal() => {
                tracing::info!("{s}; exiting");
                Ok(())
            }
        };
        // The writer stopped above: hand the Lease over now rather than
        // making the next replica wait out its duration.
        if let Some(election) = &election {
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                kube_io::release(client, election),
            )
            .await;
        }
        result
    })
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}
