//! Fixture builders shared by the native tests.
#![allow(dead_code)]

use envlane::config::{EnvEntry, Mode, PluginConfig, ServiceEntry};
use envlane::decide::Headers;
use envlane::pod_ips::EnvPodIps;
use envlane::table::{Node, RoutingTable};
use envlane::wire::HeaderMap;

/// A config with `services` = (fqdn, port, envs), envs indexed in first-seen order.
pub fn config(services: &[(&str, u16, &[&str])], default_env: Option<&str>) -> PluginConfig {
    let mut envs: Vec<String> = Vec::new();
    let mut entries = Vec::new();
    for (host, port, svc_envs) in services {
        let ids = svc_envs
            .iter()
            .map(|e| match envs.iter().position(|x| x == e) {
                Some(i) => i as u32,
                None => {
                    envs.push(e.to_string());
                    (envs.len() - 1) as u32
                }
            })
            .collect();
        entries.push(ServiceEntry {
            host: host.to_string(),
            ports: vec![*port],
            envs: ids,
            target_ports: Vec::new(),
            endpoints: Default::default(),
        });
    }
    PluginConfig {
        default_env: default_env.map(str::to_string),
        envs: envs
            .into_iter()
            .map(|name| EnvEntry { name, subset: None })
            .collect(),
        services: entries,
        ..PluginConfig::default()
    }
}

pub fn compile(cfg: &PluginConfig, namespace: &str, label: Option<&str>) -> RoutingTable {
    let node = Node {
        namespace: Some(namespace.into()),
        env_label: label.map(str::to_string),
    };
    RoutingTable::compile(cfg, &node).expect("config compiles")
}

/// The alibaba/virtual-environment e2e topology, namespace `demo`.
pub fn alibaba(mode: Mode) -> PluginConfig {
    let mut cfg = config(
        &[
            ("node.demo.svc.cluster.local", 8080, &["dev", "dev.proj1"]),
            ("go.demo.svc.cluster.local", 8080, &["dev", "dev.proj2"]),
            (
                "java.demo.svc.cluster.local",
                8080,
                &["dev", "dev.proj1", "dev.proj1.feature1"],
            ),
        ],
        Some("dev"),
    );
    cfg.mode = mode;
    cfg
}

/// Endpoint mode's pod IPs of (service, env) in [`alibaba_endpoints`]: two
/// IPv4 pods, one IPv6 pod for java's `dev.proj1.feature1`.
pub fn pod_ips(service: &str, env: &str) -> Vec<String> {
    if (service, env) == ("java", "dev.proj1.feature1") {
        return vec!["fd00::31".into()];
    }
    let s = ["node", "go", "java"]
        .iter()
        .position(|n| *n == service)
        .unwrap_or(9)
        + 1;
    let e = ["dev", "dev.proj1", "dev.proj2"]
        .iter()
        .position(|n| *n == env)
        .unwrap_or(9)
        + 1;
    (1..=2).map(|k| format!("10.{s}.{e}.{k}")).collect()
}

/// The target port of every service port in [`alibaba_endpoints`].
pub const TARGET_PORT: u16 = 9080;

/// [`alibaba`] in endpoint mode: port 8080 → target port 9080, the pods of
/// [`pod_ips`].
pub fn alibaba_endpoints() -> PluginConfig {
    let mut cfg = alibaba(Mode::Endpoint);
    let envs: Vec<String> = cfg.envs.iter().map(|e| e.name.clone()).collect();
    for svc in &mut cfg.services {
        let name = svc.host.split('.').next().unwrap_or_default().to_string();
        svc.target_ports = vec![TARGET_PORT];
        svc.endpoints = EnvPodIps::try_new(
            svc.envs
                .iter()
                .map(|&id| pod_ips(&name, envs.get(id as usize).map_or("", String::as_str))),
        )
        .expect("canonical test IPs");
    }
    cfg
}

/// Request headers as the host hands them to the filter: proxy-wasm's
/// serialized map, read through [`HeaderMap`] as the filter reads it.
pub struct MapHeaders(pub Vec<u8>);

impl MapHeaders {
    pub fn new(pairs: &[(&str, &str)]) -> Self {
        Self(HeaderMap::encode(
            pairs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
        ))
    }

    /// Values as raw bytes (not necessarily UTF-8), as a client may send.
    pub fn raw(pairs: &[(&str, &[u8])]) -> Self {
        Self(HeaderMap::encode(
            pairs.iter().map(|(k, v)| (k.as_bytes(), *v)),
        ))
    }
}

impl Headers for MapHeaders {
    fn values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'s [u8]> + 's {
        HeaderMap::parse(&self.0)
            .expect("well-formed header map")
            .values_of(name)
    }
}

/// The subset name envlane derives for `env`.
pub fn subset(env: &str) -> String {
    let name = envlane::names::EnvName::try_new(env, Default::default()).expect("valid env");
    envlane::names::SubsetName::for_env(&name)
        .as_str()
        .to_string()
}
