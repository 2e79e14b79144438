//! Pixel work for Tessera handlers, shared by the guest SDK (compiled into each handler
//! component) and the host (which lends it to handlers natively through the WIT `imaging`
//! interface): PNG/JPEG decoding and encoding with a pixel limit, PIL/OpenCV-exact resizes,
//! padding, cropping and dilation. Both sides run this same code, so a handler that switches
//! from in-sandbox decoding to host imaging gets the same bytes.
//!
//! Every byte of an image comes from a client, so nothing is materialised before it is bounded:
//! the size in the header is checked against the pixel limit before any pixel buffer exists (an
//! oversize image is a 413 whatever a library would have said), the decoded buffer against a
//! byte budget derived from that limit, and PNG ancillary chunks are never inflated: ICC profiles
//! and text (iCCP, tEXt, zTXt, iTXt) are skipped unread (nothing here uses them; decoding applies
//! no colour management), and what the PNG decoder does keep (eXIf, palette, a row) has a small
//! budget of its own.
//!
//! A decoder that panics on a malformed image (the JPEG decoder, zune-jpeg 0.5.15, has known
//! panics on damaged progressive scans) fails that image with a 400 where panics unwind (the
//! host); inside a Wasm handler, where a panic aborts, the call traps instead (500).
use image::codecs::jpeg::JpegDecoder;
pub use image::DynamicImage;
use image::{ImageBuffer, ImageDecoder, ImageError, ImageFormat, Pixel, RgbImage};
use std::io::Cursor;

mod png_out;

pub use image::imageops::FilterType;
pub use image::{GrayImage, RgbImage as Rgb};

/// Why an image operation failed, in the terms a handler answers a client with: the SDK and
/// the host map these onto the WIT `handler-error` of the same names (400, 415, 413, 500).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    BadRequest(String),
    UnsupportedMediaType(String),
    PayloadTooLarge(String),
    Internal(String),
}

impl Failure {
    /// Shorthand for a 400 with the given message.
    pub fn bad(msg: impl Into<String>) -> Self {
        Failure::BadRequest(msg.into())
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (Failure::BadRequest(m)
        | Failure::UnsupportedMediaType(m)
        | Failure::PayloadTooLarge(m)
        | Failure::Internal(m)) = self;
        f.write_str(m)
    }
}

impl std::error::Error for Failure {}

/// Default cap on decoded pixels, overridable per model with the `max_pixels` handler param.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Decoded bytes allowed per pixel of the limit: an 8-bit RGBA image at the pixel limit. A
/// 16-bit image (up to 8 bytes a pixel) must be correspondingly smaller.
const BYTES_PER_LIMIT_PIXEL: u64 = 4;

/// What the PNG decoder may allocate besides the pixels and one row: the chunks it keeps
/// (eXIf, palette, transparency). Real metadata is a few KiB; more is refused with a 400.
const PNG_METADATA_BYTES: usize = 1 << 20;

fn detect(field: &str, bytes: &[u8]) -> Result<ImageFormat, Failure> {
    match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => Ok(f),
        Ok(other) => Err(Failure::UnsupportedMediaType(format!(
            "field '{field}': {other:?} images are not supported; send PNG or JPEG"
        ))),
        Err(_) => Err(Failure::bad(format!(
            "field '{field}' is not a PNG or JPEG image"
        ))),
    }
}

/// A `w`x`h` image against the pixel limit: 413 over it, 400 when empty. However high the
/// limit is set, it stops where a decoded buffer (at most 8 bytes a pixel) could no longer be
/// addressed, since the decoders refuse such images with an error of their own.
fn check_size(field: &str, (w, h): (u32, u32), max_pixels: u64) -> Result<(), Failure> {
    let max_pixels = max_pixels.min(isize::MAX as u64 / 8);
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(Failure::PayloadTooLarge(format!(
            "field '{field}': image is {w}x{h} = {pixels} pixels, over the limit of {max_pixels}"
        )));
    }
    if pixels == 0 {
        return Err(Failure::bad(format!("field '{field}': image is empty")));
    }
    Ok(())
}

/// The decoded pixel buffer (`bytes` for a `w`x`h` image) against the byte budget the pixel
/// limit implies, before it is allocated.
fn check_decoded_bytes(
    field: &str,
    (w, h): (u32, u32),
    bytes: u64,
    max_pixels: u64,
) -> Result<(), Failure> {
    let budget = max_pixels.saturating_mul(BYTES_PER_LIMIT_PIXEL);
    if bytes > budget {
        return Err(Failure::PayloadTooLarge(format!(
            "field '{field}': image is {w}x{h} with {} bytes a pixel ({bytes} bytes decoded), over \
             the limit of {budget} bytes ({max_pixels} pixels at {BYTES_PER_LIMIT_PIXEL} bytes); \
             send 8-bit samples or a smaller image",
            bytes / (w as u64 * h as u64).max(1)
        )));
    }
    Ok(())
}

/// Width and height from a PNG's IHDR, which must be the first chunk, read by hand so that the
/// pixel limit is checked before any library (and any library limit) sees the image. `None`
/// when there is no well-placed IHDR; the PNG decoder then says what is wrong.
fn png_header_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let ihdr = bytes.get(8..24)?;
    if ihdr[..8] != [0, 0, 0, 13, b'I', b'H', b'D', b'R'] {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    Some((be(&ihdr[8..12]), be(&ihdr[12..16])))
}

fn png_error(field: &str, e: png::DecodingError) -> Failure {
    match e {
        png::DecodingError::LimitsExceeded => Failure::bad(format!(
            "field '{field}': the PNG's metadata chunks (eXIf and the like) take more than \
             {PNG_METADATA_BYTES} bytes; strip the metadata and send it again"
        )),
        png::DecodingError::Parameter(e) => {
            Failure::Internal(format!("field '{field}': decoding PNG: {e}"))
        }
        e => Failure::bad(format!("field '{field}': corrupt PNG image: {e}")),
    }
}

/// A JPEG error: a library limit is a 413 (naming the size where the header gave it), the
/// rest 400s.
fn jpeg_error(field: &str, e: ImageError, size: Option<(u32, u32)>, max_pixels: u64) -> Failure {
    match e {
        ImageError::Limits(e) => Failure::PayloadTooLarge(format!(
            "field '{field}': image{} is over the decoder's limits ({e}); the limit is \
             {max_pixels} pixels",
            size.map(|(w, h)| format!(" of {w}x{h}"))
                .unwrap_or_default()
        )),
        e => Failure::bad(format!("field '{field}': corrupt JPEG image: {e}")),
    }
}

/// A PNG reader positioned at the pixel data, its size checked against the limit. Skips ICC
/// and text chunks without reading them into memory and caps what it keeps.
fn png_reader<'a>(
    field: &str,
    bytes: &'a [u8],
    max_pixels: u64,
) -> Result<png::Reader<Cursor<&'a [u8]>>, Failure> {
    let mut row = 0;
    if let Some(size) = png_header_size(bytes) {
        check_size(field, size, max_pixels)?;
        // The decoder counts one output row (at most 8 bytes a pixel) against its limit.
        row = (size.0 as usize).saturating_mul(8);
    }
    let limits = png::Limits {
        bytes: PNG_METADATA_BYTES.saturating_add(row),
    };
    let mut decoder = png::Decoder::new_with_limits(Cursor::new(bytes), limits);
    decoder.set_ignore_iccp_chunk(true);
    decoder.set_ignore_text_chunk(true);
    // What the image crate asks for: expand palettes and samples under 8 bits, keep 16 bits.
    decoder.set_transformations(png::Transformations::EXPAND);
    let reader = decoder.read_info().map_err(|e| png_error(field, e))?;
    check_size(field, reader.info().size(), max_pixels)?;
    Ok(reader)
}

