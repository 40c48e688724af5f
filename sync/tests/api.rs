//! The real client and control loop against the in-test fake API server.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod fake;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envlane::config::{Mode, PluginConfig};
use envlane_sync::controller::LoopConfig;
use envlane_sync::metrics::{ErrorKind, Metrics};
use envlane_sync::render::RenderOptions;
use envlane_sync::{input, kube_io, render};
use fake::{eventually, Fake};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);

fn ns(name: &str, opted: bool) -> Value {
    let mut labels = json!({"kubernetes.io/metadata.name": name});
    if opted {
        labels["envlane.io/enabled"] = "true".into();
    }
    json!({"metadata": {"name": name, "labels": labels}})
}

fn pod(ns: &str, app: &str, env: &str, ready: bool) -> Value {
    json!({
        "metadata": {"name": pod_name(app, env), "namespace": ns,
                     "labels": {"app": app, "virtual-env": env}},
        "spec": {"containers": [{"name": app, "image": "app"}]},
        "status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": if ready { "True" } else { "False" }}]}
    })
}

fn pod_name(app: &str, env: &str) -> String {
    format!("{app}-{}", env.replace('.', "-"))
}

fn svc(ns: &str, name: &str, app: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 8080, "targetPort": 8080}]}
    })
}

/// alibaba's topology in `demo`, plus a namespace that is not opted in.
fn seed(fake: &Fake) {
    fake.put("namespaces", ns("demo", true));
    fake.put("namespaces", ns("other", false));
    for (app, envs) in [
        ("node", &["dev", "dev.proj1"][..]),
        ("go", &["dev"][..]),
        (
            "springboot",
            &["dev", "dev.proj1", "dev.proj1.feature1"][..],
        ),
    ] {
        for env in envs {
            fake.put("pods", pod("demo", app, env, true));
        }
    }
    fake.put("pods", pod("other", "go", "dev", true));
    fake.put("services", svc("demo", "node", "node"));
    fake.put("services", svc("demo", "go", "go"));
    fake.put("services", svc("demo", "java", "springboot"));
    fake.put("services", svc("other", "go", "go"));
}

fn loop_config(debounce_ms: u64) -> LoopConfig {
    LoopConfig {
        debounce: Duration::from_millis(debounce_ms),
        resync: None,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        watch_stale_after: Duration::from_secs(60),
        ..LoopConfig::default()
    }
}

fn options(mode: Mode) -> RenderOptions {
    RenderOptions {
        settings: PluginConfig {
            default_env: Some("dev".into()),
            mode,
            ..PluginConfig::default()
        },
        ..RenderOptions::default()
    }
}

struct Running {
    handle: JoinHandle<()>,
    metrics: Arc<Metrics>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

fn start(addr: std::net::SocketAddr, opts: RenderOptions, cfg: LoopConfig) -> Running {
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    let client = kube::Client::try_from(config).unwrap();
    let metrics = Arc::new(Metrics::default());
    let handle = tokio::spawn(kube_io::run(client, opts, cfg, None, metrics.clone()));
    Running { handle, metrics }
}

/// The table in the stored WasmPlugin of `ns`.
fn table(fake: &Fake, ns: &str) -> Option<PluginConfig> {
    let wp = fake.get("wasmplugins", ns, "envlane")?;
    serde_json::from_value(wp["spec"]["pluginConfig"].clone()).ok()
}

/// `host: env,env` lines of the stored table.
fn pairs(fake: &Fake, ns: &str) -> Vec<String> {
    let Some(t) = table(fake, ns) else {
        return vec!["(no table)".into()];
    };
    t.services
        .iter()
        .map(|s| {
            let envs: Vec<&str> = s
                .envs
                .iter()
                .map(|&i| t.envs[i as usize].name.as_str())
                .collect();
            format!("{}: {}", s.host.split('.').next().unwrap(), envs.join(","))
        })
        .collect()
}

/// What a fresh render of the fake's current objects wants.
fn expected(fake: &Fake, opts: &RenderOptions) -> Vec<(String, Value)> {
    rendered(fake, opts)
        .objects
        .into_iter()
        .map(|o| (o.key.to_string(), o.body()))
        .collect()
}

/// What render makes of the fake's namespaces, pods and services.
fn rendered(fake: &Fake, opts: &RenderOptions) -> render::Rendered {
    let mut items = Vec::new();
    for resource in ["namespaces", "pods", "services"] {
        for name in fake.names(resource) {
            let (ns, name) = name.split_once('/').unwrap();
            items.push(fake.get(resource, ns, name).unwrap());
        }
    }
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items}).to_string();
    let snap = input::read_snapshot(&list).unwrap();
    render::render(
        &snap.namespaces,
        &snap.pods,
        &snap.services,
        &snap.virtual_services,
        opts,
    )
    .unwrap()
}

