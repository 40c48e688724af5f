//! Counters and gauges, shown in Prometheus text format on `/metrics`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::warning::Reason;

/// What went wrong, for `envlane_sync_errors_total{kind=...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A write, delete or read of owned objects failed.
    Api,
    /// A watch or list of Namespaces, Pods or Services failed (it is retried).
    Watch,
    /// The rendered table did not pass the filter's check: nothing published.
    InvalidTable,
    /// An object envlane-sync would write exists and is not labelled as its own.
    Conflict,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Api,
        ErrorKind::Watch,
        ErrorKind::InvalidTable,
        ErrorKind::Conflict,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Api => "api",
            ErrorKind::Watch => "watch",
            ErrorKind::InvalidTable => "invalid_table",
            ErrorKind::Conflict => "conflict",
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub table_pairs: AtomicU64,
    pub table_services: AtomicU64,
    pub table_envs: AtomicU64,
    pub reconciles: AtomicU64,
    syncs: AtomicU64,
    pub applies: AtomicU64,
    pub deletes: AtomicU64,
    errors_api: AtomicU64,
    errors_watch: AtomicU64,
    errors_invalid_table: AtomicU64,
    errors_conflict: AtomicU64,
    pub invalid_env_labels: AtomicU64,
    pub skipped_pairs: AtomicU64,
    /// Current (not cumulative): envs of one Service sharing a subset name.
    pub subset_collisions: AtomicU64,
    /// Current: pods with an env in opted-in namespaces that are not Ready.
    pub pods_not_ready: AtomicU64,
    /// Current: Services whose requests without an env spread over envs.
    pub services_spreading: AtomicU64,
    ready: AtomicBool,
    /// A standby (not the leader) whose view of the cluster is complete.
    standby_ready: AtomicBool,
    /// This replica holds the leader Lease (or runs without election).
    leader: AtomicBool,
    /// Warnings (each distinct one once) by Event reason.
    warnings: Mutex<BTreeMap<&'static str, u64>>,
    /// Failed writes by namespace.
    namespace_write_failures: Mutex<BTreeMap<String, u64>>,
    namespaces_backing_off: AtomicU64,
    /// Per watched kind: (first error of the current run of errors, last error).
    watch_failures: Mutex<HashMap<&'static str, (Instant, Instant)>>,
    /// 0 = watch staleness not checked.
    watch_stale_after_ms: AtomicU64,
    /// Errors further apart than this belong to different runs.
    watch_gap_ms: AtomicU64,
    last_write: Mutex<Option<Instant>>,
    /// When the pass now running started (`None`: none running).
    pass_started: Mutex<Option<Instant>>,
    last_sync: Mutex<Option<Instant>>,
}

impl Metrics {
    fn errors(&self, kind: ErrorKind) -> &AtomicU64 {
        match kind {
            ErrorKind::Api => &self.errors_api,
            ErrorKind::Watch => &self.errors_watch,
            ErrorKind::InvalidTable => &self.errors_invalid_table,
            ErrorKind::Conflict => &self.errors_conflict,
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors(kind).fetch_add(1, Relaxed);
    }

    pub fn error_count(&self, kind: ErrorKind) -> u64 {
        self.errors(kind).load(Relaxed)
    }

    pub fn warned(&self, reason: Reason) {
        if let Ok(mut w) = self.warnings.lock() {
            *w.entry(reason.as_str()).or_default() += 1;
        }
    }

    pub fn namespace_write_failed(&self, namespace: &str) {
        if let Ok(mut f) = self.namespace_write_failures.lock() {
            *f.entry(namespace.to_string()).or_default() += 1;
        }
    }

    pub fn namespace_write_failures(&self, namespace: &str) -> u64 {
        self.namespace_write_failures
            .lock()
            .ok()
            .and_then(|f| f.get(namespace).copied())
            .unwrap_or_default()
    }

    pub fn set_namespaces_backing_off(&self, n: usize) {
        self.namespaces_backing_off.store(n as u64, Relaxed);
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Relaxed)
    }

    pub fn wrote(&self) {
        if let Ok(mut t) = self.last_write.lock() {
            *t = Some(Instant::now());
        }
    }

    /// A reconcile finished with every object as wanted.
    pub fn synced(&self) {
        if let Ok(mut t) = self.last_sync.lock() {
            *t = Some(Instant::now());
        }
        self.syncs.fetch_add(1, Relaxed);
        self.ready.store(true, Relaxed);
    }

