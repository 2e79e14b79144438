//! Base64 (standard alphabet), forgiving on input the way clients actually send it.
use crate::HandlerError;
use base64::Engine;

/// Decodes standard base64; accepts missing padding, embedded whitespace and a
/// `data:...;base64,` prefix. `field` names the JSON field in the error message.
pub fn decode(field: &str, text: &str) -> Result<Vec<u8>, HandlerError> {
    // Images are megabytes of text: look for the data-URL prefix only at the start, and take
    // the common case (no whitespace) straight to the decoder without copying.
    let text = match text.strip_prefix("data:") {
        Some(rest) => match rest
            .get(..rest.len().min(256))
            .and_then(|head| head.find(";base64,"))
        {
            Some(i) => &rest[i + 8..],
            None => text,
        },
        None => text,
    };
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    if let Ok(bytes) = engine.decode(text) {
        return Ok(bytes);
    }
    let cleaned: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    engine
        .decode(&cleaned)
        .map_err(|e| HandlerError::bad(format!("field '{field}' is not valid base64: {e}")))
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