/// Reads the frame as `P` pixels of `S` samples (PNG stores 16-bit samples big-endian).
fn png_frame<P: Pixel<Subpixel = S>, S: bytemuck::Pod>(
    field: &str,
    reader: &mut png::Reader<Cursor<&[u8]>>,
    len: usize,
) -> Result<ImageBuffer<P, Vec<S>>, Failure> {
    let (w, h) = reader.info().size();
    let mut samples = vec![S::zeroed(); len / std::mem::size_of::<S>()];
    reader
        .next_frame(bytemuck::cast_slice_mut(&mut samples))
        .map_err(|e| png_error(field, e))?;
    if std::mem::size_of::<S>() == 2 {
        for s in bytemuck::cast_slice_mut::<S, u16>(&mut samples) {
            *s = u16::from_be(*s);
        }
    }
    ImageBuffer::from_raw(w, h, samples)
        .ok_or_else(|| Failure::Internal(format!("field '{field}': PNG frame size mismatch")))
}

/// Decodes a PNG as the image crate's PNG decoder does (same transformations, same pixel
/// types), but with the bounds above.
fn decode_png(field: &str, bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, Failure> {
    use png::{BitDepth::*, ColorType::*};
    let mut reader = png_reader(field, bytes, max_pixels)?;
    let size = reader.info().size();
    let len = reader.output_buffer_size().ok_or_else(|| {
        Failure::PayloadTooLarge(format!(
            "field '{field}': image is {}x{}, too large to decode here (the limit is \
             {max_pixels} pixels)",
            size.0, size.1
        ))
    })?;
    check_decoded_bytes(field, size, len as u64, max_pixels)?;
    let output = reader.output_color_type();
    let r = &mut reader;
    Ok(match output {
        (Grayscale, Eight) => DynamicImage::ImageLuma8(png_frame(field, r, len)?),
        (Grayscale, Sixteen) => DynamicImage::ImageLuma16(png_frame(field, r, len)?),
        (GrayscaleAlpha, Eight) => DynamicImage::ImageLumaA8(png_frame(field, r, len)?),
        (GrayscaleAlpha, Sixteen) => DynamicImage::ImageLumaA16(png_frame(field, r, len)?),
        (Rgb, Eight) => DynamicImage::ImageRgb8(png_frame(field, r, len)?),
        (Rgb, Sixteen) => DynamicImage::ImageRgb16(png_frame(field, r, len)?),
        (Rgba, Eight) => DynamicImage::ImageRgba8(png_frame(field, r, len)?),
        (Rgba, Sixteen) => DynamicImage::ImageRgba16(png_frame(field, r, len)?),
        (color, depth) => {
            return Err(Failure::bad(format!(
                "field '{field}': PNG {color:?} at {depth:?} bits is not supported"
            )))
        }
    })
}

/// A JPEG decoder with the headers read (no pixels yet), its size checked against the limit.
fn jpeg_decoder<'a>(
    field: &str,
    bytes: &'a [u8],
    max_pixels: u64,
) -> Result<JpegDecoder<Cursor<&'a [u8]>>, Failure> {
    let decoder =
        JpegDecoder::new(Cursor::new(bytes)).map_err(|e| jpeg_error(field, e, None, max_pixels))?;
    check_size(field, decoder.dimensions(), max_pixels)?;
    Ok(decoder)
}

