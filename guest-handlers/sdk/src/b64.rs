//! Base64 (standard alphabet), forgiving on input the way clients actually send it.
use crate::HandlerError;
use base64::Engine;

/// Decodes standard base64; accepts missing padding, embedded whitespace and a
/// `data:...;base64,` prefix. `field` names the JSON field in the error message.
pub fn decode(field: &str, text: &str) -> Result<Vec<u8>, HandlerError> {
    Ok(tessera_imaging::base64_decode(field, text)?)
}

/// Encodes as standard padded base64.
pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgiving_decode() {
        let want = b"tessera!".to_vec();
        for text in [
            "dGVzc2VyYSE=",
            "dGVzc2VyYSE",
            "dGVz\nc2Vy YSE=\r\n",
            "data:image/png;base64,dGVzc2VyYSE=",
            "data:;base64,dGVzc2Vy\nYSE",
        ] {
            assert_eq!(decode("f", text).unwrap(), want, "{text:?}");
        }
        let err = decode("image", "not base64!").unwrap_err();
        assert!(matches!(err, HandlerError::BadRequest(m) if m.contains("field 'image'")));
    }
}