/// The managed objects the fake holds, in the same shape.
fn stored(fake: &Fake) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for (resource, kind) in [
        ("wasmplugins", "WasmPlugin"),
        ("envoyfilters", "EnvoyFilter"),
        ("destinationrules", "DestinationRule"),
        ("services", "Service"),
    ] {
        for name in fake.names(resource) {
            let (ns, n) = name.split_once('/').unwrap();
            let obj = fake.get(resource, ns, n).unwrap();
            if obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] != "envlane-sync" {
                continue;
            }
            let body = json!({
                "apiVersion": obj["apiVersion"], "kind": obj["kind"],
                "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
                             "labels": obj["metadata"]["labels"], "annotations": obj["metadata"]["annotations"]},
                "spec": obj["spec"],
            });
            out.push((format!("{kind}/{ns}/{n}"), body));
        }
    }
    let order = |k: &str| {
        let mut parts = k.splitn(3, '/');
        let kind = parts.next().unwrap_or_default();
        let ns = parts.next().unwrap_or_default().to_string();
        let name = parts.next().unwrap_or_default().to_string();
        let rank = ["WasmPlugin", "EnvoyFilter", "DestinationRule", "Service"]
            .iter()
            .position(|k| *k == kind);
        (ns, rank, name)
    };
    out.sort_by_key(|(k, _)| order(k));
    out
}

