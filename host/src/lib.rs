//! Tessera: a multi-model inference host.
//!
//! The data path, top to bottom: [`http`] (routes and API compat layers) → [`registry`] (model
//! names → archives) → [`residency`] (load once, keep hot within a budget, evict LRU) →
//! [`sandbox`] (the model owner's Wasm handler) → [`runtime`] (TorchScript forward on the
//! device), with [`store`] supplying archives and [`archive`] packing and unpacking them.
//! [`inference`] strings one request through those layers; [`tenancy`] says who is calling and
//! [`upload`] takes new models in.

pub mod archive;
pub mod config;
pub mod http;
pub mod inference;
pub mod metrics;
pub mod registry;
pub mod residency;
pub mod runtime;
pub mod sandbox;
pub mod store;
pub mod tenancy;
pub mod upload;
pub mod yaml;

pub use config::Config;
