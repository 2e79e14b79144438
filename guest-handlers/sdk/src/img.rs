//! Image decoding, encoding and resizing (PNG and JPEG), with a pixel limit.
use crate::HandlerError;
pub use image::DynamicImage;
use image::{ImageFormat, RgbImage};
use std::io::Cursor;

pub use image::imageops::FilterType;
pub use image::{GrayImage, RgbImage as Rgb};

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

/// Width and height from the image header alone (no pixel decoding), checked against the
/// pixel limit.
pub fn dimensions(field: &str, bytes: &[u8]) -> Result<(u32, u32), HandlerError> {
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
    Ok((w, h))
}

/// Decodes PNG or JPEG bytes, checking the pixel count against the limit *before* decoding.
pub fn decode(field: &str, bytes: &[u8]) -> Result<DynamicImage, HandlerError> {
    dimensions(field, bytes)?;
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), detect(field, bytes)?);
    reader.no_limits();
    reader
        .decode()
        .map_err(|e| HandlerError::bad(format!("field '{field}': corrupt image: {e}")))
}

/// Decodes to 8-bit RGB.
pub fn decode_rgb(field: &str, bytes: &[u8]) -> Result<RgbImage, HandlerError> {
    Ok(decode(field, bytes)?.to_rgb8())
}

/// Dilates a binary `w`x`h` mask (nonzero = set) once with a `k`x`k` square of ones, as
/// OpenCV's `cv2.dilate(mask, np.ones((k, k)))` does: anchor at the kernel's centre (`k / 2`),
/// pixels outside the image ignored. Returns 0/1. Separable (rows, then columns), each pass a
/// sliding count of set pixels, so the cost does not grow with `k`.
pub fn dilate_square(mask: &[u8], w: usize, h: usize, k: usize) -> Vec<u8> {
    let set: Vec<u8> = mask.iter().map(|&v| (v != 0) as u8).collect();
    if k <= 1 || w == 0 || h == 0 {
        return set;
    }
    let (before, after) = (k / 2, k - 1 - k / 2);
    // Rows: out[x] = any(row[x - before ..= x + after]), a sliding count along the row.
    let mut rows = vec![0u8; w * h];
    for (src, dst) in set.chunks_exact(w).zip(rows.chunks_exact_mut(w)) {
        let mut count: usize = src[..(after + 1).min(w)].iter().map(|&v| v as usize).sum();
        for x in 0..w {
            dst[x] = (count > 0) as u8;
            if x + after + 1 < w {
                count += src[x + after + 1] as usize;
            }
            if x >= before {
                count -= src[x - before] as usize;
            }
        }
    }
    // Columns: the same sliding count, kept per column and advanced a whole row at a time
    // (row-major, so it streams through memory).
    let mut count = vec![0u32; w];
    for row in rows.chunks_exact(w).take(after + 1) {
        for (c, &v) in count.iter_mut().zip(row) {
            *c += v as u32;
        }
    }
    let mut out = vec![0u8; w * h];
    for y in 0..h {
        for (o, &c) in out[y * w..(y + 1) * w].iter_mut().zip(&count) {
            *o = (c > 0) as u8;
        }
        if y + after + 1 < h {
            for (c, &v) in count
                .iter_mut()
                .zip(&rows[(y + after + 1) * w..(y + after + 2) * w])
            {
                *c += v as u32;
            }
        }
        if y >= before {
            for (c, &v) in count
                .iter_mut()
                .zip(&rows[(y - before) * w..(y - before + 1) * w])
            {
                *c -= v as u32;
            }
        }
    }
    out
}

/// The request's `output_format`: `false` for PNG (absent or `"png"`), `true` for JPEG
/// (`"jpeg"`/`"jpg"`); anything else is a 400.
pub fn wants_jpeg(body: &serde_json::Map<String, serde_json::Value>) -> Result<bool, HandlerError> {
    match body.get("output_format").and_then(|v| v.as_str()) {
        None | Some("png") => Ok(false),
        Some("jpeg" | "jpg") => Ok(true),
        Some(other) => Err(HandlerError::bad(format!(
            "output_format '{other}' is not png or jpeg"
        ))),
    }
}

/// The seed's inpainting pair: `image` (base64 PNG/JPEG, as RGB) and `mask_image` (one channel
/// as PIL's `convert("L")`), which must be the same size.
pub fn decode_image_and_mask(
    body: &serde_json::Map<String, serde_json::Value>,
) -> Result<(RgbImage, GrayImage), HandlerError> {
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
        let (iw, ih) = image.dimensions();
        let (mw, mh) = mask.dimensions();
        return Err(HandlerError::bad(format!(
            "mask_image is {mw}x{mh} but image is {iw}x{ih}; they must be the same size"
        )));
    }
    Ok((image, mask))
}

