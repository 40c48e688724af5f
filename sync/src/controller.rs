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
use crate::render::{
    render, DesiredObject, InvalidLabel, Kind, ObjectKey, RenderError, RenderOptions,
};

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
}

impl Default for LoopConfig {
    fn default() -> Self {
        Self {
            debounce: Duration::from_secs(1),
            resync: Some(Duration::from_secs(300)),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            watch_stale_after: Duration::from_secs(60),
        }
    }
}

/// State kept between passes.
#[derive(Debug, Default)]
struct WriteState {
    /// Owned objects and their content hash; `None` = re-list before writing.
    owned: Option<HashMap<ObjectKey, Option<String>>>,
    /// Objects found to belong to someone else (not retried until a re-list).
    conflicts: HashSet<ObjectKey>,
    /// Objects whose read or write failed in the current pass.
    failing: HashSet<ObjectKey>,
    invalid_seen: HashSet<InvalidLabel>,
    warnings_seen: HashSet<String>,
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
    cluster: C,
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
        match pass(&shared, &cluster, &opts, &metrics, &mut state).await {
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
        // Wait for a change not yet rendered, or the resync timer.
        let resync_at = cfg.resync.map(|d| Instant::now() + d);
        loop {
            let timer = async {
                match resync_at {
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

async fn pass<C: Cluster>(
    shared: &Shared,
    cluster: &C,
    opts: &RenderOptions,
    metrics: &Metrics,
    state: &mut WriteState,
) -> Result<(), PassError> {
    metrics.reconciles.fetch_add(1, Relaxed);
    // Objects that are someone else's, or whose write the API server refused
    // in this pass, are left out of the render (their Services leave the
    // table), so a pass that finds a new one renders again before any table
    // is written. Each round adds at least one, so this ends. One failing
    // object never stops the others: the pass goes on and is retried.
    let mut opts = opts.clone();
    state.failing.clear();
    let mut failures: Vec<String> = Vec::new();
    'render: loop {
        opts.blocked = state
            .conflicts
            .iter()
            .chain(state.failing.iter())
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
            if state.invalid_seen.insert(bad.clone()) {
                metrics.invalid_env_labels.fetch_add(1, Relaxed);
                tracing::warn!(
                    namespace = %bad.namespace, pod = %bad.pod, value = %bad.value, reason = %bad.reason,
                    "pod env label is not a valid env; pod skipped"
                );
            }
        }
        metrics
            .subset_collisions
            .store(rendered.subset_collisions.len() as u64, Relaxed);
        for w in &rendered.warnings {
            if state.warnings_seen.insert(w.clone()) {
                metrics.skipped_pairs.fetch_add(1, Relaxed);
                tracing::warn!("{w}");
            }
        }

        let owned = match &mut state.owned {
            Some(owned) => owned,
            none => {
                let mut owned = HashMap::new();
                for kind in Kind::ALL {
                    let listed = cluster.list_owned(kind).await.map_err(|e| {
                        metrics.error(e.kind);
                        PassError::Retry(format!("listing owned {}: {e}", kind.plural()))
                    })?;
                    owned.extend(listed);
                }
                none.insert(owned)
            }
        };

        // Subsets (DestinationRules, per-env Services) before the tables that
        // name them; deletions last.
        let (plugins, others): (Vec<&DesiredObject>, Vec<&DesiredObject>) = rendered
            .objects
            .iter()
            .partition(|o| o.key.kind == Kind::WasmPlugin);
        let mut writes = 0u64;
        let known_blocked = state.conflicts.len() + state.failing.len();
        for obj in others.into_iter().chain(plugins) {
            if obj.key.kind == Kind::WasmPlugin
                && state.conflicts.len() + state.failing.len() > known_blocked
            {
                continue 'render;
            }
            let force = match owned.get(&obj.key) {
                Some(Some(hash)) if *hash == obj.hash => continue,
                Some(_) => true,
                None if state.conflicts.contains(&obj.key) => continue,
                None => match cluster.ownership(&obj.key).await {
                    Ok(Ownership::Absent) => false,
                    Ok(Ownership::Ours) => true,
                    Ok(Ownership::Foreign) => {
                        metrics.error(ErrorKind::Conflict);
                        tracing::error!(object = %obj.key, "exists and is not managed by envlane-sync; left alone");
                        state.conflicts.insert(obj.key.clone());
                        continue;
                    }
                    Err(e) => {
                        metrics.error(e.kind);
                        failed(
                            &mut state.failing,
                            &mut failures,
                            &obj.key,
                            format!("reading {}: {e}", obj.key),
                        );
                        continue;
                    }
                },
            };
            if let Err(e) = cluster.apply(obj, force).await {
                metrics.error(e.kind);
                if e.kind == ErrorKind::Conflict {
                    tracing::error!(object = %obj.key, error = %e, "apply conflict; left alone");
                    state.conflicts.insert(obj.key.clone());
                    continue;
                }
                failed(
                    &mut state.failing,
                    &mut failures,
                    &obj.key,
                    format!("applying {}: {e}", obj.key),
                );
                continue;
            }
            tracing::info!(object = %obj.key, hash = %obj.hash, "applied");
            owned.insert(obj.key.clone(), Some(obj.hash.clone()));
            metrics.applies.fetch_add(1, Relaxed);
            metrics.wrote();
            writes += 1;
        }

        let wanted: HashSet<&ObjectKey> = rendered.objects.iter().map(|o| &o.key).collect();
        let mut stale: Vec<ObjectKey> = owned
            .keys()
            .filter(|k| !wanted.contains(k))
            .cloned()
            .collect();
        stale.sort();
        for key in stale {
            if let Err(e) = cluster.delete(&key).await {
                metrics.error(e.kind);
                let why = format!("deleting {key}: {e}");
                tracing::warn!("{why}; the rest of the pass goes on");
                failures.push(why);
                continue;
            }
            tracing::info!(object = %key, "deleted");
            owned.remove(&key);
            metrics.deletes.fetch_add(1, Relaxed);
            metrics.wrote();
            writes += 1;
        }

        let stats = rendered.stats;
        metrics.table_envs.store(stats.envs as u64, Relaxed);
        metrics.table_services.store(stats.services as u64, Relaxed);
        metrics.table_pairs.store(stats.pairs as u64, Relaxed);
        tracing::debug!(
            revision = rendered.table.revision.as_deref().unwrap_or_default(),
            envs = stats.envs,
            services = stats.services,
            pairs = stats.pairs,
            writes,
            failures = failures.len(),
            "sync pass done"
        );
        if !failures.is_empty() {
            return Err(PassError::Retry(format!(
                "{} write(s) failed, first: {}",
                failures.len(),
                failures.first().map_or("", String::as_str)
            )));
        }
        return Ok(());
    }
}

/// A write that failed: logged, kept for the pass's result, and (unless it
/// is a table, which names nothing) its Service left out of this pass's
/// table by the next render round.
fn failed(
    failing: &mut HashSet<ObjectKey>,
    failures: &mut Vec<String>,
    key: &ObjectKey,
    why: String,
) {
    tracing::warn!("{why}; the rest of the pass goes on");
    if key.kind != Kind::WasmPlugin {
        failing.insert(key.clone());
    }
    failures.push(why);
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
