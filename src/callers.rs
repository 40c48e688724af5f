//! The caller table of a shared proxy (gateway or waypoint): which env a
//! calling pod is in, found by the address of the TCP peer or, in a
//! waypoint, by the (namespace, workload) the proxy knows for its peer.
//! Compiled once per config; a lookup parses the address and hashes it once.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, Ipv6Addr};

use crate::config::{CallerEntry, CallerWorkloadEntry, ConfigError};
use crate::table::FxHasher;

type FastHash = BuildHasherDefault<FxHasher>;

/// Caller pod IP → env id, and (namespace, workload) → env id.
#[derive(Debug, Default)]
pub struct CallerTable {
    /// Keyed by the IPv6 form of the address (IPv4 mapped), so v4 and v6
    /// share one map.
    by_ip: HashMap<u128, u32, FastHash>,
    /// Keyed by `namespace/workload`.
    by_workload: HashMap<Box<str>, u32, FastHash>,
}

fn key(ip: IpAddr) -> u128 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    u128::from(v6)
}

/// The IP of an Envoy address property value: `1.2.3.4:5678`,
/// `[fd00::1]:5678`, or a bare address.
pub fn parse_address(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (ip, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<IpAddr>().ok()
}

impl CallerTable {
    /// Checks the entries (`env_count` envs in the table) and builds the maps.
    pub fn compile(
        callers: &[CallerEntry],
        workloads: &[CallerWorkloadEntry],
        env_count: usize,
    ) -> Result<Self, ConfigError> {
        let ips: usize = callers.iter().map(|c| c.ips.len()).sum();
        if ips > crate::limits::MAX_CALLER_IPS {
            return Err(ConfigError::new(
                "callers",
                format!(
                    "{ips} IPs is over the limit of {}",
                    crate::limits::MAX_CALLER_IPS
                ),
            ));
        }
        let names: usize = workloads.iter().map(|w| w.workloads.len()).sum();
        if names > crate::limits::MAX_CALLER_WORKLOADS {
            return Err(ConfigError::new(
                "callerWorkloads",
                format!(
                    "{names} workloads is over the limit of {}",
                    crate::limits::MAX_CALLER_WORKLOADS
                ),
            ));
        }
        let check_env = |field: String, env: u32| {
            if (env as usize) < env_count {
                Ok(env)
            } else {
                Err(ConfigError::new(
                    field,
                    format!("{env} is not an index into envs"),
                ))
            }
        };
        let mut table = Self {
            by_ip: HashMap::with_capacity_and_hasher(ips, FastHash::default()),
            by_workload: HashMap::with_capacity_and_hasher(names, FastHash::default()),
        };
        for (i, entry) in callers.iter().enumerate() {
            let env = check_env(format!("callers[{i}].env"), entry.env)?;
            for (j, text) in entry.ips.iter().enumerate() {
                let field = || format!("callers[{i}].ips[{j}]");
                let ip = text
                    .parse::<IpAddr>()
                    .map_err(|_| ConfigError::new(field(), format!("`{text}` is not an IP")))?;
                // An IP the companion saw under two envs is left out by it;
                // a table that lists one twice is not envlane-sync's.
                if table.by_ip.insert(key(ip), env).is_some() {
                    return Err(ConfigError::new(
                        field(),
                        format!("`{text}` is listed twice"),
                    ));
                }
            }
        }
        for (i, entry) in workloads.iter().enumerate() {
            let env = check_env(format!("callerWorkloads[{i}].env"), entry.env)?;
            if !is_name(&entry.namespace) {
                return Err(ConfigError::new(
                    format!("callerWorkloads[{i}].namespace"),
                    format!("`{}` is not a namespace name", entry.namespace),
                ));
            }
            for (j, name) in entry.workloads.iter().enumerate() {
                let field = || format!("callerWorkloads[{i}].workloads[{j}]");
                if !is_name(name) {
                    return Err(ConfigError::new(
                        field(),
                        format!("`{name}` is not a workload name"),
                    ));
                }
                let k: Box<str> = format!("{}/{name}", entry.namespace).into();
                if table.by_workload.insert(k, env).is_some() {
                    return Err(ConfigError::new(
                        field(),
                        format!("`{}/{name}` is listed twice", entry.namespace),
                    ));
                }
            }
        }
        Ok(table)
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty() && self.by_workload.is_empty()
    }

    pub fn ip_count(&self) -> usize {
        self.by_ip.len()
    }

    /// The env of the caller at `address` (an Envoy address property).
    pub fn env_of_address(&self, address: &str) -> Option<u32> {
        if self.by_ip.is_empty() {
            return None;
        }
        let ip = parse_address(address)?;
        self.by_ip.get(&key(ip)).copied()
    }

    /// The env of workload `name` in `namespace`.
    pub fn env_of_workload(&self, namespace: &str, name: &str) -> Option<u32> {
        if self.by_workload.is_empty() || namespace.len() + name.len() > 320 {
            return None;
        }
        let mut k = String::with_capacity(namespace.len() + 1 + name.len());
        k.push_str(namespace);
        k.push('/');
        k.push_str(name);
        self.by_workload.get(k.as_str()).copied()
    }
}

/// A Kubernetes object name (DNS subdomain): what namespaces and workload
/// names are.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(env: u32, ips: &[&str]) -> CallerEntry {
        CallerEntry {
            env,
            ips: ips.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn addresses_as_envoy_writes_them() {
        for (text, want) in [
            ("10.244.1.5:43210", Some("10.244.1.5")),
            ("10.244.1.5", Some("10.244.1.5")),
            ("[fd00::5]:80", Some("fd00::5")),
            ("fd00::5", Some("fd00::5")),
            ("[fd00::5]", Some("fd00::5")),
            ("10.244.1.5:99999", None),
            ("10.244.1:80", None),
            ("", None),
            ("envoy://internal_client_address/", None),
            ("[::1", None),
        ] {
            let got = parse_address(text).map(|ip| ip.to_string());
            assert_eq!(got.as_deref(), want, "{text}");
        }
    }

    #[test]
    fn lookup_by_address_and_workload() {
        let t = CallerTable::compile(
            &[
                entry(0, &["10.244.1.5", "fd00::5"]),
                entry(2, &["10.244.1.6"]),
            ],
            &[CallerWorkloadEntry {
                env: 1,
                namespace: "demo".into(),
                workloads: vec!["node".into()],
            }],
            3,
        )
        .unwrap();
        for (address, want) in [
            ("10.244.1.5:1234", Some(0)),
            ("[fd00::5]:1234", Some(0)),
            ("10.244.1.6:1", Some(2)),
            ("10.244.1.7:1", None),
            // The v4-mapped form of a v4 address is the same pod.
            ("[::ffff:10.244.1.6]:1", Some(2)),
            ("junk", None),
        ] {
            assert_eq!(t.env_of_address(address), want, "{address}");
        }
        assert_eq!(t.env_of_workload("demo", "node"), Some(1));
        assert_eq!(t.env_of_workload("other", "node"), None);
        assert_eq!(t.env_of_workload("demo/node", ""), None);
    }

    #[test]
    fn bad_entries_are_refused_with_their_field() {
        let wl = |ns: &str, name: &str| CallerWorkloadEntry {
            env: 0,
            namespace: ns.into(),
            workloads: vec![name.into()],
        };
        for (callers, workloads, field) in [
            (vec![entry(3, &["10.0.0.1"])], vec![], "callers[0].env"),
            (vec![entry(0, &["10.0.0.300"])], vec![], "callers[0].ips[0]"),
            (
                vec![entry(0, &["10.0.0.1"]), entry(1, &["10.0.0.1"])],
                vec![],
                "callers[1].ips[0]",
            ),
            (
                vec![],
                vec![wl("Demo", "node")],
                "callerWorkloads[0].namespace",
            ),
            (
                vec![],
                vec![wl("demo", "a/b")],
                "callerWorkloads[0].workloads[0]",
            ),
            (
                vec![],
                vec![wl("demo", "node"), wl("demo", "node")],
                "callerWorkloads[1].workloads[0]",
            ),
        ] {
            let err = CallerTable::compile(&callers, &workloads, 3).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }
}