    /// Passes that finished (tests wait for one instead of sleeping).
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Relaxed)
    }

    /// Ready after the first successful sync, or as a standby whose view
    /// is complete.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Relaxed) || (self.standby_ready.load(Relaxed) && !self.is_leader())
    }

    pub fn set_standby_ready(&self, ready: bool) {
        self.standby_ready.store(ready, Relaxed);
    }

    pub fn set_watch_staleness(&self, stale_after: Duration, gap: Duration) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.watch_stale_after_ms.store(ms(stale_after), Relaxed);
        self.watch_gap_ms.store(ms(gap), Relaxed);
    }

    /// A watch of `kind` failed (it is retried with backoff).
    pub fn watch_failed(&self, kind: &'static str) {
        self.watch_failed_at(kind, Instant::now());
    }

    fn watch_failed_at(&self, kind: &'static str, now: Instant) {
        let gap = Duration::from_millis(self.watch_gap_ms.load(Relaxed));
        if let Ok(mut failures) = self.watch_failures.lock() {
            let run = failures.entry(kind).or_insert((now, now));
            if now.saturating_duration_since(run.1) > gap {
                run.0 = now; // a new run of errors
            }
            run.1 = now;
        }
    }

    /// A write pass starts; [`PassGuard`] ends it when dropped.
    pub fn pass_started(&self) -> PassGuard<'_> {
        if let Ok(mut t) = self.pass_started.lock() {
            *t = Some(Instant::now());
        }
        PassGuard(self)
    }

    /// How long the running pass has been running, if it is longer than
    /// the staleness limit: the view the tables are written from is that old.
    pub fn stuck_pass(&self) -> Option<Duration> {
        self.stuck_pass_at(Instant::now())
    }

    fn stuck_pass_at(&self, now: Instant) -> Option<Duration> {
        let limit = Duration::from_millis(self.watch_stale_after_ms.load(Relaxed));
        let started = self.pass_started.lock().ok().and_then(|t| *t)?;
        let running = now.saturating_duration_since(started);
        (!limit.is_zero() && running > limit).then_some(running)
    }

    /// Kinds whose watch has kept failing for longer than the staleness
    /// limit (errors no further apart than the gap), sorted.
    pub fn stale_watches(&self) -> Vec<&'static str> {
        self.stale_watches_at(Instant::now())
    }

    fn stale_watches_at(&self, now: Instant) -> Vec<&'static str> {
        let stale_after = self.watch_stale_after_ms.load(Relaxed);
        if stale_after == 0 {
            return Vec::new();
        }
        let stale_after = Duration::from_millis(stale_after);
        let gap = Duration::from_millis(self.watch_gap_ms.load(Relaxed));
        let mut out: Vec<&'static str> = self
            .watch_failures
            .lock()
            .map(|f| {
                f.iter()
                    .filter(|(_, (first, last))| {
                        now.saturating_duration_since(*last) <= gap
                            && last.saturating_duration_since(*first) >= stale_after
                    })
                    .map(|(kind, _)| *kind)
                    .collect()
            })
            .unwrap_or_default();
        out.sort_unstable();
        out
    }

    pub fn writes(&self) -> u64 {
        self.applies.load(Relaxed) + self.deletes.load(Relaxed)
    }

    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "envlane_sync_watches_stale",
            "Watches that have kept failing for longer than --watch-stale-after (then /readyz fails).",
            self.stale_watches().len().to_string(),
        );
        gauge(
            "envlane_sync_subset_collisions",
            "Groups of envs of one Service that share a subset name, left out of that Service (current table).",
            self.subset_collisions.load(Relaxed).to_string(),
        );
        gauge(
            "envlane_sync_services_without_default_env",
            "Services in the table with no pod of the default env (or no defaultEnv set): requests without an env reach every env's pods.",
            self.services_spreading.load(Relaxed).to_string(),
        );
        gauge(
            "envlane_sync_pods_not_ready",
            "Pods with an env in opted-in namespaces that are not Ready: their envs are not in the table until they are.",
            self.pods_not_ready.load(Relaxed).to_string(),
        );
        gauge(
            "envlane_sync_table_pairs",
            "(service, env) pairs in the published table.",
            self.table_pairs.load(Relaxed).to_string(),
        );
        gauge(
            "envlane_sync_table_services",
            "Services in the published table.",
            self.table_services.load(Relaxed).to_string(),
        );
        gauge(
            "envlane_sync_table_envs",
            "Envs in the published table.",
            self.table_envs.load(Relaxed).to_string(),
        );
        gauge(
            "envlane_sync_namespaces_backing_off",
            "Namespaces whose last write failed, retried with backoff (the others go on).",
            self.namespaces_backing_off.load(Relaxed).to_string(),
        );
        gauge(
            "envlane_sync_leader",
            "1 while this replica holds the leader Lease and writes.",
            u8::from(self.is_leader()).to_string(),
        );
        gauge(
            "envlane_sync_ready",
            "1 once a sync has succeeded.",
            u8::from(self.is_ready()).to_string(),
        );
        let since = |m: &Mutex<Option<Instant>>| {
            m.lock().ok().and_then(|t| *t).map_or_else(
                || "NaN".to_string(),
                |t| format!("{:.3}", t.elapsed().as_secs_f64()),
            )
        };
        gauge(
            "envlane_sync_seconds_since_last_write",
            "Seconds since the last successful write (apply or delete); NaN before the first.",
            since(&self.last_write),
        );
        gauge(
            "envlane_sync_seconds_since_last_sync",
            "Seconds since the cluster last matched the rendered objects; NaN before the first.",
            since(&self.last_sync),
        );
        let mut counter = |name: &str, help: &str, lines: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (labels, v) in lines {
                let _ = writeln!(out, "{name}{labels} {v}");
            }
        };
        counter(
            "envlane_sync_reconciles_total",
            "Renders followed by a write pass.",
            &[(String::new(), self.reconciles.load(Relaxed))],
        );
        counter(
            "envlane_sync_writes_total",
            "Objects applied or deleted.",
            &[
                ("{op=\"apply\"}".into(), self.applies.load(Relaxed)),
                ("{op=\"delete\"}".into(), self.deletes.load(Relaxed)),
            ],
        );
        let errors: Vec<(String, u64)> = ErrorKind::ALL
            .iter()
            .map(|k| (format!("{{kind=\"{}\"}}", k.as_str()), self.error_count(*k)))
            .collect();
        counter("envlane_sync_errors_total", "Errors by kind.", &errors);
        counter(
            "envlane_sync_invalid_env_labels_total",
            "Pods seen with an env label value that is not a valid env (each pod and value once).",
            &[(String::new(), self.invalid_env_labels.load(Relaxed))],
        );
        counter(
            "envlane_sync_skipped_pairs_total",
            "(service, env) pairs left out for another reason (each once).",
            &[(String::new(), self.skipped_pairs.load(Relaxed))],
        );
        let warnings: Vec<(String, u64)> = self
            .warnings
            .lock()
            .map(|w| {
                w.iter()
                    .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n))
                    .collect()
            })
            .unwrap_or_default();
        counter(
            "envlane_sync_warnings_total",
            "Distinct warnings (each also a Kubernetes Event) by reason.",
            &warnings,
        );
        let failures: Vec<(String, u64)> = self
            .namespace_write_failures
            .lock()
            .map(|f| {
                f.iter()
                    .map(|(ns, n)| (format!("{{namespace=\"{ns}\"}}"), *n))
                    .collect()
            })
            .unwrap_or_default();
        counter(
            "envlane_sync_namespace_write_failures_total",
            "Writes the API server refused, by namespace.",
            &failures,
        );
        out
    }
}

