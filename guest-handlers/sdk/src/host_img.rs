//! Images held by the host (the WIT `imaging` interface): decoding, resizing, padding and
//! encoding run natively, outside the sandbox, on the same code as [`crate::img`], so the bytes
//! are the same and the handler's memory never holds the encoded photo or the model's input.
//!
//! ```ignore
//! let image = host_img::decode_field(&body, "image", PixelFormat::Rgb)?;
//! let padded = image.pad(w8, h8, PadMode::Symmetric)?;
//! inputs.push(padded.as_input("image")); // the host fills the pixels in
//! ```
pub use crate::bindings::tessera::handler::imaging::{
    Base64Image, Encoding, Image, PadMode, PixelFormat, ResizeFilter,
};
use crate::{HandlerError, Response};

/// Decodes the JSON string `field` of `body` (base64 PNG/JPEG) on the host.
pub fn decode_field(
    body: &crate::json::Fields,
    field: &str,
    format: PixelFormat,
) -> Result<Image, HandlerError> {
    Image::decode_base64(field, body.str(field)?.as_bytes(), format)
}

/// Decodes the JSON string fields `N` of `body` (base64 PNG/JPEG) on the host, side by side:
/// the images in order, or the first error (a missing or non-string field before any decode).
pub fn decode_fields<const N: usize>(
    body: &crate::json::Fields,
    fields: [(&str, PixelFormat); N],
) -> Result<[Image; N], HandlerError> {
    let items = fields
        .iter()
        .map(|&(field, format)| {
            Ok(Base64Image {
                field: field.to_string(),
                text: body.str(field)?.as_bytes().to_vec(),
                format,
            })
        })
        .collect::<Result<Vec<_>, HandlerError>>()?;
    Image::decode_base64_all(&items)?
        .try_into()
        .map_err(|_| HandlerError::Internal("the host decoded another number of images".into()))
}

/// `image` encoded as PNG, or as JPEG at quality 95 when `jpeg` (what [`crate::img::encode`]
/// does), in a 200 response `{"<key>": "<base64>"}`.
pub fn base64_response(key: &str, image: &Image, jpeg: bool) -> Result<Response, HandlerError> {
    let text = if jpeg {
        image.encode_base64(Encoding::Jpeg, 95)?
    } else {
        image.encode_base64(Encoding::Png, 0)?
    };
    let key = serde_json::to_string(key)
        .map_err(|e| HandlerError::Internal(format!("serialising response: {e}")))?;
    let mut body = Vec::with_capacity(key.len() + text.len() + 5);
    body.push(b'{');
    body.extend_from_slice(key.as_bytes());
    body.extend_from_slice(b":\"");
    body.extend_from_slice(&text);
    body.extend_from_slice(b"\"}");
    Ok(Response {
        status: 200,
        content_type: "application/json".into(),
        body,
    })
}
