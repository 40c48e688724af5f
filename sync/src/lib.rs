//! envlane-sync: keeps envlane's routing table (a WasmPlugin's
//! `pluginConfig`) and the DestinationRules or per-env Services it relies on
//! in step with the Ready pods of each env.
//!
//! * [`render`] is pure: inputs to desired objects.
//! * [`kube_io`] is the only module that talks to the API server.
//! * [`plan`] is pure: desired and observed objects to the writes.
//! * [`controller`] debounces changes, renders, and executes the plan.

pub mod cli;
pub mod controller;
pub mod endpoints;
pub mod explain;
pub mod input;
pub mod kube_io;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod output;
pub mod plan;
pub mod policy;
pub mod render;
pub mod routes;
pub mod schema;
pub mod selector;
pub mod server;
pub mod shared;
pub mod synthetic;
pub mod warning;
