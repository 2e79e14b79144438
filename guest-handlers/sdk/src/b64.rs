//! Base64 (standard alphabet), forgiving on input the way clients actually send it.
use crate::HandlerError;
use base64::Engine;

/// Decodes standard base64; accepts missing padding, embedded whitespace and a
/// `data:...;base64,` prefix. `field` names the JSON field in the error message.
pub fn decode(field: &str, text: &str) -> Result<Vec<u8>, HandlerError> {
    let text = match text.find(";base64,") {
        Some(i) if text.starts_with("data:") => &text[i + 8..],
        _ => text,
    };
    let cleaned: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let trimmed = cleaned.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .map_err(|e| HandlerError::bad(format!("field '{field}' is not valid base64: {e}")))
}

/// Encodes as standard padded base64.
pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
