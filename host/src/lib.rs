//! Tessera: a multi-model inference host.
//!
//! One request, top to bottom:
//! [`http`] (routes of each API dialect, authentication, the error → status map) →
//! [`serving`] (the verbs: invoke, load, unload, describe, list, upload, set-default; the
//! request path preprocess → forward → postprocess) → [`residency`] (the cache of loaded models
//! within a budget: mechanism, eviction [`residency::policy`], [`residency::loader`]) →
//! [`engine`] (a model's bounded queue and forward threads) → [`runtime`] (TorchScript on the
//! device, via tch), with [`sandbox`] running each model owner's Wasm handler around the
//! forward.
//!
//! Beside the path: [`registry`] (names → archives per tenant), [`store`] (where archives live),
//! [`archive`] (pack, unpack, model-config), [`tenancy`] (who is calling), [`names`] (the name
//! rules and [`names::ModelKey`]), [`error`] (the flat error every verb returns), [`config`],
//! [`metrics`] and [`yaml`] (bounded YAML parsing).

pub mod archive;
pub mod config;
pub mod engine;
pub mod error;
pub mod http;
pub mod metrics;
pub mod names;
pub mod oip;
pub mod registry;
pub mod residency;
pub mod runtime;
pub mod sandbox;
pub mod serving;
pub mod store;
pub mod tenancy;
pub mod yaml;

pub use config::Config;
pub use error::{Error, ErrorKind};

/// Runs blocking work (libtorch, synchronous Wasm, file I/O) on tokio's blocking pool.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(f).await
}
