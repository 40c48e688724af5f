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
    /// Being deleted (`deletionTimestamp` set or phase `Terminating`): the
    /// API server refuses new objects in it, so it is treated as opted out.
    pub terminating: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// Condition `Ready=True` and not terminating.
    pub ready: bool,
    /// `status.podIPs` (else `status.podIP`): the addresses a shared proxy
    /// sees this pod call from.
    pub ips: Vec<String>,
    /// `hostNetwork`: the pod has its node's address, shared with every
    /// other such pod on the node, so no caller table may name it.
    pub host_network: bool,
    /// The workload name Istio reports for the pod (a Deployment's name for
    /// a ReplicaSet's pod, the controller's name otherwise, else the pod's).
    pub workload: String,
    /// `spec.serviceAccountName` (`default` when unset): the pod's SPIFFE
    /// identity, which endpoint mode's clusters check.
    pub service_account: String,
    /// The containers' named ports (name, containerPort): a Service's named
    /// `targetPort` resolves here.
    pub container_ports: Vec<(String, u16)>,
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
    /// `clusterIP: None`: Istio sends a headless Service's requests to the
    /// address the client resolved (ORIGINAL_DST clusters, subsets too), so
    /// no env choice can apply; skipped, with a warning when it has env pods.
    pub headless: bool,
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
        let phase = ns.status.as_ref().and_then(|s| s.phase.as_deref());
        Self {
            name: ns.metadata.name.clone().unwrap_or_default(),
            labels: labels_of(&ns.metadata),
            terminating: ns.metadata.deletion_timestamp.is_some() || phase == Some("Terminating"),
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
        let status = pod.status.as_ref();
        let mut ips: Vec<String> = status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|ip| ip.ip.clone()).collect())
            .unwrap_or_default();
        if ips.is_empty() {
            ips.extend(status.and_then(|s| s.pod_ip.clone()));
        }
        ips.retain(|ip| !ip.is_empty());
        let labels = labels_of(&pod.metadata);
        let name = pod.metadata.name.clone().unwrap_or_default();
        let controller = pod
            .metadata
            .owner_references
            .as_ref()
            .and_then(|refs| refs.iter().find(|r| r.controller == Some(true)));
        Self {
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            workload: workload_name(
                &name,
                &labels,
                controller.map(|r| (r.kind.as_str(), r.name.as_str())),
            ),
            name,
            labels,
            ready: condition_ready && pod.metadata.deletion_timestamp.is_none(),
            ips,
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
            service_account: pod
                .spec
                .as_ref()
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            container_ports: pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter())
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    let name = p.name.clone()?;
                    let port = u16::try_from(p.container_port).ok().filter(|&n| n > 0)?;
                    Some((name, port))
                })
                .collect(),
        }
    }
}

/// The workload name Istio gives a pod: a ReplicaSet's pod belongs to the
/// Deployment (the ReplicaSet's name without its `-<pod-template-hash>`), a
/// pod of another controller to that controller, a bare pod to itself.
pub fn workload_name(pod: &str, labels: &Labels, controller: Option<(&str, &str)>) -> String {
    match controller {
        Some(("ReplicaSet", rs)) => labels
            .get("pod-template-hash")
            .and_then(|hash| rs.strip_suffix(hash.as_str()))
            .and_then(|rest| rest.strip_suffix('-'))
            .unwrap_or(rs)
            .to_string(),
        Some((_, owner)) => owner.to_string(),
        None => pod.to_string(),
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
            headless: spec.and_then(|s| s.cluster_ip.as_deref()) == Some("None"),
        }
    }
}

/// The parts of an Istio VirtualService that decide whether envlane can
/// re-target its routes without changing how they behave.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    /// As written: short names resolve against `namespace`.
    pub hosts: Vec<String>,
    /// Applies to sidecars: `gateways` is empty or lists `mesh`.
    pub for_mesh: bool,
    /// Bound to a gateway: `gateways` lists one other than `mesh`.
    pub for_gateway: bool,
    pub http: Vec<HttpRoute>,
}

/// One `http` rule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpRoute {
    /// The Envoy route istiod builds from this rule carries this name.
    pub name: Option<String>,
    /// Ports the rule's `match` conditions restrict it to (empty: any).
    pub match_ports: Vec<u16>,
    /// The one destination of a rule that forwards everything to one
    /// host without a subset; `None` for any other shape (several weighted
    /// destinations, a subset, a redirect, a direct response, a delegate).
    pub plain_destination: Option<Destination>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Destination {
    pub host: String,
    pub port: Option<u16>,
}

impl VirtualService {
    /// From a VirtualService's metadata and `spec` (any API version).
    pub fn from_spec(namespace: &str, name: &str, spec: &serde_json::Value) -> Self {
        use serde_json::Value;
        let strings = |v: Option<&Value>| -> Vec<String> {
            v.and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let gateways = strings(spec.get("gateways"));
        let port = |v: Option<&Value>| {
            v.and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
        };
        let http = spec
            .get("http")
            .and_then(Value::as_array)
            .map(|rules| {
                rules
                    .iter()
                    .map(|rule| {
                        let match_ports = rule
                            .get("match")
                            .and_then(Value::as_array)
                            .map(|ms| ms.iter().filter_map(|m| port(m.get("port"))).collect())
                            .unwrap_or_default();
                        let routes = rule.get("route").and_then(Value::as_array);
                        let other = rule.get("redirect").is_some()
                            || rule.get("directResponse").is_some()
                            || rule.get("delegate").is_some();
                        let plain_destination = match routes.map(Vec::as_slice) {
                            Some([only]) if !other => {
                                let d = only.get("destination");
                                let weight_ok = only
                                    .get("weight")
                                    .and_then(Value::as_i64)
                                    .is_none_or(|w| w == 100 || w == 0);
                                let host = d.and_then(|d| d.get("host")).and_then(Value::as_str);
                                let subset =
                                    d.and_then(|d| d.get("subset")).and_then(Value::as_str);
                                match (host, subset) {
                                    (Some(host), None | Some("")) if weight_ok => {
                                        Some(Destination {
                                            host: host.to_string(),
                                            port: port(
                                                d.and_then(|d| d.get("port"))
                                                    .and_then(|p| p.get("number")),
                                            ),
                                        })
                                    }
                                    _ => None,
                                }
                            }
                            _ => None,
                        };
                        HttpRoute {
                            name: rule
                                .get("name")
                                .and_then(Value::as_str)
                                .filter(|n| !n.is_empty())
                                .map(str::to_string),
                            match_ports,
                            plain_destination,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            hosts: strings(spec.get("hosts")),
            for_mesh: gateways.is_empty() || gateways.iter().any(|g| g == "mesh"),
            for_gateway: gateways.iter().any(|g| g != "mesh"),
            http,
        }
    }
}

impl From<&kube::api::DynamicObject> for VirtualService {
    fn from(o: &kube::api::DynamicObject) -> Self {
        let spec = o.data.get("spec").cloned().unwrap_or_default();
        Self::from_spec(
            o.metadata.namespace.as_deref().unwrap_or_default(),
            o.metadata.name.as_deref().unwrap_or_default(),
            &spec,
        )
    }
}