fn decode_jpeg(field: &str, bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, Failure> {
    let mut decoder = jpeg_decoder(field, bytes, max_pixels)?;
    let (w, h) = decoder.dimensions();
    check_decoded_bytes(field, (w, h), decoder.total_bytes(), max_pixels)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    limits.max_alloc = Some(max_pixels.saturating_mul(BYTES_PER_LIMIT_PIXEL));
    let error = |e| jpeg_error(field, e, Some((w, h)), max_pixels);
    decoder.set_limits(limits).map_err(error)?;
    DynamicImage::from_decoder(decoder).map_err(error)
}

fn dimensions_within(field: &str, bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), Failure> {
    match detect(field, bytes)? {
        ImageFormat::Png => Ok(png_reader(field, bytes, max_pixels)?.info().size()),
        _ => Ok(jpeg_decoder(field, bytes, max_pixels)?.dimensions()),
    }
}

fn decode_within(field: &str, bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, Failure> {
    match detect(field, bytes)? {
        ImageFormat::Png => decode_png(field, bytes, max_pixels),
        _ => decode_jpeg(field, bytes, max_pixels),
    }
}

thread_local! {
    /// Set while this thread runs a decoder under [`contained`].
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether a panic raised at `file` (a source path, as `std::panic::Location` gives it) on
/// this thread is one [`decode`] and [`dimensions`] contain: raised by a decoder (zune-jpeg,
/// png) that runs under them right now. A panic hook may leave such panics unreported; the
/// same decoders' panics elsewhere are not contained and stay reported.
pub fn panic_is_contained(file: &str) -> bool {
    CONTAINING.with(|c| c.get()) && ["/zune-jpeg-", "/png-"].iter().any(|c| file.contains(c))
}

/// Runs a decoder over a client's bytes: a panic inside it is this image's 400 (see the
/// module docs), never the caller's.
fn contained<T>(field: &str, decode: impl FnOnce() -> Result<T, Failure>) -> Result<T, Failure> {
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode));
    CONTAINING.with(|c| c.set(outer));
    result.unwrap_or_else(|_| {
        Err(Failure::bad(format!(
            "field '{field}': the image is corrupt (its decoder failed on it)"
        )))
    })
}

/// Decodes standard base64 as clients send images in JSON: missing padding, embedded
/// whitespace and a `data:...;base64,` prefix are accepted. `field` names the JSON field in
/// the error message (a 400).
pub fn base64_decode(field: &str, text: impl AsRef<[u8]>) -> Result<Vec<u8>, Failure> {
    use base64::Engine;
    let text = text.as_ref();
    // Images are megabytes of text: look for the data-URL prefix only at the start, and take
    // the common case (no whitespace) straight to the decoder without copying.
    let text = match text.strip_prefix(b"data:") {
        Some(rest) => match rest[..rest.len().min(256)]
            .windows(8)
            .position(|w| w == b";base64,")
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
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(bytes) = base64_decode_parallel(&engine, text) {
        return Ok(bytes);
    }
    if let Ok(bytes) = engine.decode(text) {
        return Ok(bytes);
    }
    let cleaned: Vec<u8> = text
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    engine
        .decode(&cleaned)
        .map_err(|e| Failure::bad(format!("field '{field}' is not valid base64: {e}")))
}

/// Text past which [`base64_decode`] and [`base64_encode`] split the work across threads
/// (natively, on the process's one pool: at most one thread a core however many requests
/// decode at once; a handler in the sandbox has one thread).
#[cfg(not(target_arch = "wasm32"))]
const PARALLEL_BASE64_BYTES: usize = 512 << 10;

/// Decodes clean base64 (no whitespace, padding only at the end) in pieces of whole 4-character
/// groups side by side. `None` when the text is short, or not clean: the caller decodes it
/// whole (and words any error).
#[cfg(not(target_arch = "wasm32"))]
fn base64_decode_parallel(engine: &base64::engine::GeneralPurpose, text: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    use rayon::prelude::*;
    if text.len() < 2 * PARALLEL_BASE64_BYTES {
        return None;
    }
    let piece = PARALLEL_BASE64_BYTES;
    let (full, last) = text.split_at((text.len() - 1) / piece * piece);
    // Every piece but the last is whole groups without padding, so each decodes to exactly
    // three quarters of its length.
    let mut out = vec![0u8; full.len() / 4 * 3 + last.len().div_ceil(4) * 3];
    let (head, tail) = out.split_at_mut(full.len() / 4 * 3);
    let (heads, tail_len) = rayon::join(
        || {
            full.par_chunks(piece)
                .zip(head.par_chunks_mut(piece / 4 * 3))
                .all(|(text, out)| engine.decode_slice(text, out) == Ok(out.len()))
        },
        || engine.decode_slice(last, tail).ok(),
    );
    if !heads {
        return None;
    }
    out.truncate(full.len() / 4 * 3 + tail_len?);
    Some(out)
}

/// Standard base64 with padding, as responses carry images; long input is encoded in pieces
/// side by side natively (the same text).
pub fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    let engine = &base64::engine::general_purpose::STANDARD;
    #[cfg(not(target_arch = "wasm32"))]
    if bytes.len() >= 2 * PARALLEL_BASE64_BYTES {
        use rayon::prelude::*;
        // Pieces of whole 3-byte groups encode to exactly 4/3 their length, unpadded.
        let piece = PARALLEL_BASE64_BYTES / 3 * 3;
        let mut text = vec![0u8; bytes.len().div_ceil(3) * 4];
        bytes
            .par_chunks(piece)
            .zip(text.par_chunks_mut(piece / 3 * 4))
            .for_each(|(bytes, text)| {
                let n = engine.encode_slice(bytes, text).expect("sized for it");
                debug_assert_eq!(n, text.len());
            });
        return String::from_utf8(text).expect("base64 is ASCII");
    }
    engine.encode(bytes)
}

/// Width and height from the image header alone (no pixel decoding), checked against
/// `max_pixels`: over it is a 413.
pub fn dimensions(field: &str, bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), Failure> {
    contained(field, || dimensions_within(field, bytes, max_pixels))
}

/// Decodes PNG or JPEG bytes, checking the pixel count against `max_pixels` *before* decoding
/// (413 over it) and bounding everything the decoder allocates (see the module docs). `field`
/// names the request field in error messages.
pub fn decode(field: &str, bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, Failure> {
    contained(field, || decode_within(field, bytes, max_pixels))
}

/// One 8-bit channel the way PIL's `convert("L")` makes it (ITU-R 601-2 luma,
/// `L = R * 299/1000 + G * 587/1000 + B * 114/1000`, in PIL's fixed-point rounding), so masks
/// match Python pipelines bit for bit.
pub fn luma_pil(img: DynamicImage) -> GrayImage {
    if let DynamicImage::ImageLuma8(g) = img {
        return g;
    }
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    let luma = rgb
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0;
            ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    GrayImage::from_raw(w, h, luma).expect("size matches")
}

/// The `cw`x`ch` rectangle at (`x`, `y`) of an interleaved `w`x`h` image with `c` channels
/// (`None` when it does not fit).
pub fn crop(
    data: &[u8],
    (w, h, c): (usize, usize, usize),
    (x, y, cw, ch): (usize, usize, usize, usize),
) -> Option<Vec<u8>> {
    if x.checked_add(cw)? > w || y.checked_add(ch)? > h || data.len() != w * h * c {
        return None;
    }
    let row = cw * c;
    let mut pixels = vec![0u8; row * ch];
    if row > 0 {
        for_bands(&mut pixels, row, band_rows(row), |y0, band| {
            for (i, dst) in band.chunks_exact_mut(row).enumerate() {
                let from = ((y + y0 + i) * w + x) * c;
                dst.copy_from_slice(&data[from..from + row]);
            }
        });
    }
    Some(pixels)
}

/// Pads an interleaved `w`x`h` image with `c` channels at the bottom and right to `pw`x`ph`
/// with zeros.
pub fn pad_zero(data: &[u8], w: usize, h: usize, c: usize, pw: usize, ph: usize) -> Vec<u8> {
    let (row, src) = (pw * c, w * c);
    let mut out = vec![0u8; row * ph];
    if row > 0 {
        for_bands(&mut out, row, band_rows(row), |y0, band| {
            for (y, dst) in (y0..h).zip(band.chunks_exact_mut(row)) {
                dst[..src].copy_from_slice(&data[y * src..(y + 1) * src]);
            }
        });
    }
    out
}

/// Rows in a band of [`for_bands`] for rows of `row_len` bytes: about 256 KiB.
fn band_rows(row_len: usize) -> usize {
    ((256 << 10) / row_len.max(1)).max(1)
}

/// `f` over `items`, in order: side by side natively (on the process's one pool, a thread a
/// core), one by one in the sandbox.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync + Send) -> Vec<R> {
    #[cfg(not(target_arch = "wasm32"))]
    if items.len() > 1 {
        use rayon::prelude::*;
        return items.par_iter().map(f).collect();
    }
    items.iter().map(f).collect()
}

/// Runs `f(first_row, rows)` over `data` (rows of `row_len` bytes) in bands of `band` rows:
/// side by side natively, one by one in the sandbox.
fn for_bands(data: &mut [u8], row_len: usize, band: usize, f: impl Fn(usize, &mut [u8]) + Sync) {
    let chunk = (row_len * band).max(1);
    #[cfg(not(target_arch = "wasm32"))]
    if data.len() > chunk {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(i, rows)| f(i * band, rows));
        return;
    }
    for (i, rows) in data.chunks_mut(chunk).enumerate() {
        f(i * band, rows);
    }
}

