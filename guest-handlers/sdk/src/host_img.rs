//! Images held by the host (the WIT `imaging` interface): decoding, resizing, padding and
//! encoding run natively, outside the sandbox, on the same code as [`crate::img`], so the bytes
//! are the same and the handler's memory never holds the encoded photo or the model's input.
//!
//! ```ignore
//! let image = Image::decode_base64("image", json::str_field(&body, "image")?, PixelFormat::Rgb)?;
//! let padded = image.pad(w8, h8, PadMode::Symmetric)?;
//! inputs.push(padded.as_input("image")); // the host fills the pixels in
//! ```
pub use crate::bindings::tessera::handler::imaging::{
    Encoding, Image, PadMode, PixelFormat, ResizeFilter,
};
use crate::{HandlerError, Response};

/// Decodes the JSON string `field` of `body` (base64 PNG/JPEG) on the host.
pub fn decode_field(
    body: &serde_json::Map<String, serde_json::Value>,
    field: &str,
    format: PixelFormat,
) -> Result<Image, HandlerError> {
    Image::decode_base64(field, crate::json::str_field(body, field)?, format)
}

/// `image` encoded as PNG, or as JPEG at quality 95 when `jpeg` (what [`crate::img::encode`]
/// does), in a 200 response `{"<key>": "<base64>"}`.
pub fn base64_response(key: &str, image: &Image, jpeg: bool) -> Result<Response, HandlerError> {
    let encoded = if jpeg {
        image.encode(Encoding::Jpeg, 95)?
    } else {
        image.encode(Encoding::Png, 0)?
    };
    Response::base64_field(key, &encoded)
}
