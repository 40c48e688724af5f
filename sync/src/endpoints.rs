//! Endpoint mode: per Service, the Ready pods' addresses by env (what the
//! filter picks from) and, per Service port, the ORIGINAL_DST cluster the
//! filter's choice goes to, with Istio's mTLS (the workload certificate and
//! root CA istio-agent serves over SDS, the SPIFFE identities of the
//! Service's pods). Pure.

use std::collections::{BTreeMap, BTreeSet};

use envlane::table::endpoint_cluster;
use serde_json::{json, Value};

use crate::model::{Pod, Service, ServicePort};
use crate::warning::{Reason, Regarding, Warning};

/// Istio's SDS secret names and the cluster istio-agent serves them on.
const SDS_CLUSTER: &str = "sds-grpc";
const SDS_CERTIFICATE: &str = "default";
const SDS_ROOT_CA: &str = "ROOTCA";
/// Istio's default `connectTimeout`.
const CONNECT_TIMEOUT: &str = "10s";

/// One Service port as endpoint mode routes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub port: u16,
    /// The pods' port (`targetPort`, a name resolved through the pods).
    pub target: u16,
    /// HTTP/2 upstream (gRPC, `http2`, `h2c`), as istiod would use.
    pub h2: bool,
}

/// What endpoint mode needs of one Service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// By port, sorted, one entry per port number.
    pub ports: Vec<Port>,
    /// Env → the canonical IPs of its Ready pods (sorted, no duplicates).
    /// Only envs with at least one pod.
    pub by_env: BTreeMap<String, Vec<String>>,
    /// `spiffe://TRUST_DOMAIN/ns/NS/sa/SA` of every pod in `by_env`, sorted.
    pub identities: Vec<String>,
}

/// The protocol istiod gives a Service port: `appProtocol`, else the name's
/// prefix before `-`.
fn is_h2(port: &ServicePort) -> bool {
    let protocol = match &port.app_protocol {
        Some(p) => p.to_ascii_lowercase(),
        None => port
            .name
            .as_deref()
            .unwrap_or("")
            .split('-')
            .next()
            .unwrap_or("")
            .to_ascii_lowercase(),
    };
    matches!(
        protocol.as_str(),
        "grpc" | "http2" | "h2c" | "kubernetes.io/h2c"
    )
}

/// A port's `targetPort` as written: a number, a name, or none.
enum Target<'a> {
    Number(u16),
    Name(&'a str),
}

fn target_of(port: &ServicePort) -> Option<Target<'_>> {
    match &port.target_port {
        None => Some(Target::Number(port.port)),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n > 0)
            .map(Target::Number),
        Some(Value::String(s)) => match s.parse::<u16>() {
            Ok(n) if n > 0 => Some(Target::Number(n)),
            _ => Some(Target::Name(s.as_str())),
        },
        Some(_) => None,
    }
}

