//! The control loop, independent of the client: stores fed by the watchers,
//! debounce, render, and a write pass through a [`Cluster`] that applies only
//! what changed and deletes only what it owns.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics::{ErrorKind, Metrics};
use crate::model::{Namespace, Pod, Service, VirtualService};
use crate::plan::{plan, Observed, Write, DEFAULT_MAX_OBJECT_BYTES};
use crate::render::{render, DesiredObject, Kind, ObjectKey, RenderError, RenderOptions};
use crate::warning::{Reason, Regarding, Warning};

/// What a watcher reports, in the shape of a relisting watch.
#[derive(Debug, Clone)]
pub enum StoreEvent<T> {
    /// A (re)list starts: the objects until `InitDone` replace the store.
    Init,
    InitApply(String, T),
    InitDone,
    Apply(String, T),
    Delete(String),
}

/// One kind's objects by `namespace/name`. During a relist the previous
/// complete view stays in place until the new list is complete.
#[derive(Debug)]
pub struct Store<T> {
    items: HashMap<String, T>,
    relisting: Option<HashMap<String, T>>,
    synced: bool,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Self {
            items: HashMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<T: PartialEq> Store<T> {
    /// Applies an event; true when the visible content changed (or the first
    /// list completed).
    pub fn apply(&mut self, event: StoreEvent<T>) -> bool {
        match event {
            StoreEvent::Init => {
                self.relisting = Some(HashMap::new());
                false
            }
            StoreEvent::InitApply(key, value) => match &mut self.relisting {
                Some(buffer) => {
                    buffer.insert(key, value);
                    false
                }
                None => {
                    self.items.insert(key, value);
                    true
                }
            },
            StoreEvent::InitDone => {
                let first = !self.synced;
                self.synced = true;
                match self.relisting.take() {
                    Some(buffer) => {
                        let changed = buffer != self.items;
                        self.items = buffer;
                        changed || first
                    }
                    None => first,
                }
            }
            StoreEvent::Apply(key, value) => {
                if self.items.get(&key) == Some(&value) {
                    false
                } else {
                    self.items.insert(key, value);
                    true
                }
            }
            StoreEvent::Delete(key) => self.items.remove(&key).is_some(),
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.items.values()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

#[derive(Debug, Default)]
pub struct Stores {
    pub namespaces: Store<Namespace>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub virtual_services: Store<VirtualService>,
}

impl Stores {
    pub fn all_synced(&self) -> bool {
        self.namespaces.synced()
            && self.pods.synced()
            && self.services.synced()
            && self.virtual_services.synced()
    }
}

/// The stores plus a change signal, shared by the watchers and the loop.
#[derive(Debug, Default)]
pub struct Shared {
    stores: Mutex<Stores>,
    generation: AtomicU64,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Stores> {
        // A panic while holding the lock cannot leave the maps half-written
        // in a way that matters here; keep going with what is there.
        self.stores.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the stores; when it reports a change, wakes the loop.
    pub fn update(&self, f: impl FnOnce(&mut Stores) -> bool) {
        let changed = f(&mut self.lock());
        if changed {
            self.generation.fetch_add(1, Relaxed);
            self.changed.notify_one();
        }
    }

    pub fn namespaces(&self, e: StoreEvent<Namespace>) {
        self.update(|s| s.namespaces.apply(e));
    }
    pub fn pods(&self, e: StoreEvent<Pod>) {
        self.update(|s| s.pods.apply(e));
    }
    pub fn services(&self, e: StoreEvent<Service>) {
        self.update(|s| s.services.apply(e));
    }
    pub fn virtual_services(&self, e: StoreEvent<VirtualService>) {
        self.update(|s| s.virtual_services.apply(e));
    }

    pub fn all_synced(&self) -> bool {
        self.lock().all_synced()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Relaxed)
    }

    /// Renders from the current view.
    pub fn render(&self, opts: &RenderOptions) -> Result<crate::render::Rendered, RenderError> {
        let s = self.lock();
        render(
            s.namespaces.values(),
            s.pods.values(),
            s.services.values(),
            s.virtual_services.values(),
            opts,
        )
    }
}

/// Why a call to the API failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Who owns an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    Absent,
    Ours,
    Foreign,
}

/// The writes the loop needs; [`crate::kube_io`] implements it.
pub trait Cluster: Send + Sync {
    /// Every object of `kind` labelled managed-by envlane-sync, with its
    /// content-hash annotation.
    fn list_owned(
        &self,
        kind: Kind,
    ) -> impl Future<Output = Result<Vec<(ObjectKey, Option<String>)>, ApiError>> + Send;
    fn ownership(
        &self,
        key: &ObjectKey,
    ) -> impl Future<Output = Result<Ownership, ApiError>> + Send;
    /// Server-side apply; `force` only for objects envlane-sync owns.
    fn apply(
        &self,
        obj: &DesiredObject,
        force: bool,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Deletes; an object already gone is success.
    fn delete(&self, key: &ObjectKey) -> impl Future<Output = Result<(), ApiError>> + Send;
    /// Records a Kubernetes Event (best effort: the caller only logs a failure).
    fn event(&self, warning: &Warning) -> impl Future<Output = Result<(), ApiError>> + Send;
}

#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub debounce: Duration,
    /// Re-read owned objects this often (`None`: never).
    pub resync: Option<Duration>,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// `/readyz` fails while a watch has been failing for longer than this.
    pub watch_stale_after: Duration,
    /// Objects larger than this are refused before writing.
    pub max_object_bytes: usize,
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_secs(1),
            resync: Some(Duration::from_secs(300)),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            watch_stale_after: Duration::from_secs(60),
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
        }
    }
}

/// A namespace whose writes failed: nothing in it is written until `until`.
#[derive(Debug, Clone, Copy)]
struct NamespaceBackoff {
    until: Instant,
    delay: Duration,
}

/// State kept between passes.
#[derive(Debug, Default)]
struct WriteState {
    /// Owned objects and their content hash; `None` = re-list before writing.
    owned: Option<HashMap<ObjectKey, Option<String>>>,
    /// Objects found to belong to someone else (not retried until a re-list).
    conflicts: HashSet<ObjectKey>,
    /// Objects that cannot be written in the current pass: their write
    /// failed, they are too large, or their namespace is backing off.
    unwritable: HashSet<ObjectKey>,
    backoff: HashMap<String, NamespaceBackoff>,
    warnings_seen: HashSet<Warning>,
}

enum PassError {
    /// Retry with backoff.
    Retry(String),
    /// Wait for the next change.
    Wait(String),
}

/// Runs forever: waits for the first complete view, then renders and writes
/// after each (debounced) change, retrying failed passes with backoff.
pub async fn run<C: Cluster>(
    shared: Arc<Shared>,
    cluster: &C,
    opts: RenderOptions,
    cfg: LoopConfig,
    metrics: Arc<Metrics>,
) {
    while !shared.all_synced() {
        shared.changed.notified().await;
    }
    tracing::info!("initial list of namespaces, pods and services complete");
    let mut state = WriteState::default();
    let mut backoff = cfg.backoff_initial;
    loop {
        let rendered_generation = shared.generation();
        match pass(&shared, cluster, &opts, &cfg, &metrics, &mut state).await {
            Ok(()) => {
                backoff = cfg.backoff_initial;
                metrics.synced();
            }
            Err(PassError::Retry(e)) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "sync failed; retrying");
                state.owned = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cfg.backoff_max);
                continue;
            }
            Err(PassError::Wait(e)) => {
                tracing::error!(error = %e, "nothing published; waiting for the next change");
            }
        }
        // Wait for a change not yet rendered, the end of a namespace's
        // backoff, or the resync timer.
        let resync_at = cfg.resync.map(|d| Instant::now() + d);
        let retry_at = state.backoff.values().map(|b| b.until).min();
        loop {
            let timer = async {
                match resync_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shared.changed.notified() => {
                    if shared.generation() != rendered_generation {
                        break;
                    }
                }
                () = retry => {
                    tracing::debug!("retrying namespaces whose writes failed");
                    break;
                }
                () = timer => {
                    tracing::debug!("periodic resync");
                    state.owned = None;
                    state.conflicts.clear();
                    break;
                }
            }
        }
        tokio::time::sleep(cfg.debounce).await;
    }
}

