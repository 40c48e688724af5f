//! The one module that talks to the API server: the Namespace, Pod and
//! Service watchers that feed the stores, and the server-side apply / delete
//! of the objects envlane-sync owns.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1 as coordv1;
use k8s_openapi::api::core::v1 as corev1;
use k8s_openapi::api::events::v1 as eventsv1;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use tokio::task::JoinSet;

use crate::controller::{self, ApiError, Cluster, LoopConfig, Ownership, Shared, StoreEvent};
use crate::leader::{lost, ElectionConfig, LeaseRecord, Observation, Step};
use crate::metrics::{ErrorKind, Metrics};
use crate::model::{self, HASH_ANNOTATION, MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::render::{DesiredObject, Kind, ObjectKey, RenderOptions};
use crate::warning::Warning;

pub const FIELD_MANAGER: &str = "envlane-sync";
/// `reportingController` of envlane-sync's Events.
pub const REPORTING_CONTROLLER: &str = "envlane.io/envlane-sync";

/// Where the leader Lease lives; `None` in [`run`]: write without election.
#[derive(Debug, Clone)]
pub struct Election {
    pub namespace: String,
    pub name: String,
    pub config: ElectionConfig,
}

/// Watches and writes until dropped (the watcher tasks stop with it). With
/// an election, only while holding the Lease: a standby keeps its view
/// current and takes over when the leader stops renewing.
pub async fn run(
    client: Client,
    opts: RenderOptions,
    cfg: LoopConfig,
    election: Option<Election>,
    metrics: Arc<Metrics>,
) {
    let shared = Arc::new(Shared::default());
    let mut tasks = JoinSet::new();
    let backoff = || RetryBackoff::new(cfg.backoff_initial, cfg.backoff_max);
    // A failing watch retries at least every backoff_max: a longer quiet
    // spell means it recovered (a healthy watch may send nothing for hours).
    metrics.set_watch_staleness(cfg.watch_stale_after, cfg.backoff_max * 2);

    // Only pods that carry the env label matter.
    let pods = watcher::Config::default().labels(&opts.settings.env_label);
    tasks.spawn(watch::<corev1::Namespace, model::Namespace>(
        Api::all(client.clone()),
        watcher::Config::default(),
        backoff(),
        shared.clone(),
        metrics.clone(),
        Shared::namespaces,
    ));
    tasks.spawn(watch::<corev1::Pod, model::Pod>(
        Api::all(client.clone()),
        pods,
        backoff(),
        shared.clone(),
        metrics.clone(),
        Shared::pods,
    ));
    tasks.spawn(watch::<corev1::Service, model::Service>(
        Api::all(client.clone()),
        watcher::Config::default(),
        backoff(),
        shared.clone(),
        metrics.clone(),
        Shared::services,
    ));
    // Which routes of a Service envlane may re-target depends on the
    // VirtualServices for its host, in any namespace.
    tasks.spawn(watch::<DynamicObject, model::VirtualService>(
        Api::all_with(client.clone(), &virtual_service_resource()),
        watcher::Config::default(),
        backoff(),
        shared.clone(),
        metrics.clone(),
        Shared::virtual_services,
    ));
    let cluster = KubeCluster {
        client: client.clone(),
        instance: instance_name(),
    };
    match election {
        None => {
            metrics.set_leader(true);
            controller::run(shared, &cluster, opts, cfg, metrics).await;
        }
        Some(election) => {
            let (leading, mut rx) = tokio::sync::watch::channel(false);
            tasks.spawn(elect(
                client,
                shared.clone(),
                election,
                cluster.instance.clone(),
                leading,
                metrics.clone(),
            ));
            loop {
                if rx.wait_for(|l| *l).await.is_err() {
                    break;
                }
                metrics.set_leader(true);
                tracing::info!(instance = %cluster.instance, "holding the leader lease: writing");
                tokio::select! {
                    () = controller::run(shared.clone(), &cluster, opts.clone(), cfg.clone(), metrics.clone()) => {}
                    _ = rx.wait_for(|l| !*l) => {
                        tracing::warn!("lost the leader lease: stopped writing");
                    }
                }
                metrics.set_leader(false);
            }
        }
    }
    tasks.shutdown().await;
}

/// The `spec.pluginConfig` of a WasmPlugin, read with the default client
/// configuration (for `envlane-sync table` and `explain`).
pub async fn plugin_config(namespace: &str, name: &str) -> Result<serde_json::Value, String> {
    let client = Client::try_default()
        .await
        .map_err(|e| format!("kubernetes client: {e}"))?;
    let api: Api<DynamicObject> =
        Api::namespaced_with(client, namespace, &api_resource(Kind::WasmPlugin));
    let wp = api
        .get(name)
        .await
        .map_err(|e| format!("WasmPlugin {namespace}/{name}: {e}"))?;
    wp.data
        .pointer("/spec/pluginConfig")
        .cloned()
        .ok_or_else(|| format!("WasmPlugin {namespace}/{name} has no spec.pluginConfig"))
}

/// The Lease as the election sees it.
fn lease_record(lease: &coordv1::Lease) -> LeaseRecord {
    let spec = lease.spec.as_ref();
    LeaseRecord {
        holder: spec.and_then(|s| s.holder_identity.clone()),
        renew_time: spec
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0.to_string()),
        lease_duration_seconds: spec.and_then(|s| s.lease_duration_seconds),
        transitions: spec.and_then(|s| s.lease_transitions).unwrap_or_default(),
    }
}