/// The endpoints of `svc` from its Ready pods `pods` (each with its env). A
/// named `targetPort` takes the number most of the pods give it (ties: the
/// smallest); a pod that gives it another or none is left out, and an env
/// left without pods too, each with a warning.
pub fn of(svc: &Service, pods: &[(&Pod, &str)], trust_domain: &str) -> (Endpoints, Vec<Warning>) {
    let mut warnings = Vec::new();
    let warn = |warnings: &mut Vec<Warning>, text: String| {
        warnings.push(Warning::new(
            Regarding::service(&svc.namespace, &svc.name),
            Reason::TargetPortUnresolved,
            text,
        ));
    };
    let mut by_port: BTreeMap<u16, &ServicePort> = BTreeMap::new();
    for p in &svc.ports {
        by_port.entry(p.port).or_insert(p);
    }
    let mut ports = Vec::new();
    // Per named port: the number chosen, to check each pod against.
    let mut named: Vec<(&str, u16)> = Vec::new();
    for (&number, p) in &by_port {
        let target = match target_of(p) {
            Some(Target::Number(n)) => n,
            Some(Target::Name(name)) => {
                let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
                for (pod, _) in pods {
                    if let Some((_, n)) = pod.container_ports.iter().find(|(k, _)| k == name) {
                        *counts.entry(*n).or_default() += 1;
                    }
                }
                let best = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)));
                match best {
                    Some((&n, _)) => {
                        named.push((name, n));
                        n
                    }
                    None => {
                        warn(
                            &mut warnings,
                            format!(
                                "service {}/{} port {number}: no Ready pod has a container port named `{name}`; the service is left out of endpoint mode",
                                svc.namespace, svc.name
                            ),
                        );
                        return (Endpoints::default(), warnings);
                    }
                }
            }
            None => {
                warn(
                    &mut warnings,
                    format!(
                        "service {}/{} port {number}: targetPort is neither a port number nor a name; the service is left out of endpoint mode",
                        svc.namespace, svc.name
                    ),
                );
                return (Endpoints::default(), warnings);
            }
        };
        ports.push(Port {
            port: number,
            target,
            h2: is_h2(p),
        });
    }
    let mut by_env: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut identities = BTreeSet::new();
    let mut envs_seen: BTreeSet<&str> = BTreeSet::new();
    for (pod, env) in pods {
        envs_seen.insert(env);
        let resolves = named
            .iter()
            .all(|(name, n)| pod.container_ports.iter().any(|(k, m)| k == name && m == n));
        if !resolves {
            warn(
                &mut warnings,
                format!(
                    "service {}/{}: pod {} does not serve the named target ports as the other pods do ({}); left out of endpoint mode",
                    svc.namespace,
                    svc.name,
                    pod.name,
                    named
                        .iter()
                        .map(|(k, n)| format!("{k}={n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            continue;
        }
        let ips: Vec<String> = pod
            .ips
            .iter()
            .filter_map(|ip| ip.parse::<std::net::IpAddr>().ok())
            .map(|ip| ip.to_string())
            .collect();
        if ips.is_empty() {
            continue;
        }
        by_env.entry((*env).to_string()).or_default().extend(ips);
        identities.insert(format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            pod.namespace, pod.service_account
        ));
    }
    for env in envs_seen {
        if !by_env.contains_key(env) {
            warn(
                &mut warnings,
                format!(
                    "service {}/{} env `{env}`: no Ready pod with an address serves its ports; the pair is left out of endpoint mode",
                    svc.namespace, svc.name
                ),
            );
        }
    }
    (
        Endpoints {
            ports,
            by_env: by_env
                .into_iter()
                .map(|(env, ips)| (env, ips.into_iter().collect()))
                .collect(),
            identities: identities.into_iter().collect(),
        },
        warnings,
    )
}

fn sds(name: &str) -> Value {
    json!({
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
                "set_node_on_first_message_only": true,
                "transport_api_version": "V3",
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3",
        },
    })
}

/// The ORIGINAL_DST cluster of one Service port, as an EnvoyFilter CLUSTER
/// ADD patch for `context` (`SIDECAR_OUTBOUND` or `GATEWAY`): it connects
/// to the address the filter wrote (never one a request header names: no
/// `use_http_header`), with Istio's mTLS (SNI as istiod writes it, the
/// workload certificate and root CA from istio-agent's SDS, only the
/// Service's pods' identities accepted).
pub fn cluster_patch(context: &str, fqdn: &str, port: &Port, identities: &[String]) -> Value {
    let sans: Vec<Value> = identities
        .iter()
        .map(|id| json!({"san_type": "URI", "matcher": {"exact": id}}))
        .collect();
    let alpn: &[&str] = if port.h2 {
        &["istio-peer-exchange", "istio", "h2"]
    } else {
        &["istio-peer-exchange", "istio"]
    };
    let mut cluster = json!({
        "name": endpoint_cluster(port.port, fqdn),
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
        "cleanup_interval": "60s",
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": format!("outbound_.{}_._.{fqdn}", port.port),
                "common_tls_context": {
                    "alpn_protocols": alpn,
                    "tls_certificate_sds_secret_configs": [sds(SDS_CERTIFICATE)],
                    "combined_validation_context": {
                        "default_validation_context": {"match_typed_subject_alt_names": sans},
                        "validation_context_sds_secret_config": sds(SDS_ROOT_CA),
                    },
                },
            },
        },
    });
    if port.h2 {
        if let Some(map) = cluster.as_object_mut() {
            map.insert(
                "typed_extension_protocol_options".into(),
                json!({"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }}),
            );
        }
    }
    json!({
        "applyTo": "CLUSTER",
        "match": {"context": context},
        "patch": {"operation": "ADD", "value": cluster},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ips: &[&str], sa: &str, ports: &[(&str, u16)]) -> Pod {
        Pod {
            namespace: "shop".into(),
            name: name.into(),
            ready: true,
            ips: ips.iter().map(|s| s.to_string()).collect(),
            service_account: sa.into(),
            container_ports: ports.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            ..Pod::default()
        }
    }

    fn service(ports: Vec<ServicePort>) -> Service {
        Service {
            namespace: "shop".into(),
            name: "cart".into(),
            ports,
            ..Service::default()
        }
    }

    fn sp(port: u16, name: Option<&str>, target: Option<Value>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            port,
            target_port: target,
            ..ServicePort::default()
        }
    }

    #[test]
    fn target_ports_and_addresses() {
        // (ports, pods (name, ips, sa, container ports, env), want ports, want by_env, warnings)
        type Pods<'a> = &'a [(
            &'a str,
            &'a [&'a str],
            &'a str,
            &'a [(&'a str, u16)],
            &'a str,
        )];
        type Case<'a> = (
            Vec<ServicePort>,
            Pods<'a>,
            Vec<(u16, u16, bool)>,
            Vec<(&'a str, Vec<&'a str>)>,
            usize,
        );
        let cases: Vec<Case> = vec![
            // No targetPort: the port; a number; a number as text.
            (
                vec![
                    sp(80, Some("http"), None),
                    sp(90, Some("grpc-api"), Some(json!(9090))),
                    sp(91, None, Some(json!("9091"))),
                ],
                &[
                    ("a", &["10.0.0.1"], "cart", &[], "dev"),
                    ("b", &["10.0.0.2", "fd00::2"], "cart", &[], "dev.x"),
                ],
                vec![(80, 80, false), (90, 9090, true), (91, 9091, false)],
                vec![
                    ("dev", vec!["10.0.0.1"]),
                    ("dev.x", vec!["10.0.0.2", "fd00::2"]),
                ],
                0,
            ),
            // A name: the number most pods give it; a pod giving another is left out.
            (
                vec![sp(80, Some("http"), Some(json!("web")))],
                &[
                    ("a", &["10.0.0.1"], "cart", &[("web", 8080)], "dev"),
                    ("b", &["10.0.0.2"], "cart", &[("web", 8080)], "dev"),
                    ("c", &["10.0.0.3"], "cart", &[("web", 9999)], "dev.x"),
                ],
                vec![(80, 8080, false)],
                vec![("dev", vec!["10.0.0.1", "10.0.0.2"])],
                2,
            ),
            // A name no pod has: the service is left out.
            (
                vec![sp(80, Some("http"), Some(json!("web")))],
                &[("a", &["10.0.0.1"], "cart", &[("http", 8080)], "dev")],
                vec![],
                vec![],
                1,
            ),
            // A pod without an address adds nothing; a non-canonical IP is canonical.
            (
                vec![sp(80, None, None)],
                &[
                    ("a", &[], "cart", &[], "dev"),
                    ("b", &["FD00:0::1"], "cart", &[], "dev"),
                ],
                vec![(80, 80, false)],
                vec![("dev", vec!["fd00::1"])],
                0,
            ),
        ];
        for (ports, pods, want_ports, want_envs, want_warnings) in cases {
            let svc = service(ports);
            let owned: Vec<(Pod, &str)> = pods
                .iter()
                .map(|(n, ips, sa, cp, env)| (pod(n, ips, sa, cp), *env))
                .collect();
            let refs: Vec<(&Pod, &str)> = owned.iter().map(|(p, e)| (p, *e)).collect();
            let (got, warnings) = of(&svc, &refs, "cluster.local");
            let ports: Vec<(u16, u16, bool)> =
                got.ports.iter().map(|p| (p.port, p.target, p.h2)).collect();
            assert_eq!(ports, want_ports, "{pods:?}");
            let envs: Vec<(&str, Vec<&str>)> = got
                .by_env
                .iter()
                .map(|(e, ips)| (e.as_str(), ips.iter().map(String::as_str).collect()))
                .collect();
            assert_eq!(envs, want_envs, "{pods:?}");
            assert_eq!(warnings.len(), want_warnings, "{warnings:?}");
        }
    }

    #[test]
    fn identities_are_the_pods_service_accounts() {
        let svc = service(vec![sp(80, None, None)]);
        let (a, b, c) = (
            pod("a", &["10.0.0.1"], "cart", &[]),
            pod("b", &["10.0.0.2"], "cart-canary", &[]),
            pod("c", &["10.0.0.3"], "cart", &[]),
        );
        let (got, _) = of(
            &svc,
            &[(&a, "dev"), (&b, "dev.x"), (&c, "dev")],
            "example.org",
        );
        assert_eq!(
            got.identities,
            [
                "spiffe://example.org/ns/shop/sa/cart",
                "spiffe://example.org/ns/shop/sa/cart-canary"
            ]
        );
    }

    #[test]
    fn the_cluster_is_istio_mtls_to_the_address_the_filter_chose() {
        let fqdn = "cart.shop.svc.cluster.local";
        let ids = vec!["spiffe://cluster.local/ns/shop/sa/cart".to_string()];
        let http = cluster_patch(
            "SIDECAR_OUTBOUND",
            fqdn,
            &Port {
                port: 8080,
                target: 9080,
                h2: false,
            },
            &ids,
        );
        let c = &http["patch"]["value"];
        assert_eq!(http["applyTo"], "CLUSTER");
        assert_eq!(http["patch"]["operation"], "ADD");
        assert_eq!(
            c["name"],
            "outbound|8080|envlane-endpoints|cart.shop.svc.cluster.local"
        );
        assert_eq!(c["type"], "ORIGINAL_DST");
        assert_eq!(c["lb_policy"], "CLUSTER_PROVIDED");
        assert!(
            c.get("original_dst_lb_config").is_none(),
            "no use_http_header"
        );
        let tls = &c["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "outbound_.8080_._.cart.shop.svc.cluster.local");
        let ctx = &tls["common_tls_context"];
        assert_eq!(
            ctx["alpn_protocols"],
            json!(["istio-peer-exchange", "istio"])
        );
        assert_eq!(
            ctx["tls_certificate_sds_secret_configs"][0]["name"],
            "default"
        );
        assert_eq!(
            ctx["tls_certificate_sds_secret_configs"][0]["sds_config"]["api_config_source"]
                ["grpc_services"][0]["envoy_grpc"]["cluster_name"],
            "sds-grpc"
        );
        let v = &ctx["combined_validation_context"];
        assert_eq!(v["validation_context_sds_secret_config"]["name"], "ROOTCA");
        assert_eq!(
            v["default_validation_context"]["match_typed_subject_alt_names"],
            json!([{"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/shop/sa/cart"}}])
        );
        assert!(c.get("typed_extension_protocol_options").is_none());
        let grpc = cluster_patch(
            "GATEWAY",
            fqdn,
            &Port {
                port: 90,
                target: 9090,
                h2: true,
            },
            &ids,
        );
        assert_eq!(grpc["match"]["context"], "GATEWAY");
        let c = &grpc["patch"]["value"];
        assert!(c["typed_extension_protocol_options"]
            ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
            ["http2_protocol_options"]
            .is_object());
    }
}