/// Logs, counts and records (as an Event) a warning the first time it is seen.
async fn warn<C: Cluster>(cluster: &C, metrics: &Metrics, seen: &mut HashSet<Warning>, w: Warning) {
    if seen.contains(&w) {
        return;
    }
    tracing::warn!(reason = w.reason.as_str(), object = %format_args!("{}/{}/{}", w.regarding.kind, w.regarding.namespace, w.regarding.name), "{}", w.message);
    metrics.warned(w.reason);
    if let Err(e) = cluster.event(&w).await {
        metrics.error(e.kind);
        tracing::debug!(error = %e, "could not record the event");
    }
    seen.insert(w);
}

async fn pass<C: Cluster>(
    shared: &Shared,
    cluster: &C,
    opts: &RenderOptions,
    cfg: &LoopConfig,
    metrics: &Metrics,
    state: &mut WriteState,
) -> Result<(), PassError> {
    metrics.reconciles.fetch_add(1, Relaxed);
    // A pass stuck (an API call hanging) makes /readyz fail past the bound.
    let _running = metrics.pass_started();
    // Objects that are someone else's, too large, refused by the API server
    // in this pass, or in a namespace backing off, are left out of the
    // render (their Services leave the table), so a pass that finds a new
    // one renders again before any table is written. Each round adds at
    // least one, so this ends. A failing namespace never stops the others.
    let mut opts = opts.clone();
    let now = Instant::now();
    let paused: HashSet<String> = state
        .backoff
        .iter()
        .filter(|(_, b)| b.until > now)
        .map(|(ns, _)| ns.clone())
        .collect();
    metrics.set_namespaces_backing_off(paused.len());
    state.unwritable.clear();
    let mut failed_namespaces: HashSet<String> = HashSet::new();
    'render: loop {
        opts.blocked = state
            .conflicts
            .iter()
            .chain(state.unwritable.iter())
            .cloned()
            .collect();
        let rendered = match shared.render(&opts) {
            Ok(r) => r,
            Err(e) => {
                metrics.error(ErrorKind::InvalidTable);
                return Err(PassError::Wait(e.to_string()));
            }
        };
        for bad in &rendered.invalid_labels {
            let w = Warning::new(
                Regarding::pod(&bad.namespace, &bad.pod),
                Reason::InvalidEnvLabel,
                format!(
                    "pod {}/{}: env label value `{}` is not a valid env ({}); pod skipped",
                    bad.namespace, bad.pod, bad.value, bad.reason
                ),
            );
            if !state.warnings_seen.contains(&w) {
                metrics.invalid_env_labels.fetch_add(1, Relaxed);
            }
            warn(cluster, metrics, &mut state.warnings_seen, w).await;
        }
        metrics
            .subset_collisions
            .store(rendered.subset_collisions.len() as u64, Relaxed);
        metrics
            .pods_not_ready
            .store(rendered.not_ready.len() as u64, Relaxed);
        metrics
            .services_spreading
            .store(rendered.spreading.len() as u64, Relaxed);
        // Loud at every pass (each Service also gets one Event): this is how
        // feature pods end up serving everyone's traffic.
        if !rendered.spreading.is_empty() {
            tracing::warn!(
                services = rendered.spreading.len(),
                default_env = opts.settings.default_env.as_deref().unwrap_or("(none)"),
                first = %rendered.spreading.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                "requests without an env spread over every env's pods of these services: deploy the default env there, or set defaultEnv"
            );
        }
        for pod in &rendered.not_ready {
            tracing::debug!(pod = %pod, "pod not Ready: its env is not counted");
        }
        for w in &rendered.warnings {
            if !state.warnings_seen.contains(w) && w.reason != Reason::NoDefaultEnv {
                metrics.skipped_pairs.fetch_add(1, Relaxed);
            }
            warn(cluster, metrics, &mut state.warnings_seen, w.clone()).await;
        }

        if state.owned.is_none() {
            let mut owned = HashMap::new();
            for kind in Kind::ALL {
                let listed = cluster.list_owned(kind).await.map_err(|e| {
                    metrics.error(e.kind);
                    PassError::Retry(format!("listing owned {}: {e}", kind.plural()))
                })?;
                owned.extend(listed);
            }
            state.owned = Some(owned);
        }
        let empty = HashMap::new();
        let owned_now = state.owned.as_ref().unwrap_or(&empty);
        // Held out by a failure (not by a foreign object, which is for good):
        // their other objects stay as they are.
        let held: HashSet<(String, String)> = state
            .unwritable
            .iter()
            .filter_map(ObjectKey::service)
            .map(|(ns, svc)| (ns.to_string(), svc.to_string()))
            .collect();
        let planned = plan(
            &rendered.objects,
            Observed {
                owned: owned_now,
                foreign: &state.conflicts,
                paused: &paused,
                held: &held,
            },
            cfg.max_object_bytes,
        );

        // What cannot be written this pass: its Service leaves the table.
        let mut newly_blocked = false;
        for obj in &planned.too_large {
            let w = Warning::new(
                Regarding::namespace(obj.key.tenant()),
                Reason::ObjectTooLarge,
                format!(
                    "{} would be {} bytes, over the {}-byte limit: not written{}",
                    obj.key,
                    obj.size_bytes(),
                    cfg.max_object_bytes,
                    if obj.key.kind == Kind::WasmPlugin {
                        "; this namespace keeps its previous table"
                    } else {
                        "; its Service is left out of the table"
                    }
                ),
            );
            warn(cluster, metrics, &mut state.warnings_seen, w).await;
            if obj.key.kind != Kind::WasmPlugin {
                newly_blocked |= state.unwritable.insert(obj.key.clone());
            }
        }
        for key in &planned.deferred {
            if key.kind != Kind::WasmPlugin {
                newly_blocked |= state.unwritable.insert(key.clone());
            }
        }
        if newly_blocked {
            continue 'render;
        }
        let unchanged = planned.unchanged;

        let known_blocked = state.conflicts.len() + state.unwritable.len();
        let mut done = 0u64;
        for write in planned.writes {
            let key = write.key().clone();
            if key.kind == Kind::WasmPlugin
                && state.conflicts.len() + state.unwritable.len() > known_blocked
            {
                continue 'render;
            }
            let result = match write {
                Write::Delete(_) => cluster.delete(&key).await.map(|()| "deleted"),
                Write::Update(obj) => cluster.apply(obj, true).await.map(|()| "applied"),
                Write::Create(obj) => match cluster.ownership(&key).await {
                    Ok(Ownership::Foreign) => {
                        metrics.error(ErrorKind::Conflict);
                        state.conflicts.insert(key.clone());
                        let w = foreign(&key);
                        warn(cluster, metrics, &mut state.warnings_seen, w).await;
                        continue;
                    }
                    Ok(Ownership::Ours) => cluster.apply(obj, true).await.map(|()| "applied"),
                    Ok(Ownership::Absent) => cluster.apply(obj, false).await.map(|()| "applied"),
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(what) => {
                    if let Write::Update(o) | Write::Create(o) = &write {
                        if o.key.kind == Kind::WasmPlugin {
                            // Where kubectl users look: the table this
                            // namespace now routes by (best effort).
                            let stats = rendered.stats;
                            let note = Warning::new(
                                Regarding::object(&o.key),
                                Reason::TableWritten,
                                format!(
                                    "table {} written: {} (service, env) pairs, {} services, {} envs",
                                    rendered.table.revision.as_deref().unwrap_or("-"),
                                    stats.pairs,
                                    stats.services,
                                    stats.envs
                                ),
                            );
                            if let Err(e) = cluster.event(&note).await {
                                tracing::debug!(error = %e, "could not record the event");
                            }
                        }
                    }
                    let hash = match &write {
                        Write::Update(o) | Write::Create(o) => Some(o.hash.clone()),
                        Write::Delete(_) => None,
                    };
                    tracing::info!(object = %key, hash = hash.as_deref().unwrap_or_default(), "{what}");
                    if let Some(owned) = state.owned.as_mut() {
                        match hash {
                            Some(h) => owned.insert(key, Some(h)),
                            None => owned.remove(&key),
                        };
                    }
                    if what == "deleted" {
                        metrics.deletes.fetch_add(1, Relaxed);
                    } else {
                        metrics.applies.fetch_add(1, Relaxed);
                    }
                    metrics.wrote();
                    done += 1;
                }
                Err(e) if e.kind == ErrorKind::Conflict && !matches!(write, Write::Delete(_)) => {
                    metrics.error(e.kind);
                    state.conflicts.insert(key.clone());
                    let w = foreign(&key);
                    warn(cluster, metrics, &mut state.warnings_seen, w).await;
                }
                Err(e) => {
                    metrics.error(e.kind);
                    metrics.namespace_write_failed(key.tenant());
                    tracing::warn!(object = %key, error = %e, "write failed; the other namespaces go on");
                    if key.kind != Kind::WasmPlugin && !matches!(write, Write::Delete(_)) {
                        state.unwritable.insert(key.clone());
                    }
                    if failed_namespaces.insert(key.tenant().to_string()) {
                        let w = Warning::new(
                            Regarding::namespace(key.tenant()),
                            Reason::WriteFailed,
                            format!(
                                "writing {key} failed: {e}; retrying this namespace with backoff"
                            ),
                        );
                        // A new Event per failure episode, not per retry.
                        state.warnings_seen.remove(&w);
                        warn(cluster, metrics, &mut state.warnings_seen, w).await;
                    }
                }
            }
        }

        // Backoff per namespace: doubled while it keeps failing, forgotten
        // once a pass writes it without error.
        let now = Instant::now();
        for ns in &failed_namespaces {
            let delay = state
                .backoff
                .get(ns)
                .map_or(cfg.backoff_initial, |b| (b.delay * 2).min(cfg.backoff_max));
            state.backoff.insert(
                ns.clone(),
                NamespaceBackoff {
                    until: now + delay,
                    delay,
                },
            );
        }
        state
            .backoff
            .retain(|ns, _| failed_namespaces.contains(ns) || paused.contains(ns));
        metrics.set_namespaces_backing_off(state.backoff.len());

        let stats = rendered.stats;
        metrics.table_envs.store(stats.envs as u64, Relaxed);
        metrics.table_services.store(stats.services as u64, Relaxed);
        metrics.table_pairs.store(stats.pairs as u64, Relaxed);
        tracing::debug!(
            revision = rendered.table.revision.as_deref().unwrap_or_default(),
            envs = stats.envs,
            services = stats.services,
            pairs = stats.pairs,
            writes = done,
            unchanged,
            failed_namespaces = failed_namespaces.len(),
            "sync pass done"
        );
        return Ok(());
    }
}

