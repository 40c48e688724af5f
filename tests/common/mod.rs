//! Fixture builders shared by the native tests.
#![allow(dead_code)]

use envlane::config::{EnvEntry, Mode, PluginConfig, ServiceEntry};
use envlane::decide::Headers;
use envlane::table::{Node, RoutingTable};

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

/// Request headers as a list of (name, value); names lower-case.
pub struct MapHeaders(pub Vec<(String, String)>);

impl MapHeaders {
    pub fn new(pairs: &[(&str, &str)]) -> Self {
        Self(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl Headers for MapHeaders {
    fn get(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }
    fn get_all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// The subset name envlane derives for `env`.
pub fn subset(env: &str) -> String {
    let name = envlane::names::EnvName::try_new(env, Default::default()).expect("valid env");
    envlane::names::SubsetName::for_env(&name)
        .as_str()
        .to_string()
}