async fn converged(fake: &Fake, opts: &RenderOptions) -> bool {
    eventually(WAIT, || stored(fake) == expected(fake, opts)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_waits_for_every_list_then_writes_once() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    fake.hold_lists("pods");
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(
        eventually(WAIT, || fake.list_count("namespaces") > 0
            && fake.list_count("services") > 0)
        .await
    );
    // Absence over a window (the loop is waiting: there is no event to
    // wait for), not a wait for state to appear.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        fake.write_count(),
        0,
        "nothing written before the pod list completes"
    );
    assert!(!run.metrics.is_ready());
    fake.release_lists();
    assert!(converged(&fake, &opts).await, "{:#?}", stored(&fake));
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);
    assert_eq!(
        pairs(&fake, "demo"),
        [
            "go: dev",
            "java: dev,dev.proj1,dev.proj1.feature1",
            "node: dev,dev.proj1"
        ]
    );
    assert!(
        fake.get("wasmplugins", "other", "envlane").is_none(),
        "not opted in"
    );
    let writes = fake.writes();
    // A WasmPlugin, three DestinationRules, three route EnvoyFilters.
    assert_eq!(writes.len(), 7, "{writes:#?}");
    for w in &writes {
        assert_eq!(w.method, "PATCH");
        assert_eq!(w.content_type, "application/apply-patch+yaml");
        assert_eq!(
            w.query.get("fieldManager").map(String::as_str),
            Some("envlane-sync")
        );
        assert_eq!(w.query.get("force"), None, "no force when creating");
    }
    // Subsets and route patches before the table that names them.
    assert_eq!(writes.last().unwrap().resource, "wasmplugins");
    let text = run.metrics.to_prometheus();
    assert!(text.contains("envlane_sync_table_pairs 6"), "{text}");
    assert!(
        text.contains("envlane_sync_writes_total{op=\"apply\"} 7"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_ready_and_unready_within_two_seconds() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let opts = options(Mode::Cluster);
    // The default debounce: the 2 s bound is for it.
    let run = start(addr, opts.clone(), loop_config(1000));
    assert!(converged(&fake, &opts).await);
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);

    // A new, not yet Ready pod: a pass runs and writes nothing about dev.proj2.
    let syncs = run.metrics.syncs();
    fake.put("pods", pod("demo", "go", "dev.proj2", false));
    assert!(eventually(WAIT, || run.metrics.syncs() > syncs).await);
    assert_eq!(pairs(&fake, "demo")[0], "go: dev");

    let became_ready = Instant::now();
    fake.put("pods", pod("demo", "go", "dev.proj2", true));
    assert!(eventually(WAIT, || pairs(&fake, "demo")[0] == "go: dev,dev.proj2").await);
    let took = became_ready.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let dr = fake.get("destinationrules", "demo", "envlane-go").unwrap();
    assert_eq!(dr["spec"]["subsets"].as_array().unwrap().len(), 2);

    // The last Ready pod of dev.proj1 of node goes un-Ready: the pair goes.
    let unready = Instant::now();
    fake.put("pods", pod("demo", "node", "dev.proj1", false));
    assert!(eventually(WAIT, || pairs(&fake, "demo")[2] == "node: dev").await);
    let took = unready.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(converged(&fake, &opts).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envs_and_namespaces_come_and_go_and_foreign_objects_are_left_alone() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    // Someone else's DestinationRule with the name envlane would use, and an
    // unrelated one.
    let foreign = json!({"metadata": {"name": "envlane-go", "namespace": "demo"},
                         "spec": {"host": "go.demo.svc.cluster.local"}});
    fake.put("destinationrules", foreign.clone());
    fake.put(
        "destinationrules",
        json!({"metadata": {"name": "mine", "namespace": "demo"}, "spec": {"host": "x"}}),
    );
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);
    assert!(eventually(WAIT, || run.metrics.error_count(ErrorKind::Conflict) == 1).await);
    assert_eq!(
        fake.get("destinationrules", "demo", "envlane-go").unwrap()["spec"],
        foreign["spec"],
        "a foreign object is never written"
    );
    // Issue 15: each namespace's table write is an Event on its WasmPlugin.
    assert!(
        eventually(WAIT, || fake.events().iter().any(
            |(ns, reason, about, note)| ns == "demo"
                && reason == "TableWritten"
                && about == "WasmPlugin/envlane"
                && note.contains("(service, env) pairs")
        ))
        .await,
        "{:?}",
        fake.events()
    );
    // Issue 11: an Event on the foreign object says why its Service is not
    // env-routed.
    assert!(
        eventually(WAIT, || fake.events().iter().any(
            |(ns, reason, about, note)| ns == "demo"
                && reason == "ForeignObject"
                && about == "DestinationRule/envlane-go"
                && note.contains("not managed by envlane-sync")
        ))
        .await,
        "{:?}",
        fake.events()
    );
    // Its Service leaves the table (issue 11): the filter must not pick the
    // subset clusters only envlane's DestinationRule would define (a 503);
    // the other Services stay.
    assert!(
        eventually(WAIT, || {
            let p = pairs(&fake, "demo");
            p.iter().any(|l| l.starts_with("node:")) && p.iter().all(|l| !l.starts_with("go:"))
        })
        .await,
        "{:?}",
        pairs(&fake, "demo")
    );

    // A new service and env appear.
    fake.put("services", svc("demo", "php", "php"));
    fake.put("pods", pod("demo", "php", "dev.proj9", true));
    assert!(
        eventually(WAIT, || fake
            .get("destinationrules", "demo", "envlane-php")
            .is_some())
        .await
    );
    assert!(
        eventually(WAIT, || pairs(&fake, "demo")
            .contains(&"php: dev.proj9".to_string()))
        .await
    );

    // The env's pods go away: its DestinationRule is deleted.
    fake.delete("pods", "demo", &pod_name("php", "dev.proj9"));
    assert!(
        eventually(WAIT, || fake
            .get("destinationrules", "demo", "envlane-php")
            .is_none())
        .await
    );
    assert!(!pairs(&fake, "demo").iter().any(|p| p.starts_with("php")));

    // A second namespace opts in, then opts out again.
    fake.put("namespaces", ns("other", true));
    assert!(
        eventually(WAIT, || fake
            .get("destinationrules", "other", "envlane-go")
            .is_some())
        .await
    );
    assert!(eventually(WAIT, || table(&fake, "other") == table(&fake, "demo")).await);
    fake.put("namespaces", ns("other", false));
    assert!(
        eventually(WAIT, || fake
            .get("wasmplugins", "other", "envlane")
            .is_none())
        .await
    );
    assert!(
        eventually(WAIT, || fake
            .get("destinationrules", "other", "envlane-go")
            .is_none())
        .await
    );

    // Foreign objects were never touched.
    assert!(fake.get("destinationrules", "demo", "mine").is_some());
    for w in fake.writes() {
        assert!(
            !(w.resource == "destinationrules"
                && w.namespace == "demo"
                && (w.name == "envlane-go" || w.name == "mine")),
            "wrote a foreign object: {w:?}"
        );
    }
    assert!(converged_except_conflicts(&fake, &opts).await);
}

