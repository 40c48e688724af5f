//! A synthetic cluster of any size, for the render benchmark and for
//! `examples/gen_cluster.rs` (which writes it as `kubectl get -o json` output
//! so `envlane-sync render --stats` can be timed on it).

use serde_json::{json, Value};

use crate::input::Snapshot;
use crate::model::{Labels, Namespace, Pod, Service, ServicePort};

/// Envs used, most pods in `dev`; a hierarchy three levels deep.
const ENVS: [&str; 8] = [
    "dev",
    "dev.proj1",
    "dev.proj2",
    "dev.proj1.feature1",
    "dev.proj1.feature2",
    "dev.proj2.user1",
    "dev.proj3",
    "dev.proj3.user2",
];

/// `pods` pods spread over `services` Services in `namespaces` opted-in
/// namespaces: each Service gets `dev` plus some other envs, two ports, and
/// one in ten pods is not Ready.
pub fn cluster(pods: usize, services: usize, namespaces: usize) -> Snapshot {
    let namespaces = namespaces.max(1);
    let services = services.max(1);
    let mut snap = Snapshot::default();
    for n in 0..namespaces {
        snap.namespaces.push(Namespace {
            name: format!("ns{n}"),
            labels: [("envlane.io/enabled".to_string(), "true".to_string())].into(),
            terminating: false,
        });
    }
    for s in 0..services {
        let ns = format!("ns{}", s % namespaces);
        snap.services.push(Service {
            namespace: ns,
            name: format!("svc{s}"),
            labels: Labels::new(),
            selector: [("app".to_string(), format!("svc{s}"))].into(),
            ports: [8080u16, 9090]
                .iter()
                .map(|&p| ServicePort {
                    name: Some(format!("p{p}")),
                    port: p,
                    protocol: Some("TCP".into()),
                    app_protocol: None,
                    target_port: Some(p.into()),
                })
                .collect(),
            external_name: false,
            headless: false,
        });
    }
    for p in 0..pods {
        let s = p % services;
        let round = p / services;
        // First round: dev; later rounds: other envs, varying per service.
        let at = if round == 0 {
            0
        } else {
            1 + (s * 7 + round * 3) % (ENVS.len() - 1)
        };
        let env = ENVS.get(at).copied().unwrap_or("dev");
        snap.pods.push(Pod {
            namespace: format!("ns{}", s % namespaces),
            name: format!("svc{s}-{p}"),
            labels: [
                ("app".to_string(), format!("svc{s}")),
                ("virtual-env".to_string(), env.to_string()),
                (
                    "pod-template-hash".to_string(),
                    format!("{:08x}", p * 2654435761 % 0xffff_ffff),
                ),
            ]
            .into(),
            ready: p % 10 != 9,
            // 10.64.0.0/10: room for 4M pods, one address each.
            ips: vec![format!(
                "10.{}.{}.{}",
                64 + (p >> 16),
                (p >> 8) & 255,
                p & 255
            )],
            host_network: false,
            // What `workload_name` gives a bare pod (no owner in the JSON below).
            workload: format!("svc{s}-{p}"),
            ..Pod::default()
        });
    }
    snap
}

/// The snapshot as `kubectl get ns,pods,svc -A -o json` would print it.
pub fn to_kubectl_json(snap: &Snapshot) -> Value {
    let mut items = Vec::new();
    for ns in &snap.namespaces {
        items.push(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": ns.name, "labels": ns.labels}}));
    }
    for pod in &snap.pods {
        items.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": pod.labels},
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": if pod.ready { "True" } else { "False" }}],
                "podIP": pod.ips.first(),
                "podIPs": pod.ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}}));
    }
    for svc in &snap.services {
        let ports: Vec<Value> = svc
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.target_port}))
            .collect();
        items.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc.name, "namespace": svc.namespace},
            "spec": {"selector": svc.selector, "ports": ports}}));
    }
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}