/// Marks the end of a write pass when dropped (every way out of it).
pub struct PassGuard<'a>(&'a Metrics);

impl Drop for PassGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.pass_started.lock() {
            *t = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_is_stale_only_after_failing_for_the_whole_limit() {
        let m = Metrics::default();
        m.set_watch_staleness(Duration::from_secs(60), Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Errors every 30 s (the backoff cap).
        m.watch_failed_at("Pod", at(0));
        m.watch_failed_at("Pod", at(30));
        assert!(m.stale_watches_at(at(30)).is_empty(), "30 s of errors");
        m.watch_failed_at("Pod", at(60));
        m.watch_failed_at("Pod", at(90));
        assert_eq!(m.stale_watches_at(at(90)), vec!["Pod"], "90 s of errors");
        // Quiet for longer than the gap: it recovered.
        assert!(m.stale_watches_at(at(200)).is_empty());
        // A new error starts a new run, not stale yet.
        m.watch_failed_at("Pod", at(200));
        assert!(m.stale_watches_at(at(200)).is_empty());
        // Off when no limit is set.
        let off = Metrics::default();
        off.watch_failed_at("Pod", at(0));
        off.watch_failed_at("Pod", at(100));
        assert!(off.stale_watches_at(at(100)).is_empty());
    }

    #[test]
    fn a_pass_running_longer_than_the_limit_is_stuck() {
        let m = Metrics::default();
        m.set_watch_staleness(Duration::from_secs(60), Duration::from_secs(60));
        let now = Instant::now();
        assert_eq!(m.stuck_pass_at(now), None, "no pass running");
        let guard = m.pass_started();
        assert_eq!(m.stuck_pass_at(now + Duration::from_secs(30)), None);
        assert!(m.stuck_pass_at(now + Duration::from_secs(61)).is_some());
        drop(guard);
        assert_eq!(
            m.stuck_pass_at(now + Duration::from_secs(61)),
            None,
            "ended"
        );
    }

    #[test]
    fn prometheus_text() {
        let m = Metrics::default();
        m.error(ErrorKind::Conflict);
        m.applies.fetch_add(3, Relaxed);
        let text = m.to_prometheus();
        assert!(text.contains("envlane_sync_errors_total{kind=\"conflict\"} 1"));
        assert!(text.contains("envlane_sync_writes_total{op=\"apply\"} 3"));
        assert!(text.contains("envlane_sync_seconds_since_last_write NaN"));
        assert!(text.contains("envlane_sync_invalid_env_labels_total 0"));
        assert!(text.contains("envlane_sync_subset_collisions 0"));
        m.wrote();
        assert!(!m.to_prometheus().contains("last_write NaN"));
    }
}