/// Like `converged`, with the object that belongs to someone else known as
/// such (its Service is then left out of the table and of every object).
async fn converged_except_conflicts(fake: &Fake, opts: &RenderOptions) -> bool {
    let mut opts = opts.clone();
    opts.blocked.insert(render::ObjectKey {
        namespace: "demo".into(),
        kind: render::Kind::DestinationRule,
        name: "envlane-go".into(),
    });
    eventually(WAIT, || stored(fake) == expected(fake, &opts)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_expired_watches_resume_or_relist_to_the_same_output() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(converged(&fake, &opts).await);
    assert!(eventually(WAIT, || fake.watch_count("pods") >= 1).await);
    let lists = fake.list_count("pods");

    // Dropped: re-watch from the last version, no relist; a change made
    // meanwhile arrives.
    fake.drop_watches();
    fake.put("pods", pod("demo", "go", "dev.proj2", true));
    assert!(eventually(WAIT, || pairs(&fake, "demo")[0] == "go: dev,dev.proj2").await);
    assert_eq!(
        fake.list_count("pods"),
        lists,
        "a dropped watch resumes without relisting"
    );

    // Expired (410 Gone): relist; changes made during the gap are seen.
    fake.expire_watches();
    fake.delete("pods", "demo", &pod_name("go", "dev.proj2"));
    fake.put("pods", pod("demo", "go", "dev.proj3", true));
    assert!(
        eventually(WAIT, || fake.list_count("pods") > lists).await,
        "relisted after 410: {:#?}",
        fake.requests()
    );
    assert!(eventually(WAIT, || pairs(&fake, "demo")[0] == "go: dev,dev.proj3").await);
    assert!(converged(&fake, &opts).await);
    assert!(
        run.metrics.error_count(ErrorKind::Watch) >= 1,
        "410 counted"
    );
    let writes = fake.write_count();
    // Relist with nothing new: no write.
    fake.expire_watches();
    assert!(eventually(WAIT, || fake.list_count("pods") > lists + 1).await);
    // Absence over a window: an unchanged relist triggers no pass at all.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.write_count(), writes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_down_then_back() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    fake.set_failing(true);
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(eventually(WAIT, || run.metrics.error_count(ErrorKind::Watch) > 3).await);
    assert_eq!(fake.write_count(), 0);
    fake.set_failing(false);
    assert!(converged(&fake, &opts).await);
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);

    // Down while a change happens: the writes fail and are retried.
    let errors = run.metrics.error_count(ErrorKind::Watch);
    fake.set_failing(true);
    fake.put("pods", pod("demo", "go", "dev.proj2", true));
    assert!(
        eventually(WAIT, || run.metrics.error_count(ErrorKind::Watch)
            > errors + 2)
        .await
    );
    assert_ne!(pairs(&fake, "demo")[0], "go: dev,dev.proj2");
    fake.set_failing(false);
    assert!(eventually(WAIT, || pairs(&fake, "demo")[0] == "go: dev,dev.proj2").await);
    assert!(converged(&fake, &opts).await);

    // Writes fail (500) while reads work: the pass is retried with backoff.
    let api_errors = run.metrics.error_count(ErrorKind::Api);
    fake.set_failing_writes(true);
    fake.put("pods", pod("demo", "go", "dev.proj4", true));
    assert!(
        eventually(WAIT, || run.metrics.error_count(ErrorKind::Api)
            >= api_errors + 2)
        .await
    );
    assert_eq!(pairs(&fake, "demo")[0], "go: dev,dev.proj2");
    fake.set_failing_writes(false);
    assert!(
        eventually(WAIT, || pairs(&fake, "demo")[0]
            == "go: dev,dev.proj2,dev.proj4")
        .await
    );
    assert!(converged(&fake, &opts).await);
}