/// Reads the Lease every retry period, renewing or taking it when
/// [`Observation::step`] says so; `leading` follows the outcome.
async fn elect(
    client: Client,
    shared: Arc<Shared>,
    election: Election,
    me: String,
    leading: tokio::sync::watch::Sender<bool>,
    metrics: Arc<Metrics>,
) {
    let api: Api<coordv1::Lease> = Api::namespaced(client, &election.namespace);
    let cfg = election.config;
    let mut observation = Observation::default();
    let mut renewed: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        let outcome = async {
            let current = api.get_opt(&election.name).await?;
            let step =
                observation.step(&me, current.as_ref().map(lease_record).as_ref(), now, &cfg);
            let micro = || MicroTime(Timestamp::now());
            let seconds = i32::try_from(cfg.lease_duration.as_secs()).unwrap_or(i32::MAX);
            match (step, current) {
                (Step::Follow { .. }, _) => Ok(false),
                (Step::Create, _) => {
                    let lease = coordv1::Lease {
                        metadata: ObjectMeta {
                            name: Some(election.name.clone()),
                            namespace: Some(election.namespace.clone()),
                            ..ObjectMeta::default()
                        },
                        spec: Some(coordv1::LeaseSpec {
                            holder_identity: Some(me.clone()),
                            lease_duration_seconds: Some(seconds),
                            acquire_time: Some(micro()),
                            renew_time: Some(micro()),
                            lease_transitions: Some(0),
                            ..coordv1::LeaseSpec::default()
                        }),
                    };
                    api.create(&PostParams::default(), &lease)
                        .await
                        .map(|_| true)
                }
                (step, Some(mut lease)) => {
                    // Replaced with the resourceVersion read: of two replicas
                    // taking over at once, the API server lets one win.
                    let spec = lease.spec.get_or_insert_with(Default::default);
                    if let Step::TakeOver { transitions } = step {
                        spec.holder_identity = Some(me.clone());
                        spec.acquire_time = Some(micro());
                        spec.lease_transitions = Some(transitions);
                    }
                    spec.lease_duration_seconds = Some(seconds);
                    spec.renew_time = Some(micro());
                    api.replace(&election.name, &PostParams::default(), &lease)
                        .await
                        .map(|_| true)
                }
                (_, None) => Ok(false),
            }
        }
        .await;
        let leader = match outcome {
            Ok(true) => {
                renewed = Some(now);
                true
            }
            Ok(false) => {
                renewed = None;
                false
            }
            Err(e) => {
                let e = api_error(e);
                metrics.error(e.kind);
                tracing::warn!(error = %e, "leader lease: read or write failed");
                renewed.is_some_and(|r| !lost(r, tokio::time::Instant::now(), &cfg))
            }
        };
        if !leader {
            renewed = None;
        }
        if *leading.borrow() != leader {
            tracing::info!(instance = %me, leader, "leader lease changed hands");
        }
        leading.send_replace(leader);
        // A standby with a complete view is ready: a rollout (maxSurge 1,
        // maxUnavailable 0) waits for the new pod to be ready before it
        // stops the old leader.
        metrics.set_standby_ready(shared.all_synced());
        tokio::time::sleep(cfg.retry_period).await;
    }
}

/// Gives the Lease up (on shutdown), so a standby takes over at its next
/// read instead of after a lease duration.
pub async fn release(client: Client, election: &Election) {
    let api: Api<coordv1::Lease> = Api::namespaced(client, &election.namespace);
    let me = instance_name();
    let Ok(Some(mut lease)) = api.get_opt(&election.name).await else {
        return;
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if spec.holder_identity.as_deref() != Some(me.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    match api
        .replace(&election.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => tracing::info!("leader lease released"),
        Err(e) => tracing::warn!(error = %e, "could not release the leader lease"),
    }
}

/// Feeds one kind's watch events (converted to the plain model) into the store.
async fn watch<K, T>(
    api: Api<K>,
    config: watcher::Config,
    backoff: RetryBackoff,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    sink: fn(&Shared, StoreEvent<T>),
) where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + 'static,
    T: for<'a> From<&'a K>,
{
    let kind = std::any::type_name::<K>()
        .rsplit("::")
        .next()
        .unwrap_or("object");
    let key = |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any());
    let mut stream = watcher::watcher(api, config).backoff(backoff).boxed();
    while let Some(event) = stream.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                metrics.error(ErrorKind::Watch);
                metrics.watch_failed(kind);
                tracing::warn!(kind, error = %e, "watch failed; retrying (a 410 Gone relists)");
                continue;
            }
        };
        let event = match event {
            Event::Init => {
                tracing::debug!(kind, "listing");
                StoreEvent::Init
            }
            Event::InitApply(o) => StoreEvent::InitApply(key(&o), T::from(&o)),
            Event::InitDone => {
                tracing::debug!(kind, "list complete");
                StoreEvent::InitDone
            }
            Event::Apply(o) => StoreEvent::Apply(key(&o), T::from(&o)),
            Event::Delete(o) => StoreEvent::Delete(key(&o)),
        };
        sink(&shared, event);
    }
}