fn foreign(key: &ObjectKey) -> Warning {
    Warning::new(
        Regarding::object(key),
        Reason::ForeignObject,
        format!("{key} exists and is not managed by envlane-sync: left alone; what needs it is left out of the table"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Namespace {
        Namespace {
            name: name.into(),
            labels: Default::default(),
            terminating: false,
        }
    }

    #[test]
    fn relist_keeps_the_old_view_until_done() {
        let mut s: Store<Namespace> = Store::default();
        assert!(!s.apply(StoreEvent::Init));
        assert!(!s.apply(StoreEvent::InitApply("a".into(), ns("a"))));
        assert_eq!(s.len(), 0, "nothing visible before the list completes");
        assert!(
            s.apply(StoreEvent::InitDone),
            "first list completes: a change"
        );
        assert!(s.synced());
        assert!(
            !s.apply(StoreEvent::Apply("a".into(), ns("a"))),
            "same content"
        );
        assert!(s.apply(StoreEvent::Apply("b".into(), ns("b"))));
        // Relist that drops b.
        s.apply(StoreEvent::Init);
        s.apply(StoreEvent::InitApply("a".into(), ns("a")));
        assert_eq!(s.len(), 2, "old view while relisting");
        assert!(s.apply(StoreEvent::InitDone));
        assert_eq!(s.len(), 1);
        // Relist with the same content: no change.
        s.apply(StoreEvent::Init);
        s.apply(StoreEvent::InitApply("a".into(), ns("a")));
        assert!(!s.apply(StoreEvent::InitDone));
        assert!(s.apply(StoreEvent::Delete("a".into())));
        assert!(!s.apply(StoreEvent::Delete("a".into())));
        assert!(s.is_empty());
    }
}