/// Issue 11: any write error other than a conflict aborted the whole pass,
/// so one namespace whose writes fail (a webhook, a quota) stopped every
/// other namespace's updates. Now the rest of the pass goes on; the failing
/// namespace's Services leave the table until their objects can be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_namespace_refusing_writes_does_not_stop_the_others() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    fake.put("namespaces", ns("blocked", true));
    fake.put("pods", pod("blocked", "php", "dev", true));
    fake.put("services", svc("blocked", "php", "php"));
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(converged(&fake, &opts).await);
    assert!(pairs(&fake, "demo").contains(&"php: dev".to_string()));

    fake.set_failing_writes_in(Some("blocked"));
    let errors = run.metrics.error_count(ErrorKind::Api);
    // A change in php's own namespace, and one in demo.
    fake.put("pods", pod("blocked", "php", "dev.proj1", true));
    fake.put("pods", pod("demo", "go", "dev.proj2", true));
    assert!(
        eventually(WAIT, || {
            let p = pairs(&fake, "demo");
            p.contains(&"go: dev,dev.proj2".to_string()) && !p.iter().any(|l| l.starts_with("php:"))
        })
        .await,
        "demo is updated and php, whose DestinationRule cannot be written, left its table: {:?}",
        pairs(&fake, "demo")
    );
    assert!(run.metrics.error_count(ErrorKind::Api) > errors);
    // Issue 11: the failure is counted and reported per namespace.
    assert!(run.metrics.namespace_write_failures("blocked") > 0);
    assert_eq!(run.metrics.namespace_write_failures("demo"), 0);
    assert!(run
        .metrics
        .to_prometheus()
        .contains("envlane_sync_namespace_write_failures_total{namespace=\"blocked\"}"));
    assert!(
        eventually(WAIT, || fake.events().iter().any(
            |(ns, reason, about, _)| ns == "blocked"
                && reason == "WriteFailed"
                && about == "Namespace/blocked"
        ))
        .await,
        "{:?}",
        fake.events()
    );
    // While blocked keeps failing and backing off, demo's changes still go
    // through at once.
    fake.put("pods", pod("demo", "go", "dev.proj3", true));
    assert!(
        eventually(WAIT, || pairs(&fake, "demo")
            .contains(&"go: dev,dev.proj2,dev.proj3".to_string()))
        .await,
        "{:?}",
        pairs(&fake, "demo")
    );

    fake.set_failing_writes_in(None);
    assert!(
        eventually(WAIT, || pairs(&fake, "blocked")
            .contains(&"php: dev,dev.proj1".to_string()))
        .await,
        "{:?}",
        pairs(&fake, "blocked")
    );
    assert!(converged(&fake, &opts).await);
}

/// A route EnvoyFilter lives in Istio's root namespace but belongs to its
/// Service's tenant: when the API server refuses it, only that Service stays
/// out of the table, nothing is deleted (no churn on every retry), and the
/// other namespaces' changes go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_route_filter_holds_only_its_service_and_deletes_nothing() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    fake.put("namespaces", ns("shop", true));
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(converged(&fake, &opts).await);

    fake.set_failing_writes_in(Some("istio-system"));
    let writes_before = fake.writes().len();
    fake.put("services", svc("demo", "php", "php"));
    fake.put("pods", pod("demo", "php", "dev", true));
    fake.put("services", svc("shop", "cart", "cart"));
    fake.put("pods", pod("shop", "cart", "dev", true));
    // php's and cart's route filters cannot be written: both stay out of the
    // table, the rest of it is unchanged, and the failure is demo's and
    // shop's, not istio-system's.
    assert!(
        eventually(WAIT, || run.metrics.namespace_write_failures("demo") > 0
            && run.metrics.namespace_write_failures("shop") > 0)
        .await
    );
    assert_eq!(run.metrics.namespace_write_failures("istio-system"), 0);
    let p = pairs(&fake, "demo");
    assert!(
        p.iter()
            .all(|l| !l.starts_with("php:") && !l.starts_with("cart:")),
        "{p:?}"
    );
    assert!(p.contains(&"go: dev".to_string()), "{p:?}");
    // Retries (backoff 50..400 ms) went by; nothing was deleted meanwhile.
    assert!(
        eventually(WAIT, || run.metrics.error_count(ErrorKind::Api) >= 4).await,
        "retried"
    );
    let deletes: Vec<_> = fake.writes()[writes_before..]
        .iter()
        .filter(|w| w.method == "DELETE")
        .map(|w| format!("{}/{}/{}", w.resource, w.namespace, w.name))
        .collect();
    assert!(deletes.is_empty(), "{deletes:?}");

    fake.set_failing_writes_in(None);
    assert!(
        eventually(WAIT, || {
            let p = pairs(&fake, "demo");
            p.contains(&"php: dev".to_string()) && p.contains(&"cart: dev".to_string())
        })
        .await,
        "{:?}",
        pairs(&fake, "demo")
    );
    assert!(converged(&fake, &opts).await);
}