/// Exponential backoff without jitter: `initial`, doubling, capped at `max`.
#[derive(Debug, Clone)]
pub struct RetryBackoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl RetryBackoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }
}

impl Iterator for RetryBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        Some(now)
    }
}

impl Backoff for RetryBackoff {
    fn reset(&mut self) {
        self.next = self.initial;
    }
}

fn virtual_service_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
        "virtualservices",
    )
}

fn api_resource(kind: Kind) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(kind.group(), kind.version(), kind.kind()),
        kind.plural(),
    )
}

fn api_error(e: kube::Error) -> ApiError {
    let kind = match &e {
        kube::Error::Api(s) if s.code == 409 => ErrorKind::Conflict,
        _ => ErrorKind::Api,
    };
    ApiError {
        kind,
        message: e.to_string(),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Server-side apply and delete through the kube client.
pub struct KubeCluster {
    client: Client,
    /// This replica, as Events' `reportingInstance` and the Lease holder.
    instance: String,
}

/// The pod name (`POD_NAME`, from the downward API) or the host name.
pub fn instance_name() -> String {
    std::env::var("POD_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| format!("{FIELD_MANAGER}-{}", std::process::id()))
}

/// The events.k8s.io/v1 Event for a warning, in the namespace of the object
/// it is about (a Namespace's own Events live in it, where its tenants look).
fn event(warning: &Warning, instance: &str) -> eventsv1::Event {
    let r = &warning.regarding;
    // The API server refuses a note over 1 kB.
    let mut note = warning.message.clone();
    if note.len() > 1000 {
        let mut cut = 997;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    eventsv1::Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{FIELD_MANAGER}-")),
            namespace: Some(r.namespace.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        action: Some(
            match warning.reason {
                crate::warning::Reason::TableWritten => "Write",
                _ => "Render",
            }
            .into(),
        ),
        reason: Some(warning.reason.as_str().into()),
        note: Some(note),
        type_: Some(warning.reason.event_type().into()),
        reporting_controller: Some(REPORTING_CONTROLLER.into()),
        reporting_instance: Some(instance.into()),
        regarding: Some(corev1::ObjectReference {
            api_version: Some(r.api_version.clone()),
            kind: Some(r.kind.into()),
            namespace: Some(r.namespace.clone()),
            name: Some(r.name.clone()),
            ..corev1::ObjectReference::default()
        }),
        ..eventsv1::Event::default()
    }
}

impl KubeCluster {
    fn api(&self, key: &ObjectKey) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &key.namespace, &api_resource(key.kind))
    }
}

impl Cluster for KubeCluster {
    async fn list_owned(&self, kind: Kind) -> Result<Vec<(ObjectKey, Option<String>)>, ApiError> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &api_resource(kind));
        let params = ListParams::default().labels(&format!("{MANAGED_BY_KEY}={MANAGED_BY_VALUE}"));
        let list = api.list(&params).await.map_err(api_error)?;
        Ok(list
            .items
            .into_iter()
            .filter(|o| {
                o.labels().get(MANAGED_BY_KEY).map(String::as_str) == Some(MANAGED_BY_VALUE)
            })
            .map(|o| {
                let key = ObjectKey {
                    kind,
                    namespace: o.namespace().unwrap_or_default(),
                    name: o.name_any(),
                };
                (key, o.annotations().get(HASH_ANNOTATION).cloned())
            })
            .collect())
    }

    async fn ownership(&self, key: &ObjectKey) -> Result<Ownership, ApiError> {
        match self.api(key).get_opt(&key.name).await.map_err(api_error)? {
            None => Ok(Ownership::Absent),
            Some(o)
                if o.labels().get(MANAGED_BY_KEY).map(String::as_str) == Some(MANAGED_BY_VALUE) =>
            {
                Ok(Ownership::Ours)
            }
            Some(_) => Ok(Ownership::Foreign),
        }
    }

    async fn apply(&self, obj: &DesiredObject, force: bool) -> Result<(), ApiError> {
        let mut params = PatchParams::apply(FIELD_MANAGER);
        if force {
            params = params.force();
        }
        self.api(&obj.key)
            .patch(&obj.key.name, &params, &Patch::Apply(obj.body()))
            .await
            .map(|_| ())
            .map_err(api_error)
    }

    async fn event(&self, warning: &Warning) -> Result<(), ApiError> {
        let api: Api<eventsv1::Event> =
            Api::namespaced(self.client.clone(), &warning.regarding.namespace);
        api.create(&PostParams::default(), &event(warning, &self.instance))
            .await
            .map(|_| ())
            .map_err(api_error)
    }

    async fn delete(&self, key: &ObjectKey) -> Result<(), ApiError> {
        match self
            .api(key)
            .delete(&key.name, &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_error(e)),
        }
    }
}
