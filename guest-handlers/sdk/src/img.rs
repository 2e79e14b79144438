//! Image decoding, encoding and resizing (PNG and JPEG) inside the handler, with a pixel limit.
//!
//! The pixel code is `tessera-imaging`'s, which the host also lends handlers natively through
//! the WIT `imaging` interface ([`crate::host_img`]): the same bytes either way. Here it runs in
//! the sandbox, on the handler's own memory; the limits and hostile-input handling are that
//! crate's (see its docs). The pixel limit is the `max_pixels` handler param.
use crate::{HandlerError, Tensor};
pub use tessera_imaging::{
    crop, cv2_scaled_size, dilate_square, encode, encode_jpeg, encode_png, longest_side_shape,
    pad_symmetric, pad_zero, resize, resize_cv2_linear, resize_longest_side, resize_pil_bilinear,
    symmetric_index, DynamicImage, FilterType, GrayImage, Rgb, DEFAULT_MAX_PIXELS,
};

impl From<tessera_imaging::Failure> for HandlerError {
    fn from(f: tessera_imaging::Failure) -> Self {
        use tessera_imaging::Failure;
        match f {
            Failure::BadRequest(m) => HandlerError::BadRequest(m),
            Failure::UnsupportedMediaType(m) => HandlerError::UnsupportedMediaType(m),
            Failure::PayloadTooLarge(m) => HandlerError::PayloadTooLarge(m),
            Failure::Internal(m) => HandlerError::Internal(m),
        }
    }
}

/// The decoded-pixel limit: the `max_pixels` handler param, else [`DEFAULT_MAX_PIXELS`].
pub fn max_pixels() -> u64 {
    crate::param::<u64>("max_pixels").unwrap_or(DEFAULT_MAX_PIXELS)
}

/// Width and height from the image header alone (no pixel decoding), checked against the
/// pixel limit (the `max_pixels` handler param): over it is a 413.
pub fn dimensions(field: &str, bytes: &[u8]) -> Result<(u32, u32), HandlerError> {
    Ok(tessera_imaging::dimensions(field, bytes, max_pixels())?)
}

/// Decodes PNG or JPEG bytes, checking the pixel count against the limit *before* decoding
/// (413 over it) and bounding everything the decoder allocates.
pub fn decode(field: &str, bytes: &[u8]) -> Result<DynamicImage, HandlerError> {
    Ok(tessera_imaging::decode(field, bytes, max_pixels())?)
}

/// Decodes to 8-bit RGB.
pub fn decode_rgb(field: &str, bytes: &[u8]) -> Result<Rgb, HandlerError> {
    Ok(decode(field, bytes)?.into_rgb8())
}

/// Decodes to one 8-bit channel the way PIL's `convert("L")` does, bit for bit.
pub fn decode_luma_pil(field: &str, bytes: &[u8]) -> Result<GrayImage, HandlerError> {
    Ok(tessera_imaging::luma_pil(decode(field, bytes)?))
}

/// The request's `output_format`: `false` for PNG (absent or `"png"`), `true` for JPEG
/// (`"jpeg"`/`"jpg"`); anything else is a 400.
pub fn wants_jpeg(body: &serde_json::Map<String, serde_json::Value>) -> Result<bool, HandlerError> {
    jpeg_format(body.get("output_format").and_then(|v| v.as_str()))
}

/// [`wants_jpeg`] for the `output_format` string, if the request had one.
pub fn jpeg_format(output_format: Option<&str>) -> Result<bool, HandlerError> {
    match output_format {
        None | Some("png") => Ok(false),
        Some("jpeg" | "jpg") => Ok(true),
        Some(other) => Err(HandlerError::bad(format!(
            "output_format '{other}' is not png or jpeg"
        ))),
    }
}

/// The message for an inpainting pair of different sizes (a 400).
pub fn size_mismatch((iw, ih): (u32, u32), (mw, mh): (u32, u32)) -> HandlerError {
    HandlerError::bad(format!(
        "mask_image is {mw}x{mh} but image is {iw}x{ih}; they must be the same size"
    ))
}

/// The seed's inpainting pair: `image` (base64 PNG/JPEG, as RGB) and `mask_image` (one channel
/// as PIL's `convert("L")`), which must be the same size.
pub fn decode_image_and_mask(
    body: &serde_json::Map<String, serde_json::Value>,
) -> Result<(Rgb, GrayImage), HandlerError> {
    use crate::{b64, json};
    let image = decode_rgb(
        "image",
        &b64::decode("image", json::str_field(body, "image")?)?,
    )?;
    let mask = decode_luma_pil(
        "mask_image",
        &b64::decode("mask_image", json::str_field(body, "mask_image")?)?,
    )?;
    if image.dimensions() != mask.dimensions() {
        return Err(size_mismatch(image.dimensions(), mask.dimensions()));
    }
    Ok((image, mask))
}

/// The `[H, W, 3]` u8 tensor a model returned as an RGB image, optionally cropped to its
/// top-left `width`x`height` (undoing padding added before the forward).
pub fn rgb_from_tensor(t: &Tensor, crop: Option<(u32, u32)>) -> Result<DynamicImage, HandlerError> {
    let [h, w, 3] = t.shape[..] else {
        return Err(HandlerError::Internal(format!(
            "expected an [H, W, 3] image, got {:?}",
            t.shape
        )));
    };
    let (w, h) = (w as usize, h as usize);
    let (cw, ch) = crop.map_or((w, h), |(cw, ch)| (cw as usize, ch as usize));
    let pixels = tessera_imaging::crop(t.view().u8()?, (w, h, 3), (0, 0, cw, ch))
        .ok_or_else(|| HandlerError::Internal(format!("cannot crop {w}x{h} to {cw}x{ch}")))?;
    let rgb = Rgb::from_raw(cw as u32, ch as u32, pixels).expect("size matches");
    Ok(DynamicImage::from(rgb))
}
