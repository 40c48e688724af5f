//! envlane: hierarchical virtual-environment routing for Istio sidecars.
//!
//! The decision is plain code over plain data ([`decide::plan`] over a
//! [`table::RoutingTable`] compiled from [`config::PluginConfig`]); only
//! [`filter`] (feature `filter`) talks to proxy-wasm.

pub mod config;
pub mod decide;
pub mod names;
pub mod sources;
pub mod table;
pub mod wire;

#[cfg(feature = "filter")]
mod filter;
