//! Image decoding, encoding and resizing (PNG and JPEG), with a pixel limit.
use crate::HandlerError;
use image::{ImageFormat, RgbImage};
use std::io::Cursor;

pub use image::imageops::FilterType;
pub use image::{DynamicImage, GrayImage, RgbImage as Rgb};

/// Default cap on decoded pixels, overridable per model with the `max_pixels` handler param.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

fn max_pixels() -> u64 {
    crate::param::<u64>("max_pixels").unwrap_or(DEFAULT_MAX_PIXELS)
}

fn detect(field: &str, bytes: &[u8]) -> Result<ImageFormat, HandlerError> {
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => Ok(f),
        Ok(other) => Err(HandlerError::UnsupportedMediaType(format!(
            "field '{field}': {other:?} images are not supported; send PNG or JPEG"
        ))),
        Err(_) => Err(HandlerError::bad(format!(
            "field '{field}' is not a PNG or JPEG image"
        ))),
    }
}

/// Decodes PNG or JPEG bytes, checking the pixel count against the limit *before* decoding.
pub fn decode(field: &str, bytes: &[u8]) -> Result<DynamicImage, HandlerError> {
    let format = detect(field, bytes)?;
    let reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| HandlerError::bad(format!("field '{field}': unreadable image: {e}")))?;
    let limit = max_pixels();
    if (w as u64) * (h as u64) > limit {
        return Err(HandlerError::PayloadTooLarge(format!(
            "field '{field}': image is {w}x{h} = {} pixels, over the limit of {limit}",
            (w as u64) * (h as u64)
        )));
    }
    if w == 0 || h == 0 {
        return Err(HandlerError::bad(format!(
            "field '{field}': image is empty"
        )));
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.no_limits();
    reader
        .decode()
        .map_err(|e| HandlerError::bad(format!("field '{field}': corrupt image: {e}")))
}

/// Decodes to 8-bit RGB.
pub fn decode_rgb(field: &str, bytes: &[u8]) -> Result<RgbImage, HandlerError> {
    Ok(decode(field, bytes)?.to_rgb8())
}

/// Encodes as PNG (lossless).
pub fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, HandlerError> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .map_err(|e| HandlerError::Internal(format!("encoding PNG: {e}")))?;
    Ok(out)
}

/// Encodes as JPEG at the given quality (1-100).
pub fn encode_jpeg(img: &DynamicImage, quality: u8) -> Result<Vec<u8>, HandlerError> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
    img.to_rgb8()
        .write_with_encoder(enc)
        .map_err(|e| HandlerError::Internal(format!("encoding JPEG: {e}")))?;
    Ok(out)
}

/// Resizes to exactly `w`x`h` with the given filter.
pub fn resize(img: &DynamicImage, w: u32, h: u32, filter: FilterType) -> DynamicImage {
    img.resize_exact(w, h, filter)
}