/// Encodes as PNG (lossless) with fast compression and the Sub filter: on photo-like content
/// zlib's default level with adaptive filtering costs ~45x the time for ~45% fewer bytes
/// (`examples/codec_bench.rs`), and a response is latency, not storage.
pub fn encode_png(img: &DynamicImage) -> Result<Vec<u8>, HandlerError> {
    use image::codecs::png::{CompressionType, FilterType as PngFilter, PngEncoder};
    let mut out = Vec::new();
    let enc = PngEncoder::new_with_quality(&mut out, CompressionType::Fast, PngFilter::Sub);
    img.write_with_encoder(enc)
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

/// Encodes as PNG, or as JPEG (quality 95) when `jpeg`.
pub fn encode(img: &DynamicImage, jpeg: bool) -> Result<Vec<u8>, HandlerError> {
    if jpeg {
        encode_jpeg(img, 95)
    } else {
        encode_png(img)
    }
}

/// The `[H, W, 3]` u8 tensor a model returned as an RGB image, optionally cropped to its
/// top-left `width`x`height` (undoing padding added before the forward).
pub fn rgb_from_tensor(
    t: &crate::Tensor,
    crop: Option<(u32, u32)>,
) -> Result<DynamicImage, HandlerError> {
    let [h, w, 3] = t.shape[..] else {
        return Err(HandlerError::Internal(format!(
            "expected an [H, W, 3] image, got {:?}",
            t.shape
        )));
    };
    let (w, h) = (w as usize, h as usize);
    let (cw, ch) = crop.map_or((w, h), |(cw, ch)| (cw as usize, ch as usize));
    if cw > w || ch > h {
        return Err(HandlerError::Internal(format!(
            "cannot crop {w}x{h} to {cw}x{ch}"
        )));
    }
    let data = t.view().u8()?;
    let mut pixels = Vec::with_capacity(cw * ch * 3);
    for row in data.chunks_exact(w * 3).take(ch) {
        pixels.extend_from_slice(&row[..cw * 3]);
    }
    let rgb = RgbImage::from_raw(cw as u32, ch as u32, pixels).expect("size matches");
    Ok(DynamicImage::from(rgb))
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

/// Resizes so the longest side is `target`, with a triangle (bilinear, antialiased when
/// shrinking) filter — what PIL's `Image.resize(..., BILINEAR)` does for SAM's predictor.
pub fn resize_longest_side(img: &RgbImage, target: u32) -> RgbImage {
    let (w, h) = longest_side_shape(img.width(), img.height(), target);
    if (w, h) == img.dimensions() {
        return img.clone();
    }
    image::imageops::resize(img, w, h, FilterType::Triangle)
}

/// Resizes to exactly `w`x`h` with the given filter.
pub fn resize(img: &DynamicImage, w: u32, h: u32, filter: FilterType) -> DynamicImage {
    img.resize_exact(w, h, filter)
}

/// Decodes to one 8-bit channel the way PIL's `convert("L")` does (ITU-R 601-2 luma,
/// `L = R * 299/1000 + G * 587/1000 + B * 114/1000`, in PIL's fixed-point rounding), so masks
/// match Python pipelines bit for bit.
pub fn decode_luma_pil(field: &str, bytes: &[u8]) -> Result<GrayImage, HandlerError> {
    let img = decode(field, bytes)?;
    if let DynamicImage::ImageLuma8(g) = img {
        return Ok(g);
    }
    let rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    let luma = rgb
        .pixels()
        .map(|p| {
            let [r, g, b] = p.0;
            ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect();
    Ok(GrayImage::from_raw(w, h, luma).expect("size matches"))
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
    let mut out = Vec::with_capacity(pw * ph * c);
    for y in 0..ph {
        let sy = symmetric_index(y, h);
        let row = &data[sy * w * c..(sy + 1) * w * c];
        out.extend_from_slice(row);
        for x in w..pw {
            let sx = symmetric_index(x, w);
            out.extend_from_slice(&row[sx * c..(sx + 1) * c]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (w, h) = (37, 23);
        let mut seed = 7u32;
        let mask: Vec<u8> = (0..w * h)
            .map(|_| {
                seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                ((seed >> 16) % 29 == 0) as u8 * 255
            })
            .collect();
        for k in [1, 2, 3, 4, 15, 40] {
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
    // Each source row's horizontal pass, computed on first use (rows are shared by
    // neighbouring output rows when scaling up, skipped when scaling down).
    let mut rows: Vec<Option<Vec<i32>>> = vec![None; sh];
    for (dy, &(sy, sy1, b0, b1)) in yt.iter().enumerate() {
        for y in [sy, sy1] {
            if rows[y].is_none() {
                rows[y] = Some(hrow(y));
            }
        }
        let (r0, r1) = (rows[sy].as_deref().unwrap(), rows[sy1].as_deref().unwrap());
        let dst = &mut out[dy * width..(dy + 1) * width];
        for x in 0..width {
            // OpenCV's SIMD rounding (VResizeLinearVec_32s8u), which covers whole rows there.
            let m = |s: i32, b: i32| ((s >> 4) * b) >> 16;
            dst[x] = ((m(r0[x], b0) + m(r1[x], b1) + 2) >> 2).clamp(0, 255) as u8;
        }
    }
    out
}