/// Dilates a binary `w`x`h` mask (nonzero = set) once with a `k`x`k` square of ones, as
/// OpenCV's `cv2.dilate(mask, np.ones((k, k)))` does: anchor at the kernel's centre (`k / 2`),
/// pixels outside the image ignored. Returns 0/1. Separable (rows, then columns), each pass a
/// sliding count of set pixels, so the cost does not grow with `k`; each pass works on bands
/// of rows apart (side by side natively).
pub fn dilate_square(mask: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
    if k <= 1 || w == 0 || h == 0 {
        return mask.iter().map(|&v| (v != 0) as u8).collect();
    }
    let (before, after, band) = (k / 2, k - 1 - k / 2, band_rows(w));
    // Rows: out[x] = any(row[x - before ..= x + after]), a sliding count along the row.
    let mut rows = vec![0u8; w * h];
    for_bands(&mut rows, w, band, |y0, band| {
        for (i, dst) in band.chunks_exact_mut(w).enumerate() {
            let src = &mask[(y0 + i) * w..(y0 + i + 1) * w];
            let mut count = src[..(after + 1).min(w)]
                .iter()
                .filter(|&&v| v != 0)
                .count();
            for x in 0..w {
                dst[x] = (count > 0) as u8;
                if x + after + 1 < w {
                    count += (src[x + after + 1] != 0) as usize;
                }
                if x >= before {
                    count -= (src[x - before] != 0) as usize;
                }
            }
        }
    });
    // Columns: the same sliding count, kept per column and advanced a whole row at a time
    // (row-major, so it streams through memory); a band starts from the rows in its first
    // row's window.
    let rows = &rows;
    let row = |y: usize| &rows[y * w..(y + 1) * w];
    let mut out = vec![0u8; w * h];
    for_bands(&mut out, w, band, |y0, band| {
        let mut count = vec![0u32; w];
        for y in y0.saturating_sub(before)..(y0 + after + 1).min(h) {
            for (c, &v) in count.iter_mut().zip(row(y)) {
                *c += v as u32;
            }
        }
        for (i, dst) in band.chunks_exact_mut(w).enumerate() {
            let y = y0 + i;
            for (o, &c) in dst.iter_mut().zip(&count) {
                *o = (c > 0) as u8;
            }
            if y + after + 1 < h {
                for (c, &v) in count.iter_mut().zip(row(y + after + 1)) {
                    *c += v as u32;
                }
            }
            if y >= before {
                for (c, &v) in count.iter_mut().zip(row(y - before)) {
                    *c -= v as u32;
                }
            }
        }
    });
    out
}

/// Encodes as PNG (lossless) with fast compression and the Sub filter: on photo-like content
/// zlib's default level with adaptive filtering costs ~45x the time for ~45% fewer bytes
/// (`examples/codec_bench.rs`), and a response is latency, not storage. 8-bit images are cut
/// into strips compressed side by side natively (`png_out`), the same bytes in the sandbox;
/// others (16-bit, float) go through the image crate's encoder.
pub fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, Failure> {
    let size = (img.width(), img.height());
    match img {
        DynamicImage::ImageLuma8(i) => return encode_png_pixels(i.as_raw(), size, 1),
        DynamicImage::ImageLumaA8(i) => return encode_png_pixels(i.as_raw(), size, 2),
        DynamicImage::ImageRgb8(i) => return encode_png_pixels(i.as_raw(), size, 3),
        DynamicImage::ImageRgba8(i) => return encode_png_pixels(i.as_raw(), size, 4),
        _ => {}
    }
    use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
    let mut out = Vec::new();
    let enc = PngEncoder::new_with_quality(&mut out, CompressionType::Fast, PngFilter::Sub);
    img.write_with_encoder(enc)
        .map_err(|e| Failure::Internal(format!("encoding PNG: {e}")))?;
    Ok(out)
}

/// [`encode_png`] of 8-bit interleaved pixels (`cn` 1 to 4 channels: grey, grey+alpha, RGB,
/// RGBA) without building an image first: the same bytes.
pub fn encode_png_pixels(data: &[u8], (w, h): (u32, u32), cn: usize) -> Result<Vec<u8>, Failure> {
    png_out::encode(data, (w, h), cn).ok_or_else(|| {
        Failure::Internal(format!(
            "cannot encode {} bytes as a {w}x{h} PNG of {cn} channels",
            data.len()
        ))
    })
}

/// Encodes as JPEG at the given quality (1-100).
pub fn encode_jpeg(img: &DynamicImage, quality: u8) -> Result<Vec<u8>, Failure> {
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100));
    img.to_rgb8()
        .write_with_encoder(enc)
        .map_err(|e| Failure::Internal(format!("encoding JPEG: {e}")))?;
    Ok(out)
}

/// Encodes as PNG, or as JPEG (quality 95) when `jpeg`.
pub fn encode(img: &DynamicImage, jpeg: bool) -> Result<Vec<u8>, Failure> {
    if jpeg {
        encode_jpeg(img, 95)
    } else {
        encode_png(img)
    }
}

/// The size SAM's `ResizeLongestSide(target)` gives an `w`x`h` image: the longest side becomes
/// `target`, the other is scaled and rounded half up.
pub fn longest_side_shape(w: u32, h: u32, target: u32) -> (u32, u32) {
    let scale = target as f64 / w.max(h) as f64;
    (
        (w as f64 * scale + 0.5) as u32,
        (h as f64 * scale + 0.5) as u32,
    )
}

/// PIL's `Image.resize((dw, dh), BILINEAR)` on interleaved 8-bit pixels (`cn` 1, 3 or 4):
/// Pillow's convolution (a triangle filter widened when shrinking, so it antialiases) in its
/// fixed-point arithmetic, by `fast_image_resize`, which uses SIMD where the CPU has it and
/// gives the same bytes without.
pub fn resize_pil_bilinear(
    src: &[u8],
    (sw, sh): (usize, usize),
    cn: usize,
    (dw, dh): (usize, usize),
) -> Vec<u8> {
    use fast_image_resize as fr;
    assert_eq!(
        src.len(),
        sw * sh * cn,
        "pixel buffer does not match its size"
    );
    if (sw, sh) == (dw, dh) {
        return src.to_vec();
    }
    let pixel = match cn {
        1 => fr::PixelType::U8,
        3 => fr::PixelType::U8x3,
        4 => fr::PixelType::U8x4,
        _ => panic!("{cn} channels"),
    };
    let input = fr::images::ImageRef::new(sw as u32, sh as u32, src, pixel).expect("size checked");
    let mut out = fr::images::Image::new(dw as u32, dh as u32, pixel);
    let options = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
        .use_alpha(false);
    fr::Resizer::new()
        .resize(&input, &mut out, &options)
        .expect("same pixel type, sizes checked");
    out.into_vec()
}

/// Resizes so the longest side is `target` with PIL's bilinear ([`resize_pil_bilinear`]):
/// what SAM's predictor does (`ResizeLongestSide`, PIL underneath).
pub fn resize_longest_side(img: &RgbImage, target: u32) -> RgbImage {
    let (w, h) = longest_side_shape(img.width(), img.height(), target);
    let (sw, sh) = (img.width() as usize, img.height() as usize);
    let data = resize_pil_bilinear(img.as_raw(), (sw, sh), 3, (w as usize, h as usize));
    RgbImage::from_raw(w, h, data).expect("size matches")
}

/// Resizes to exactly `w`x`h` with the given filter.
pub fn resize(img: &DynamicImage, w: u32, h: u32, filter: FilterType) -> DynamicImage {
    img.resize_exact(w, h, filter)
}

/// Source index for position `i` of an axis of length `n` extended with numpy's `symmetric`
/// padding (mirror including the edge sample, repeated as often as needed).
pub fn symmetric_index(i: usize, n: usize) -> usize {
    let period = 2 * n;
    let j = i % period;
    if j < n {
        j
    } else {
        period - 1 - j
    }
}

