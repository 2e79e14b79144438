//! JSON request bodies.
use crate::{HandlerError, Request};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// Parses the request body as a JSON object.
pub fn body(req: &Request) -> Result<serde_json::Map<String, Value>, HandlerError> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(HandlerError::bad("request body must be a JSON object")),
        Err(e) => Err(HandlerError::bad(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// A required string field.
pub fn str_field<'a>(
    map: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<&'a str, HandlerError> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(HandlerError::bad(format!("field '{key}' must be a string"))),
        None => Err(HandlerError::bad(format!("missing field '{key}'"))),
    }
}

/// An optional field that may be given either as a JSON value or as a string holding JSON
/// (the seed's clients send `"gen_args": "<json string>"`). Absent or null gives `T::default()`.
pub fn nested<T: DeserializeOwned + Default>(
    map: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<T, HandlerError> {
    let parsed = match map.get(key) {
        None | Some(Value::Null) => return Ok(T::default()),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(T::default()),
        Some(Value::String(s)) => serde_json::from_str::<T>(s),
        Some(v) => serde_json::from_value::<T>(v.clone()),
    };
    parsed.map_err(|e| HandlerError::bad(format!("field '{key}' is invalid: {e}")))
}

/// Serialises a handler's own context for `postprocess` (the WIT `context` bytes).
pub fn to_context<T: Serialize>(ctx: &T) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(ctx).map_err(|e| HandlerError::Internal(format!("serialising context: {e}")))
}

/// Reads back what [`to_context`] wrote.
pub fn from_context<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| HandlerError::Internal(format!("reading context: {e}")))
}
