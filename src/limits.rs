//! The documented limits of a plugin config, and the serde helpers that check
//! them while parsing: a list stops growing at its limit, so an oversized
//! config is refused before it can allocate more than its own size.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, DeserializeSeed, Deserializer, Error, SeqAccess, Visitor};

use crate::config::{CallerEntry, CallerWorkloadEntry, EdgeRule, EnvAlias, EnvEntry, ServiceEntry};

/// Largest plugin config accepted, in bytes (checked before it is read).
pub const MAX_CONFIG_BYTES: usize = 16 << 20;
/// Most entries in `envs`.
pub const MAX_ENVS: usize = 100_000;
/// Most entries in `services`.
pub const MAX_SERVICES: usize = 100_000;
/// Most ports one service may list.
pub const MAX_PORTS_PER_SERVICE: usize = 64;
/// Most entries in `envAliases`.
pub const MAX_ALIASES: usize = 16;
/// Most (service, env) pairs in one table.
pub const MAX_PAIRS: usize = 250_000;
/// Most caller IPs (`callers`, all envs together).
pub const MAX_CALLER_IPS: usize = 200_000;
/// Most caller workload names (`callerWorkloads`, all entries together).
pub const MAX_CALLER_WORKLOADS: usize = 100_000;
/// Most `edgeRules`.
pub const MAX_EDGE_RULES: usize = 64;
/// Most `values` of one edge rule (e.g. user ids).
pub const MAX_RULE_VALUES: usize = 10_000;
/// Most targets (pairs × ports in cluster mode, pairs in host mode; in
/// endpoint mode endpoint addresses × ports plus one cluster per port).
pub const MAX_TARGETS: usize = 500_000;
/// Endpoint mode: most pod addresses (`services[].endpoints`, all services
/// and envs together).
pub const MAX_ENDPOINTS: usize = 500_000;

/// A sequence of at most `max` elements; past that, an error naming the limit.
struct Bounded<T> {
    max: usize,
    what: &'static str,
    item: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        // The size hint comes from the input: never trust it past the limit.
        let hint = seq.size_hint().unwrap_or(0).min(self.max).min(4096);
        let mut out = Vec::with_capacity(hint);
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                return Err(A::Error::custom(format_args!(
                    "more than {} {} (limit)",
                    self.max, self.what
                )));
            }
            out.push(item);
        }
        Ok(out)
    }
}

impl<'de, T: Deserialize<'de>> DeserializeSeed<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Vec<T>, D::Error> {
        d.deserialize_seq(self)
    }
}

fn bounded<'de, D, T>(d: D, max: usize, what: &'static str) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_seq(Bounded {
        max,
        what,
        item: PhantomData,
    })
}

pub(crate) fn envs<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EnvEntry>, D::Error> {
    bounded(d, MAX_ENVS, "envs")
}

pub(crate) fn services<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ServiceEntry>, D::Error> {
    bounded(d, MAX_SERVICES, "services")
}

pub(crate) fn aliases<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EnvAlias>, D::Error> {
    bounded(d, MAX_ALIASES, "aliases")
}

pub(crate) fn ports<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    bounded(d, MAX_PORTS_PER_SERVICE, "ports")
}

pub(crate) fn callers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<CallerEntry>, D::Error> {
    bounded(d, MAX_CALLER_IPS, "caller entries")
}

pub(crate) fn caller_ips<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    bounded(d, MAX_CALLER_IPS, "caller IPs")
}

pub(crate) fn caller_workloads<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<CallerWorkloadEntry>, D::Error> {
    bounded(d, MAX_CALLER_WORKLOADS, "caller workload entries")
}

pub(crate) fn caller_workload_names<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<String>, D::Error> {
    bounded(d, MAX_CALLER_WORKLOADS, "workloads")
}

pub(crate) fn edge_rules<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<EdgeRule>, D::Error> {
    bounded(d, MAX_EDGE_RULES, "edge rules")
}

pub(crate) fn rule_values<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    bounded(d, MAX_RULE_VALUES, "values")
}

pub(crate) fn env_ids<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    bounded(d, MAX_ENVS, "envs")
}