/// Pads an interleaved `h`x`w` image with `c` channels at the bottom and right to
/// `ph`x`pw` using symmetric padding (numpy `np.pad(..., mode="symmetric")`).
pub fn pad_symmetric(data: &[u8], w: usize, h: usize, c: usize, pw: usize, ph: usize) -> Vec<u8> {
    let (out_row, src) = (pw * c, w * c);
    let mut out = vec![0u8; out_row * ph];
    if out_row > 0 {
        for_bands(&mut out, out_row, band_rows(out_row), |y0, band| {
            for (i, dst) in band.chunks_exact_mut(out_row).enumerate() {
                let sy = symmetric_index(y0 + i, h);
                let row = &data[sy * src..(sy + 1) * src];
                dst[..src].copy_from_slice(row);
                for x in w..pw {
                    let sx = symmetric_index(x, w);
                    dst[x * c..(x + 1) * c].copy_from_slice(&row[sx * c..(sx + 1) * c]);
                }
            }
        });
    }
    out
}

/// The size `cv2.resize(src, (0, 0), fx=f, fy=f)` produces: each side times `f`, rounded to
/// nearest (ties to even, as `cvRound`).
pub fn cv2_scaled_size(w: usize, h: usize, f: f64) -> (usize, usize) {
    (
        (w as f64 * f).round_ties_even() as usize,
        (h as f64 * f).round_ties_even() as usize,
    )
}

const COEF_BITS: i32 = 11;
const COEF_SCALE: f32 = (1 << COEF_BITS) as f32;

/// The two source indices and fixed-point weights per destination index, as OpenCV computes
/// them for INTER_LINEAR (float maths, weights rounded to 1/2048). Columns past a border are
/// clamped with their weight moved onto the edge pixel; rows keep their weights and read the
/// edge row twice (OpenCV treats the two directions differently, and it shows in the rounding).
fn cv2_linear_taps(
    src: usize,
    dst: usize,
    scale: f64,
    columns: bool,
) -> Vec<(usize, usize, i32, i32)> {
    (0..dst)
        .map(|d| {
            let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i64;
            f -= s as f32;
            if columns && s < 0 {
                f = 0.0;
                s = 0;
            }
            if columns && s >= src as i64 - 1 {
                f = 0.0;
                s = src as i64 - 1;
            }
            let a0 = ((1.0 - f) * COEF_SCALE).round_ties_even() as i32;
            let a1 = (f * COEF_SCALE).round_ties_even() as i32;
            let clamp = |i: i64| i.clamp(0, src as i64 - 1) as usize;
            (clamp(s), clamp(s + 1), a0, a1)
        })
        .collect()
}