/// Issue 11: /readyz stayed ready while a watch kept failing, so nobody saw
/// the tables going stale. Now a watch failing for longer than
/// --watch-stale-after makes it fail, until the watch recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_failing_for_too_long_makes_readiness_fail_until_it_recovers() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let opts = options(Mode::Cluster);
    let cfg = LoopConfig {
        watch_stale_after: Duration::from_millis(300),
        ..loop_config(50)
    };
    let run = start(addr, opts.clone(), cfg);
    assert!(converged(&fake, &opts).await);
    assert!(run.metrics.stale_watches().is_empty());
    fake.set_failing(true);
    assert!(
        eventually(WAIT, || run.metrics.stale_watches().len() == 4).await,
        "{:?}",
        run.metrics.stale_watches()
    );
    assert!(run
        .metrics
        .to_prometheus()
        .contains("envlane_sync_watches_stale 4"));
    fake.set_failing(false);
    assert!(eventually(WAIT, || run.metrics.stale_watches().is_empty()).await);
    assert!(converged(&fake, &opts).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_gives_the_same_output_without_writing() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let opts = options(Mode::Cluster);
    let first = start(addr, opts.clone(), loop_config(100));
    assert!(converged(&fake, &opts).await);
    assert!(eventually(WAIT, || first.metrics.is_ready()).await);
    let before = stored(&fake);
    let writes = fake.write_count();
    drop(first);

    let second = start(addr, opts.clone(), loop_config(100));
    // Ready = its first pass finished.
    assert!(eventually(WAIT, || second.metrics.syncs() > 0).await);
    assert_eq!(
        fake.write_count(),
        writes,
        "{:#?}",
        &fake.writes()[writes..]
    );
    assert_eq!(stored(&fake), before);
    assert_eq!(second.metrics.writes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_routing_means_no_write() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(converged(&fake, &opts).await);
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);
    let writes = fake.write_count();
    let reconciles = run.metrics.reconciles.load(Relaxed);

    // A second Ready pod of an env that is already there, a label that does
    // not matter, a pod without an env label: all re-render to the same objects.
    let mut extra = pod("demo", "go", "dev", true);
    extra["metadata"]["name"] = "go-dev-2".into();
    fake.put("pods", extra);
    let mut relabelled = ns("demo", true);
    relabelled["metadata"]["labels"]["team"] = "a".into();
    fake.put("namespaces", relabelled);
    let mut plain = pod("demo", "go", "dev", true);
    plain["metadata"]["name"] = "no-env".into();
    plain["metadata"]["labels"] = json!({"app": "go"});
    fake.put("pods", plain);
    assert!(
        eventually(WAIT, || run.metrics.reconciles.load(Relaxed) > reconciles
            && run.metrics.syncs() >= run.metrics.reconciles.load(Relaxed))
        .await
    );
    assert_eq!(
        fake.write_count(),
        writes,
        "{:#?}",
        &fake.writes()[writes..]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_mode_writes_per_env_services_and_cleans_them_up() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let opts = options(Mode::Host);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(converged(&fake, &opts).await, "{:#?}", stored(&fake));
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);
    assert!(fake.names("destinationrules").is_empty());
    assert!(fake.get("services", "demo", "go-dev").is_some());
    let t = table(&fake, "demo").unwrap();
    let proj1 = t
        .envs
        .iter()
        .find(|e| e.name == "dev.proj1")
        .unwrap()
        .subset
        .clone()
        .unwrap();
    let node_proj1 = format!("node-{proj1}");
    let s = fake.get("services", "demo", &node_proj1).unwrap();
    assert_eq!(
        s["spec"]["selector"],
        json!({"app": "node", "virtual-env": "dev.proj1"})
    );

    // Our own Services are watched too; they must not feed back into writes.
    let writes = fake.write_count();
    // Absence over a window: no write may follow the echo of our own writes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.write_count(), writes);

    fake.delete("pods", "demo", &pod_name("node", "dev.proj1"));
    assert!(eventually(WAIT, || fake.get("services", "demo", &node_proj1).is_none()).await);
    assert!(
        fake.get("services", "demo", "node").is_some(),
        "the real Service stays"
    );
    assert!(converged(&fake, &opts).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_env_labels_are_counted_and_never_written() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let mut bad = pod("demo", "go", "dev", true);
    bad["metadata"]["name"] = "go-bad".into();
    bad["metadata"]["labels"]["virtual-env"] = "dev..x".into();
    fake.put("pods", bad);
    let opts = options(Mode::Cluster);
    let run = start(addr, opts.clone(), loop_config(100));
    assert!(converged(&fake, &opts).await);
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);
    assert_eq!(run.metrics.invalid_env_labels.load(Relaxed), 1);
    assert!(run
        .metrics
        .to_prometheus()
        .contains("envlane_sync_invalid_env_labels_total 1"));
    assert!(!serde_json::to_string(&table(&fake, "demo"))
        .unwrap()
        .contains("dev..x"));
    assert!(
        eventually(WAIT, || fake.events().iter().any(
            |(ns, reason, about, _)| ns == "demo"
                && reason == "InvalidEnvLabel"
                && about == "Pod/go-bad"
        ))
        .await,
        "{:?}",
        fake.events()
    );
}

