//! envlane: hierarchical virtual-environment routing for Istio sidecars.
//!
//! The decision is plain code over plain data ([`decide::plan`] over a
//! [`table::RoutingTable`] compiled from [`config::PluginConfig`]); [`glue`]
//! applies it through a small host trait, and only `filter` (feature
//! `filter`) talks to proxy-wasm.

pub mod callers;
pub mod config;
pub mod decide;
pub mod edge;
pub mod edge_rules;
pub mod glue;
pub mod limits;
pub mod names;
pub mod pod_ips;
pub mod sources;
pub mod table;
pub mod unknown;
pub mod wire;

#[cfg(feature = "filter")]
mod filter;