/// `cv2.resize(..., interpolation=cv2.INTER_LINEAR)` on 8-bit interleaved pixels (`cn`
/// channels), bit for bit as opencv-python computes it on x86: fixed-point horizontal pass,
/// vertical pass with the SIMD build's rounding, and the 2x2
/// averaging OpenCV switches to for an exact halving. `inv_scale` is `(fx, fy)` when the caller
/// gave scale factors (`dsize=(0, 0)`); otherwise the ratio of the sizes is used.
pub fn resize_cv2_linear(
    src: &[u8],
    (sw, sh): (usize, usize),
    cn: usize,
    (dw, dh): (usize, usize),
    inv_scale: Option<(f64, f64)>,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        sw * sh * cn,
        "pixel buffer does not match its size"
    );
    let (fx, fy) = inv_scale.unwrap_or((dw as f64 / sw as f64, dh as f64 / sh as f64));
    let (scale_x, scale_y) = (1.0 / fx, 1.0 / fy);
    if (dw, dh) == (sw, sh) {
        return src.to_vec();
    }
    if scale_x == 2.0 && scale_y == 2.0 && sw == 2 * dw && sh == 2 * dh {
        let mut out = Vec::with_capacity(dw * dh * cn);
        for y in 0..dh {
            for x in 0..dw {
                for c in 0..cn {
                    let at = |yy: usize, xx: usize| src[(yy * sw + xx) * cn + c] as u32;
                    let s = at(2 * y, 2 * x)
                        + at(2 * y, 2 * x + 1)
                        + at(2 * y + 1, 2 * x)
                        + at(2 * y + 1, 2 * x + 1);
                    out.push(((s + 2) >> 2) as u8);
                }
            }
        }
        return out;
    }
    let xt = cv2_linear_taps(sw, dw, scale_x, true);
    let yt = cv2_linear_taps(sh, dh, scale_y, false);
    let width = dw * cn;
    let hrow = |y: usize| -> Vec<i32> {
        let row = &src[y * sw * cn..(y + 1) * sw * cn];
        let mut out = Vec::with_capacity(width);
        for &(sx, sx1, a0, a1) in &xt {
            for c in 0..cn {
                out.push(row[sx * cn + c] as i32 * a0 + row[sx1 * cn + c] as i32 * a1);
            }
        }
        out
    };
    let mut out = vec![0u8; dh * width];
    // The horizontal passes of the two source rows in use, computed on first use (rows are
    // shared by neighbouring output rows when scaling up, skipped when scaling down; output
    // rows read source rows in increasing order, so two are all that is ever kept).
    let mut kept: Vec<(usize, Vec<i32>)> = Vec::with_capacity(2);
    for (dy, &(sy, sy1, b0, b1)) in yt.iter().enumerate() {
        let mut take = |y: usize| match kept.iter().position(|(ky, _)| *ky == y) {
            Some(i) => kept.swap_remove(i).1,
            None => hrow(y),
        };
        let r0 = take(sy);
        let r1 = if sy1 == sy { r0.clone() } else { take(sy1) };
        let dst = &mut out[dy * width..(dy + 1) * width];
        for x in 0..width {
            // OpenCV's SIMD rounding (VResizeLinearVec_32s8u), which covers whole rows there.
            let m = |s: i32, b: i32| ((s >> 4) * b) >> 16;
            dst[x] = ((m(r0[x], b0) + m(r1[x], b1) + 2) >> 2).clamp(0, 255) as u8;
        }
        kept = vec![(sy, r0), (sy1, r1)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_a_decoder_is_a_400() {
        let got: Result<(), Failure> = contained("image", || panic!("a decoder's bug"));
        assert_eq!(
            got,
            Err(Failure::bad(
                "field 'image': the image is corrupt (its decoder failed on it)"
            ))
        );
    }

    #[test]
    fn only_a_decoder_panic_under_contained_counts_as_contained() {
        let decoder = "/cargo/registry/src/index/png-0.17.16/src/decoder/stream.rs";
        let ours = "host/src/main.rs";
        assert!(!panic_is_contained(decoder));
        let inside = contained("image", || {
            Ok((panic_is_contained(decoder), panic_is_contained(ours)))
        });
        assert_eq!(inside, Ok((true, false)));
        // Cleared again after a panic too.
        let _ = contained("image", || -> Result<(), Failure> {
            panic!("a decoder's bug")
        });
        assert!(!panic_is_contained(decoder));
    }

    /// Counts this thread's heap bytes, so a test can see the peak a decode reaches (other
    /// tests run on other threads and do not disturb it).
    mod heap {
        use std::alloc::{GlobalAlloc, Layout, System};
        use std::cell::Cell;

        struct Counting;

        thread_local! {
            static LIVE: Cell<isize> = const { Cell::new(0) };
            static PEAK: Cell<isize> = const { Cell::new(0) };
        }

        fn track(delta: isize) {
            let _ = LIVE.try_with(|live| {
                live.set(live.get() + delta);
                let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
            });
        }

        unsafe impl GlobalAlloc for Counting {
            unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
                let p = unsafe { System.alloc(layout) };
                if !p.is_null() {
                    track(layout.size() as isize);
                }
                p
            }
            unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
                let p = unsafe { System.alloc_zeroed(layout) };
                if !p.is_null() {
                    track(layout.size() as isize);
                }
                p
            }
            unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
                unsafe { System.dealloc(p, layout) };
                track(-(layout.size() as isize));
            }
            unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
                let q = unsafe { System.realloc(p, layout, size) };
                if !q.is_null() {
                    track(size as isize - layout.size() as isize);
                }
                q
            }
        }

        #[global_allocator]
        static COUNTING: Counting = Counting;

        /// `f`'s result and the most heap it held at once beyond what was live before.
        pub fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
            let start = LIVE.with(Cell::get);
            PEAK.with(|p| p.set(start));
            let r = f();
            (r, (PEAK.with(Cell::get) - start).max(0) as usize)
        }
    }

    /// A PNG chunk: length, type, data, CRC of type and data.
    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
        out
    }

    /// `png` with `chunks` inserted right after its IHDR (where iCCP must be).
    fn after_ihdr(png: &[u8], chunks: &[Vec<u8>]) -> Vec<u8> {
        let at = 8 + 8 + 13 + 4;
        assert_eq!(&png[12..16], b"IHDR");
        let mut out = png[..at].to_vec();
        chunks.iter().for_each(|c| out.extend_from_slice(c));
        out.extend_from_slice(&png[at..]);
        out
    }

    /// `png` with its IHDR claiming `w`x`h` (CRC fixed up, pixel data left as it was).
    fn with_header_size(png: &[u8], w: u32, h: u32) -> Vec<u8> {
        let mut ihdr = png[16..29].to_vec();
        ihdr[..4].copy_from_slice(&w.to_be_bytes());
        ihdr[4..8].copy_from_slice(&h.to_be_bytes());
        let mut out = png[..8].to_vec();
        out.extend(chunk(b"IHDR", &ihdr));
        out.extend_from_slice(&png[33..]);
        out
    }

    /// A zlib stream of `n` zero bytes (about a thousandth of `n`).
    fn zlib_zeros(n: usize) -> Vec<u8> {
        use std::io::Write;
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        let block = vec![0u8; 1 << 20];
        for _ in 0..n / block.len() {
            z.write_all(&block).unwrap();
        }
        z.finish().unwrap()
    }

    fn noise(w: u32, h: u32, seed: u32) -> RgbImage {
        let mut s = seed;
        RgbImage::from_fn(w, h, |_, _| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            image::Rgb([(s >> 24) as u8, (s >> 16) as u8, (s >> 8) as u8])
        })
    }

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        encode_png(img).unwrap()
    }

    /// A PNG written with the png crate directly (palettes, low bit depths).
    fn raw_png(
        (w, h): (u32, u32),
        color: png::ColorType,
        depth: png::BitDepth,
        palette: Option<(&[u8], &[u8])>,
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(depth);
        if let Some((plte, trns)) = palette {
            enc.set_palette(plte.to_vec());
            enc.set_trns(trns.to_vec());
        }
        let mut writer = enc.write_header().unwrap();
        writer.write_image_data(data).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn decoding_matches_the_image_crate() {
        let rgb = DynamicImage::ImageRgb8(noise(13, 7, 1));
        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("rgb8", png_bytes(&rgb)),
            (
                "rgba8",
                png_bytes(&DynamicImage::ImageRgba8(rgb.to_rgba8())),
            ),
            ("l8", png_bytes(&DynamicImage::ImageLuma8(rgb.to_luma8()))),
            (
                "la8",
                png_bytes(&DynamicImage::ImageLumaA8(rgb.to_luma_alpha8())),
            ),
            (
                "rgb16",
                png_bytes(&DynamicImage::ImageRgb16(rgb.to_rgb16())),
            ),
            (
                "rgba16",
                png_bytes(&DynamicImage::ImageRgba16(rgb.to_rgba16())),
            ),
            (
                "l16",
                png_bytes(&DynamicImage::ImageLuma16(rgb.to_luma16())),
            ),
            ("jpeg", encode_jpeg(&rgb, 90).unwrap()),
        ];
        let indices: Vec<u8> = (0..13 * 7).map(|i| (i * 7 % 4) as u8).collect();
        cases.push((
            "indexed+trns",
            raw_png(
                (13, 7),
                png::ColorType::Indexed,
                png::BitDepth::Eight,
                Some((&[255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9], &[255, 128, 0])),
                &indices,
            ),
        ));
        let bits: Vec<u8> = (0..16 * 3).map(|i| (i * 37) as u8).collect();
        cases.push((
            "gray1",
            raw_png(
                (128, 3),
                png::ColorType::Grayscale,
                png::BitDepth::One,
                None,
                &bits,
            ),
        ));
        for (name, bytes) in &cases {
            let want = image::load_from_memory(bytes).unwrap();
            let got = decode_within("image", bytes, DEFAULT_MAX_PIXELS).unwrap();
            assert_eq!(got.color(), want.color(), "{name}");
            assert_eq!(got.as_bytes(), want.as_bytes(), "{name}");
            assert_eq!(
                dimensions_within("image", bytes, DEFAULT_MAX_PIXELS).unwrap(),
                (want.width(), want.height()),
                "{name}"
            );
        }
    }

    #[test]
    fn png_icc_and_text_chunks_are_skipped_not_inflated() {
        let clean = png_bytes(&DynamicImage::ImageRgb8(noise(8, 8, 2)));
        // Each inflates to 64 MiB; the attack suite's iCCP inflated to 600 MB.
        let bomb = zlib_zeros(64 << 20);
        let with = |head: &[u8]| [head, &bomb[..]].concat();
        let hostile = after_ihdr(
            &clean,
            &[
                chunk(b"iCCP", &with(b"profile\0\0")),
                chunk(b"zTXt", &with(b"Comment\0\0")),
                chunk(b"iTXt", &with(b"Comment\0\x01\0\0\0")),
                chunk(b"tEXt", &[&b"Comment\0"[..], &vec![b'x'; 2 << 20]].concat()),
            ],
        );
        assert!(hostile.len() < clean.len() + (3 << 20));
        let want = decode_within("image", &clean, DEFAULT_MAX_PIXELS).unwrap();
        let (got, peak) = heap::peak(|| decode_within("image", &hostile, DEFAULT_MAX_PIXELS));
        assert_eq!(got.unwrap().as_bytes(), want.as_bytes());
        assert!(peak < 1 << 20, "decoding held {peak} bytes at once");
        let (size, peak) = heap::peak(|| dimensions_within("image", &hostile, DEFAULT_MAX_PIXELS));
        assert_eq!(size.unwrap(), (8, 8));
        assert!(
            peak < 1 << 20,
            "reading the header held {peak} bytes at once"
        );
    }

    #[test]
    fn oversized_or_malformed_png_chunks_are_400() {
        let clean = png_bytes(&DynamicImage::ImageRgb8(noise(8, 8, 3)));
        let exif = after_ihdr(&clean, &[chunk(b"eXIf", &vec![0; 2 << 20])]);
        let bad = |bytes: &[u8]| match decode_within("image", bytes, DEFAULT_MAX_PIXELS) {
            Err(Failure::BadRequest(m)) => m,
            other => panic!(
                "expected a 400, got {:?}",
                other.map(|i| (i.width(), i.height()))
            ),
        };
        let (msg, peak) = heap::peak(|| bad(&exif));
        assert!(msg.contains("metadata"), "{msg}");
        assert!(peak < 2 << 20, "held {peak} bytes at once");
        // Chunk length past the end of the data.
        let mut truncated = after_ihdr(&clean, &[chunk(b"eXIf", &[0; 16])]);
        truncated.truncate(33 + 12);
        assert!(bad(&truncated).contains("corrupt PNG"));
        // Corrupt IDAT checksum (critical chunk).
        let mut crc = clean.clone();
        let idat = crc.windows(4).position(|w| w == b"IDAT").unwrap();
        crc[idat + 5] ^= 0xff;
        assert!(bad(&crc).contains("corrupt PNG"));
    }

    #[test]
    fn oversize_images_are_413_before_any_pixel_buffer() {
        let png = png_bytes(&DynamicImage::ImageRgb8(noise(8, 8, 4)));
        let huge = with_header_size(&png, 30000, 30000);
        // So large the PNG decoder's own header checks fail (its output buffer would overflow
        // isize, as 30000x30000 does on wasm32): a 413 all the same.
        let max = i32::MAX as u32;
        let largest = with_header_size(&png, max, max);
        let mut jpeg = encode_jpeg(&DynamicImage::ImageRgb8(noise(8, 8, 5)), 90).unwrap();
        let sof = jpeg.windows(2).position(|w| w == [0xff, 0xc0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xea, 0x60, 0xea, 0x60]); // 60000x60000
        for (name, bytes, size) in [
            ("png", &huge, "30000x30000"),
            ("png", &largest, "2147483647x2147483647"),
            ("jpeg", &jpeg, "60000x60000"),
        ] {
            for (what, (r, peak)) in [
                (
                    "decode",
                    heap::peak(|| decode_within("image", bytes, DEFAULT_MAX_PIXELS).map(|_| ())),
                ),
                (
                    "dimensions",
                    heap::peak(|| {
                        dimensions_within("image", bytes, DEFAULT_MAX_PIXELS).map(|_| ())
                    }),
                ),
            ] {
                match r {
                    Err(Failure::PayloadTooLarge(m)) => {
                        assert!(
                            m.contains(size) && m.contains("over the limit of 40000000"),
                            "{m}"
                        )
                    }
                    other => panic!("{name} {what}: expected a 413, got {other:?}"),
                }
                assert!(peak < 1 << 20, "{name} {what} held {peak} bytes at once");
            }
        }
        // Whatever the configured limit, one the decoder cannot address is still a 413.
        assert!(matches!(
            dimensions_within("image", &largest, u64::MAX),
            Err(Failure::PayloadTooLarge(_))
        ));
        // Within the pixel limit but over its byte budget: 8x8 RGBA at 16 bits is 512 bytes,
        // a 64-pixel limit allows 256.
        let wide = png_bytes(&DynamicImage::ImageRgba16(
            DynamicImage::ImageRgb8(noise(8, 8, 6)).to_rgba16(),
        ));
        match decode_within("image", &wide, 64) {
            Err(Failure::PayloadTooLarge(m)) => assert!(m.contains("512 bytes"), "{m}"),
            other => panic!("expected a 413, got {:?}", other.map(|i| i.color())),
        }
        assert_eq!(dimensions_within("image", &wide, 64).unwrap(), (8, 8));
        assert!(decode_within("image", &wide, 128).is_ok());
        // One pixel under and over the limit.
        assert!(decode_within("image", &png, 64).is_ok());
        assert!(matches!(
            decode_within("image", &png, 63),
            Err(Failure::PayloadTooLarge(_))
        ));
    }

    /// cv2.resize results written by `models/sd/fixtures.py` (scripts/artifacts.sh).
    #[test]
    fn linear_resize_matches_opencv() {
        use base64::Engine;
        let bytes = crate::test_fixture("sd/resize_cases.json");
        let cases: Vec<serde_json::Value> = serde_json::from_slice(&bytes).unwrap();
        assert!(cases.len() >= 10);
        let b64 = |v: &serde_json::Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap()
        };
        let n = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
        for c in &cases {
            let (w, h, cn) = (n(&c["w"]), n(&c["h"]), n(&c["cn"]));
            let (ow, oh) = (n(&c["out_w"]), n(&c["out_h"]));
            let scale = c["f"].as_f64();
            if let Some(f) = scale {
                assert_eq!(
                    cv2_scaled_size(w, h, f),
                    (ow, oh),
                    "size of {w}x{h} scaled by {f}"
                );
            }
            let got =
                resize_cv2_linear(&b64(&c["src"]), (w, h), cn, (ow, oh), scale.map(|f| (f, f)));
            let want = b64(&c["out"]);
            let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                differ,
                0,
                "{w}x{h}x{cn} -> {ow}x{oh} (f {scale:?}): {differ} of {} values differ from cv2",
                want.len()
            );
        }
    }

    #[test]
    fn dilation_equals_the_definition() {
        // The second is taller than a band of rows: windows cross the bands' edges.
        for (w, h) in [(37, 23), (29, 200)] {
            dilation_case(w, h);
        }
    }

    fn dilation_case(w: usize, h: usize) {
        let mut seed = 7u32;
        let mask: Vec<u8> = (0..w * h)
            .map(|_| {
                seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                ((seed >> 16) % 29 == 0) as u8 * 255
            })
            .collect();
        for k in [1, 2, 3, 4, 15, 40, 130] {
            let got = dilate_square(&mask, w, h, k);
            let (before, after) = (k / 2, k - 1 - k / 2);
            for y in 0..h {
                for x in 0..w {
                    let want = (y.saturating_sub(before)..(y + after + 1).min(h)).any(|yy| {
                        (x.saturating_sub(before)..(x + after + 1).min(w))
                            .any(|xx| mask[yy * w + xx] != 0)
                    });
                    assert_eq!(got[y * w + x], want as u8, "k {k} at ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn dilation_matches_opencv_anchor() {
        // cv2: dst(x) = max src(x + i - anchor), i in 0..k, anchor = k / 2. For k = 4 a pixel at
        // 3 lights x in 2..=5; for k = 3, x in 2..=4.
        let mut m = vec![0u8; 7];
        m[3] = 1;
        assert_eq!(dilate_square(&m, 7, 1, 4), vec![0, 0, 1, 1, 1, 1, 0]);
        assert_eq!(dilate_square(&m, 7, 1, 3), vec![0, 0, 1, 1, 1, 0, 0]);
        let mut sq = vec![0u8; 25];
        sq[12] = 1; // centre of 5x5
        assert_eq!(
            dilate_square(&sq, 5, 5, 3)
                .iter()
                .filter(|v| **v == 1)
                .count(),
            9
        );
    }

    #[test]
    fn pil_bilinear_is_the_same_with_and_without_simd() {
        use fast_image_resize as fr;
        for (cn, pixel) in [(1, fr::PixelType::U8), (3, fr::PixelType::U8x3)] {
            for ((sw, sh), (dw, dh)) in [((517, 333), (256, 165)), ((40, 31), (97, 70))] {
                let src: Vec<u8> = noise(sw as u32, sh as u32, 9)
                    .into_raw()
                    .into_iter()
                    .cycle()
                    .take(sw * sh * cn)
                    .collect();
                let got = resize_pil_bilinear(&src, (sw, sh), cn, (dw, dh));
                let input = fr::images::ImageRef::new(sw as u32, sh as u32, &src, pixel).unwrap();
                let mut out = fr::images::Image::new(dw as u32, dh as u32, pixel);
                let mut scalar = fr::Resizer::new();
                // SAFETY: no extension at all is supported everywhere.
                unsafe { scalar.set_cpu_extensions(fr::CpuExtensions::None) };
                let options = fr::ResizeOptions::new()
                    .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
                    .use_alpha(false);
                scalar.resize(&input, &mut out, &options).unwrap();
                assert_eq!(got, out.into_vec(), "{cn} channels {sw}x{sh} -> {dw}x{dh}");
            }
        }
    }

    #[test]
    fn base64_decodes_the_same_in_pieces() {
        use base64::Engine;
        let std = base64::engine::general_purpose::STANDARD;
        for len in [
            0usize,
            1,
            2,
            3,
            5 << 20,
            (5 << 20) + 1,
            (5 << 20) + 2,
            3 << 20,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 3) as u8).collect();
            let text = std.encode(&bytes);
            assert_eq!(base64_decode("f", &text).unwrap(), bytes, "{len}");
            let unpadded = text.trim_end_matches('=');
            assert_eq!(
                base64_decode("f", unpadded).unwrap(),
                bytes,
                "{len} unpadded"
            );
        }
        // Damage in a middle piece, and padding inside the text: the whole-text decoder's error.
        let mut text = std.encode(vec![5u8; 3 << 20]).into_bytes();
        text[2 << 20] = b'*';
        let err = base64_decode("image", &text).unwrap_err();
        assert!(
            matches!(&err, Failure::BadRequest(m) if m.contains("field 'image'")),
            "{err}"
        );
        let mut padded = std.encode(vec![5u8; 3 << 20]).into_bytes();
        padded[1 << 20] = b'=';
        assert!(base64_decode("image", &padded).is_err());
    }

    #[test]
    fn base64_encodes_the_same_in_pieces() {
        use base64::Engine;
        let std = base64::engine::general_purpose::STANDARD;
        for len in [
            0usize,
            1,
            2,
            3,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 1,
            (3 << 20) + 2,
        ] {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 13 + i / 5) as u8).collect();
            assert!(base64_encode(&bytes) == std.encode(&bytes), "{len}");
        }
    }

    #[test]
    fn png_from_pixels_is_the_same_bytes() {
        let rgb = noise(13, 9, 4);
        let want = encode_png(&DynamicImage::ImageRgb8(rgb.clone())).unwrap();
        assert_eq!(encode_png_pixels(rgb.as_raw(), (13, 9), 3).unwrap(), want);
        let gray = DynamicImage::ImageRgb8(rgb).to_luma8();
        let want = encode_png(&DynamicImage::ImageLuma8(gray.clone())).unwrap();
        assert_eq!(encode_png_pixels(gray.as_raw(), (13, 9), 1).unwrap(), want);
    }

    #[test]
    fn crop_and_zero_padding() {
        // 3x2, two channels: pixel (x, y) holds [10y + x, 100 + 10y + x].
        let img: Vec<u8> = (0..2)
            .flat_map(|y| (0..3).flat_map(move |x| [10 * y + x, 100 + 10 * y + x]))
            .collect();
        assert_eq!(
            crop(&img, (3, 2, 2), (1, 1, 2, 1)).unwrap(),
            vec![11, 111, 12, 112]
        );
        assert_eq!(crop(&img, (3, 2, 2), (0, 0, 3, 2)).unwrap(), img);
        assert_eq!(crop(&img, (3, 2, 2), (2, 0, 2, 1)), None);
        assert_eq!(crop(&img, (3, 2, 2), (usize::MAX, 0, 2, 1)), None);
        let padded = pad_zero(&img, 3, 2, 2, 4, 3);
        assert_eq!(padded.len(), 4 * 3 * 2);
        assert_eq!(crop(&padded, (4, 3, 2), (0, 0, 3, 2)).unwrap(), img);
        assert!(padded[6..8].iter().chain(&padded[14..]).all(|&v| v == 0));
    }

    #[test]
    fn padding_and_cropping_in_bands_match_the_definition() {
        // Rows of 2100 bytes: bands of 124 rows, several of them.
        let (w, h, c) = (700usize, 500usize, 3usize);
        let img: Vec<u8> = (0..w * h * c).map(|i| (i * 7 + i / 2100) as u8).collect();
        let px = |x: usize, y: usize| &img[(y * w + x) * c..(y * w + x + 1) * c];
        let (pw, ph) = (716, 520);
        let sym = pad_symmetric(&img, w, h, c, pw, ph);
        let zero = pad_zero(&img, w, h, c, pw, ph);
        for y in 0..ph {
            for x in 0..pw {
                let at = (y * pw + x) * c;
                let want = px(symmetric_index(x, w), symmetric_index(y, h));
                assert_eq!(&sym[at..at + c], want, "symmetric ({x}, {y})");
                let want: &[u8] = if x < w && y < h { px(x, y) } else { &[0; 3] };
                assert_eq!(&zero[at..at + c], want, "zero ({x}, {y})");
            }
        }
        let (cx, cy, cw, ch) = (5, 7, 600, 450);
        let cut = crop(&img, (w, h, c), (cx, cy, cw, ch)).unwrap();
        for y in 0..ch {
            for x in 0..cw {
                let at = (y * cw + x) * c;
                assert_eq!(&cut[at..at + c], px(cx + x, cy + y), "crop ({x}, {y})");
            }
        }
    }

    #[test]
    fn symmetric_padding_matches_numpy() {
        // np.pad([1, 2, 3], (0, 5), mode="symmetric") == [1, 2, 3, 3, 2, 1, 1, 2]
        let got: Vec<usize> = (0..8).map(|i| symmetric_index(i, 3) + 1).collect();
        assert_eq!(got, vec![1, 2, 3, 3, 2, 1, 1, 2]);
        let img = [1u8, 2, 3, 4]; // 2x2, one channel
        assert_eq!(
            pad_symmetric(&img, 2, 2, 1, 3, 3),
            vec![1, 2, 2, 3, 4, 4, 3, 4, 4]
        );
    }
}

/// Fixtures the reference libraries wrote under `$TESSERA_ARTIFACTS` (scripts/artifacts.sh),
/// for this crate's and the SDK's tests.
#[doc(hidden)]
pub fn test_fixture(name: &str) -> Vec<u8> {
    let dir = std::env::var("TESSERA_ARTIFACTS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/artifacts")
        });
    let path = dir.join(name);
    std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/artifacts.sh first)", path.display()))
}
