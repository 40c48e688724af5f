//! The one module that talks to the API server: the Namespace, Pod and
//! Service watchers that feed the stores, and the server-side apply / delete
//! of the objects envlane-sync owns.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1 as corev1;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, ResourceExt};
use tokio::task::JoinSet;

use crate::controller::{self, ApiError, Cluster, LoopConfig, Ownership, Shared, StoreEvent};
use crate::metrics::{ErrorKind, Metrics};
use crate::model::{self, HASH_ANNOTATION, MANAGED_BY_KEY, MANAGED_BY_VALUE};
use crate::render::{DesiredObject, Kind, ObjectKey, RenderOptions};

pub const FIELD_MANAGER: &str = "envlane-sync";

/// Watches and writes until dropped (the watcher tasks stop with it).
pub async fn run(client: Client, opts: RenderOptions, cfg: LoopConfig, metrics: Arc<Metrics>) {
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
    let cluster = KubeCluster { client };
    controller::run(shared, cluster, opts, cfg, metrics).await;
    tasks.shutdown().await;
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
