//! envlane-sync: keeps envlane's routing table (a WasmPlugin's
//! `pluginConfig`) and the DestinationRules or per-env Services it relies on
//! in step with the Ready pods of each env.
//!
//! * [`render`] is pure: inputs to desired objects.
//! * [`kube_io`] is the only module that talks to the API server.
//! * [`controller`] debounces changes, renders, and writes what changed.

pub mod cli;
pub mod controller;
pub mod input;
pub mod kube_io;
pub mod metrics;
pub mod model;
pub mod output;
pub mod render;
pub mod routes;
pub mod schema;
pub mod selector;
pub mod server;
pub mod synthetic;
