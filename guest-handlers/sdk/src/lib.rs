//! Tessera guest SDK: what a model owner needs to write a handler in a few lines.
//!
//! A handler implements [`Handler`] and exports it with [`export_handler!`]:
//!
//! ```ignore
//! struct MyHandler;
//! impl tessera_sdk::Handler for MyHandler {
//!     fn preprocess(req: Request) -> Result<ModelInput, HandlerError> { ... }
//!     fn postprocess(outputs: Vec<Tensor>, ctx: Vec<u8>) -> Result<Response, HandlerError> { ... }
//! }
//! tessera_sdk::export_handler!(MyHandler);
//! ```
//!
//! Helpers cover the usual request shapes: JSON bodies ([`json`]), base64 ([`b64`]), PNG/JPEG
//! images decoded in the sandbox ([`img`]) or by the host ([`host_img`]), and tensors
//! ([`Tensor`] constructors and readers). Host calls are [`asset`], [`param`], [`log`],
//! [`is_cached`] and the images of [`host_img`].

pub mod b64;
pub mod clip;
pub mod img;
pub mod json;
mod tensor;

#[cfg(not(feature = "wit-v0-1"))]
pub mod host_img;

#[doc(hidden)]
#[cfg(not(feature = "wit-v0-1"))]
pub mod bindings {
    wit_bindgen::generate!({
        world: "handler",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "tessera_sdk::bindings",
    });
}

/// The previous contract (`wit/v0.1`, no `imaging` import), for checking that handlers built
/// against it keep working (`guest-handlers/example-v0-1`).
#[doc(hidden)]
#[cfg(feature = "wit-v0-1")]
pub mod bindings {
    wit_bindgen::generate!({
        world: "handler",
        path: "../../wit/v0.1",
        pub_export_macro: true,
        export_macro_name: "export_handler",
        default_bindings_module: "tessera_sdk::bindings",
    });
}

pub use bindings::export_handler;
pub use bindings::tessera::handler::types::{
    Dtype, HandlerError, LogLevel, ModelInput, Request, Response, Tensor,
};
pub use bindings::Guest as Handler;
pub use tensor::{first_output, TensorView};

use bindings::tessera::handler::host;

/// Reads a file from the archive's `assets/` folder.
pub fn asset(path: &str) -> Result<Vec<u8>, HandlerError> {
    host::read_asset(path).map_err(|e| HandlerError::Internal(format!("asset {path}: {e}")))
}

/// A parameter from the `handler:` map of model-config.yaml, parsed as `T`.
pub fn param<T: std::str::FromStr>(key: &str) -> Option<T> {
    host::config_param(key).and_then(|v| v.parse().ok())
}

/// Whether the host holds the cached stage's outputs for `key` (see `model-input.cache-key`);
/// when true, the stage's inputs may be omitted from this request.
pub fn is_cached(key: &str) -> bool {
    host::is_cached(key)
}

/// Logs one line to the server log (rate-limited by the host).
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message)
}

impl HandlerError {
    /// Shorthand for a 400 with the given message.
    pub fn bad(msg: impl Into<String>) -> Self {
        HandlerError::BadRequest(msg.into())
    }
}

impl Response {
    /// A 200 response `{"<key>": "<base64 of bytes>"}` (the seed's `generated_image` reply),
    /// written straight into the body: no JSON string escaping pass over megabytes of base64,
    /// which never needs escaping.
    pub fn base64_field(key: &str, bytes: &[u8]) -> Result<Response, HandlerError> {
        use base64::Engine;
        let key = serde_json::to_string(key)
            .map_err(|e| HandlerError::Internal(format!("serialising response: {e}")))?;
        let mut body = String::with_capacity(key.len() + 6 + bytes.len().div_ceil(3) * 4);
        body.push('{');
        body.push_str(&key);
        body.push_str(":\"");
        base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut body);
        body.push_str("\"}");
        Ok(Response {
            status: 200,
            content_type: "application/json".into(),
            body: body.into_bytes(),
        })
    }

    /// A 200 response with a JSON body.
    pub fn json<T: serde::Serialize>(value: &T) -> Result<Response, HandlerError> {
        let body = serde_json::to_vec(value)
            .map_err(|e| HandlerError::Internal(format!("serialising response: {e}")))?;
        Ok(Response {
            status: 200,
            content_type: "application/json".into(),
            body,
        })
    }
}

#[cfg(test)]
pub(crate) use tessera_imaging::test_fixture;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_field_is_the_json_serde_would_write() {
        let bytes: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let r = Response::base64_field("generated_image", &bytes).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "generated_image": b64::encode(&bytes) })
        );
        assert_eq!(
            (r.status, r.content_type.as_str()),
            (200, "application/json")
        );
    }
}