/// Issue 11: nothing guarded object sizes, so a table over etcd's request
/// limit failed at every pass. Now an object over --max-object-bytes is
/// refused whole before writing, with an Event, and the rest is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_over_the_size_limit_is_refused_with_an_event() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    // Host mode: per-env Services are small, the table is not.
    let opts = options(Mode::Host);
    // A limit every object but the tables fits in.
    let r = rendered(&fake, &opts);
    let (tables, others): (Vec<_>, Vec<_>) = r
        .objects
        .iter()
        .partition(|o| o.key.kind == render::Kind::WasmPlugin);
    let limit = others.iter().map(|o| o.size_bytes()).max().unwrap();
    assert!(
        tables.iter().all(|t| t.size_bytes() > limit),
        "precondition"
    );
    let cfg = LoopConfig {
        max_object_bytes: limit,
        ..loop_config(100)
    };
    let run = start(addr, opts.clone(), cfg);
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);
    assert!(
        eventually(WAIT, || fake.events().iter().any(
            |(ns, reason, about, note)| ns == "demo"
                && reason == "ObjectTooLarge"
                && about == "Namespace/demo"
                && note.contains("WasmPlugin/demo/envlane")
        ))
        .await,
        "{:?}",
        fake.events()
    );
    assert!(fake.get("wasmplugins", "demo", "envlane").is_none());
    assert!(fake.get("services", "demo", "go-dev").is_some());
    assert!(!fake.writes().iter().any(|w| w.resource == "wasmplugins"));
    assert!(run
        .metrics
        .to_prometheus()
        .contains("envlane_sync_warnings_total{reason=\"ObjectTooLarge\"} 1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_repairs_drift() {
    let (fake, addr) = Fake::start().await;
    seed(&fake);
    let opts = options(Mode::Cluster);
    let cfg = LoopConfig {
        resync: Some(Duration::from_millis(300)),
        ..loop_config(50)
    };
    let run = start(addr, opts.clone(), cfg);
    assert!(converged(&fake, &opts).await);
    assert!(eventually(WAIT, || run.metrics.is_ready()).await);
    // Someone deletes an owned object and edits another.
    fake.delete("destinationrules", "demo", "envlane-node");
    let mut wp = fake.get("wasmplugins", "demo", "envlane").unwrap();
    wp["spec"]["pluginConfig"]["defaultEnv"] = "prod".into();
    wp["metadata"]["annotations"]["envlane.io/content-hash"] = "edited".into();
    fake.put("wasmplugins", wp);
    assert!(converged(&fake, &opts).await);
    // Force only on objects it owns.
    let last = fake
        .writes()
        .into_iter()
        .rev()
        .find(|w| w.resource == "wasmplugins")
        .unwrap();
    assert_eq!(last.query.get("force").map(String::as_str), Some("true"));
}
