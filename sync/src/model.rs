//! The inputs `render` works on: the few fields of Namespaces, Pods and
//! Services that matter, as plain structs. The watcher and the offline reader
//! both convert Kubernetes objects into these at the boundary, so the store
//! stays small and `render` is easy to feed in tests.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1 as corev1;

/// Label every object envlane-sync writes carries; it only ever changes or
/// deletes objects that have it.
pub const MANAGED_BY_KEY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "envlane-sync";
/// Annotation holding the hash of the object as envlane-sync rendered it, so an
/// unchanged object is not written again (also across restarts).
pub const HASH_ANNOTATION: &str = "envlane.io/content-hash";

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Condition `Ready=True` and not terminating.
    pub ready: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
    /// `targetPort` as written (a number or a port name); `None` = same as `port`.
    pub target_port: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Empty: the Service selects no pods (external endpoints); skipped.
    pub selector: Labels,
    pub ports: Vec<ServicePort>,
    /// `ExternalName` services have no pods; skipped.
    pub external_name: bool,
}

impl Service {
    /// Written by envlane-sync itself (host mode's per-env Services): never an input.
    pub fn is_managed(&self) -> bool {
        self.labels.get(MANAGED_BY_KEY).map(String::as_str) == Some(MANAGED_BY_VALUE)
    }
}

fn labels_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Labels {
    meta.labels.clone().unwrap_or_default()
}

impl From<&corev1::Namespace> for Namespace {
    fn from(ns: &corev1::Namespace) -> Self {
        Self {
            name: ns.metadata.name.clone().unwrap_or_default(),
            labels: labels_of(&ns.metadata),
        }
    }
}

impl From<&corev1::Pod> for Pod {
    fn from(pod: &corev1::Pod) -> Self {
        let condition_ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            labels: labels_of(&pod.metadata),
            ready: condition_ready && pod.metadata.deletion_timestamp.is_none(),
        }
    }
}

impl From<&corev1::Service> for Service {
    fn from(svc: &corev1::Service) -> Self {
        let spec = svc.spec.as_ref();
        let ports = spec
            .and_then(|s| s.ports.as_ref())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some(ServicePort {
                            name: p.name.clone(),
                            port: u16::try_from(p.port).ok().filter(|&n| n != 0)?,
                            protocol: p.protocol.clone(),
                            app_protocol: p.app_protocol.clone(),
                            target_port: p
                                .target_port
                                .as_ref()
                                .and_then(|t| serde_json::to_value(t).ok()),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
            labels: labels_of(&svc.metadata),
            selector: spec.and_then(|s| s.selector.clone()).unwrap_or_default(),
            ports,
            external_name: spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName"),
        }
    }
}
