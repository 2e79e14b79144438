//! Segment Anything handler: a click on a photo -> the object's mask.
//!
//! Request (the seed's): JSON `{"image": <base64 PNG/JPEG>, "gen_args": <JSON string or object>}`
//! with `gen_args` = `{"point_coords": [x, y] | [[x, y], ...], "point_labels": 1 | [1, 0, ...],
//! "dilate_kernel_size": 15, "mask_index": 1 | 0 | 2 | "best"}`. Coordinates are pixels of the
//! original image; labels 1 (foreground) / 0 (background).
//! Response: `{"generated_image": <base64 PNG, 0/255 mask at the original size>, "scores": [3
//! predicted IoUs], "mask_index": i}`. The seed took SAM's second mask (index 1) and sent JPEG;
//! index 1 stays the default, PNG keeps the mask exact.
//!
//! The image encoder is the archive's cached stage: the request's image (its base64 text,
//! hashed) is the cache key, so a second click on the same photo skips decoding, resizing and
//! the encoder, and runs only the prompt decoder.
//!
//! The pixel work is the host's (`host_img`): decoding, resizing and padding the photo, and
//! dilating and encoding the mask, run natively outside the sandbox. Built with the
//! `in-sandbox` feature, the same work runs inside the handler on the SDK's `img` (the same
//! code, compiled to Wasm): only the handler benchmark (`bench/handlers_cpu.py`) builds it so.
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tessera_sdk::{b64, img, json, HandlerError, ModelInput, Request, Response, Tensor};

const MAX_POINTS: usize = 64;
/// SAM's input side: the photo is resized to this longest side and zero-padded to the square,
/// so the encoder sees one input shape whatever the photo's size (its `image_hw` input says
/// where the photo ends).
const SIDE: u32 = 1024;
const DEFAULT_MASK: usize = 1;

struct Sam;

/// Base64 characters enough to hold a PNG or baseline JPEG header (the image's size).
const HEADER_PREFIX: usize = 4096;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GenArgs {
    point_coords: Option<Value>,
    point_labels: Option<Value>,
    dilate_kernel_size: Option<u32>,
    mask_index: Option<Value>,
}

#[derive(Serialize, Deserialize)]
struct Context {
    /// `None` picks the highest predicted IoU.
    mask_index: Option<usize>,
    dilate: u32,
    /// The photo's height and width: its mask is the first h*w bytes of the model's (a batch
    /// pads every mask to its largest).
    size: (usize, usize),
}

fn points(v: Option<&Value>) -> Result<Vec<[f32; 2]>, HandlerError> {
    let bad = || HandlerError::bad("gen_args.point_coords must be [x, y] or [[x, y], ...]");
    let pair = |v: &Value| -> Result<[f32; 2], HandlerError> {
        match v.as_array().map(|a| a.as_slice()) {
            Some([x, y]) => Ok([
                x.as_f64().ok_or_else(bad)? as f32,
                y.as_f64().ok_or_else(bad)? as f32,
            ]),
            _ => Err(bad()),
        }
    };
    let v = v.ok_or_else(|| HandlerError::bad("missing gen_args.point_coords"))?;
    let list = v.as_array().ok_or_else(bad)?;
    if list.first().is_some_and(Value::is_number) {
        return Ok(vec![pair(v)?]);
    }
    if list.is_empty() || list.len() > MAX_POINTS {
        return Err(HandlerError::bad(format!(
            "gen_args.point_coords needs 1 to {MAX_POINTS} points"
        )));
    }
    list.iter().map(pair).collect()
}

fn labels(v: Option<&Value>, n: usize) -> Result<Vec<f32>, HandlerError> {
    let one = |v: &Value| match v.as_i64() {
        Some(l @ (0 | 1)) => Ok(l as f32),
        _ => Err(HandlerError::bad(
            "gen_args.point_labels must be 1 (foreground) or 0 (background)",
        )),
    };
    match v {
        None => Ok(vec![1.0; n]),
        Some(Value::Array(list)) if list.len() == n => list.iter().map(one).collect(),
        Some(Value::Array(list)) => Err(HandlerError::bad(format!(
            "gen_args.point_labels has {} labels for {n} points",
            list.len()
        ))),
        Some(v) => Ok(vec![one(v)?; n]),
    }
}

fn mask_index(v: Option<&Value>) -> Result<Option<usize>, HandlerError> {
    match v {
        None => Ok(Some(DEFAULT_MASK)),
        Some(Value::String(s)) if s == "best" => Ok(None),
        Some(v) => match v.as_u64() {
            Some(i @ 0..=2) => Ok(Some(i as usize)),
            _ => Err(HandlerError::bad(
                "gen_args.mask_index must be 0, 1, 2 or \"best\"",
            )),
        },
    }
}

impl tessera_sdk::Handler for Sam {
    fn preprocess(req: Request) -> Result<ModelInput, HandlerError> {
        let body = json::Fields::of(&req)?;
        let encoded = body.str("image")?;
        let args: GenArgs = body.nested("gen_args")?;
        let points = points(args.point_coords.as_ref())?;
        let labels = labels(args.point_labels.as_ref(), points.len())?;
        let max_dilate = tessera_sdk::param::<u32>("max_dilate_kernel_size").unwrap_or(101);
        let dilate = args.dilate_kernel_size.unwrap_or(0);
        if dilate > max_dilate {
            return Err(HandlerError::bad(format!(
                "gen_args.dilate_kernel_size must be at most {max_dilate}"
            )));
        }
        let mut context = Context {
            mask_index: mask_index(args.mask_index.as_ref())?,
            dilate,
            size: (0, 0),
        };

        // Same photo, same key: the second click needs neither the pixels nor the encoder,
        // only the image's size, which its header gives.
        let key = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(encoded.as_bytes()));
        let cached = tessera_sdk::is_cached(&key);
        let header_only = cached
            .then(|| encoded.get(..HEADER_PREFIX.min(encoded.len()) / 4 * 4))
            .flatten()
            .and_then(|prefix| b64::decode("image", prefix).ok())
            .and_then(|bytes| img::dimensions("image", &bytes).ok());
        let (w, h, photo) = match header_only {
            Some((w, h)) => (w, h, None),
            None if cached => {
                let (w, h) = img::dimensions("image", &b64::decode("image", encoded)?)?;
                (w, h, None)
            }
            None => {
                let (w, h, photo) = pixels::decode(encoded)?;
                (w, h, Some(photo))
            }
        };
        let (rw, rh) = img::longest_side_shape(w, h, SIDE);
        if rw == 0 || rh == 0 {
            return Err(HandlerError::bad(format!(
                "the {w}x{h} image is too thin: its short side would be 0 pixels at SAM's {SIDE} input"
            )));
        }
        for (i, [x, y]) in points.iter().enumerate() {
            if !(0.0..w as f32).contains(x) || !(0.0..h as f32).contains(y) {
                return Err(HandlerError::bad(format!(
                    "point {i} ({x}, {y}) is outside the {w}x{h} image"
                )));
            }
        }
        let mut inputs = Vec::with_capacity(4);
        if let Some(photo) = photo {
            inputs.push(pixels::input(photo, (rw, rh))?);
            inputs.push(Tensor::from_i64("image_hw", &[2], &[rh as i64, rw as i64])?);
        }
        // The decoder's tensors are one row of a batch (the host batches clicks along
        // dimension 0, with their cached embeddings).
        let flat: Vec<f32> = points.iter().flatten().copied().collect();
        inputs.push(Tensor::from_f32(
            "point_coords",
            &[1, points.len() as u64, 2],
            &flat,
        )?);
        inputs.push(Tensor::from_f32(
            "point_labels",
            &[1, points.len() as u64],
            &labels,
        )?);
        inputs.push(Tensor::from_i64("orig_hw", &[1, 2], &[h as i64, w as i64])?);
        let wanted = context.mask_index.map_or(-1, |i| i as i64);
        inputs.push(Tensor::from_i64("mask_index", &[1], &[wanted])?);
        context.size = (h as usize, w as usize);
        let context = json::to_context(&context)?;
        Ok(ModelInput {
            inputs,
            context,
            cache_key: Some(key),
        })
    }

    fn postprocess(outputs: Vec<Tensor>, context: Vec<u8>) -> Result<Response, HandlerError> {
        let ctx: Context = json::from_context(&context)?;
        let [mask, iou, chosen] = &outputs[..] else {
            return Err(HandlerError::Internal(format!(
                "expected (mask, iou, index), got {} outputs",
                outputs.len()
            )));
        };
        let (h, w) = ctx.size;
        let [1, len] = mask.shape[..] else {
            return Err(HandlerError::Internal(format!(
                "expected a mask [1, H * W], got {:?}",
                mask.shape
            )));
        };
        if (len as usize) < h * w {
            return Err(HandlerError::Internal(format!(
                "a mask of {len} pixels for a {w}x{h} photo"
            )));
        }
        let scores = iou.view().f32()?;
        let idx = chosen.view().i64()?.first().copied().unwrap_or(-1);
        if !(0..scores.len() as i64).contains(&idx)
            || ctx.mask_index.is_some_and(|i| i as i64 != idx)
        {
            return Err(HandlerError::Internal(format!(
                "the model chose mask {idx}"
            )));
        }
        // The photo's mask is the plane's first h*w bytes (a batch pads to its largest mask).
        let plane = &mask.view().u8()?[..h * w];
        let png = pixels::mask_png(plane, (w, h), ctx.dilate)?;
        Response::json(&serde_json::json!({
            "generated_image": b64::encode(&png),
            "scores": scores,
            "mask_index": idx,
        }))
    }
}

tessera_sdk::export_handler!(Sam);

/// The pixel work on the host's images.
#[cfg(not(feature = "in-sandbox"))]
mod pixels {
    use super::*;
    use tessera_sdk::host_img::{Encoding, Image, PadMode, PixelFormat, ResizeFilter};

    pub type Photo = Image;

    /// The photo's size and pixels.
    pub fn decode(encoded: &str) -> Result<(u32, u32, Photo), HandlerError> {
        let photo = Image::decode_base64("image", encoded.as_bytes(), PixelFormat::Rgb)?;
        Ok((photo.width(), photo.height(), photo))
    }

    /// The encoder's input: the photo resized to `(rw, rh)` (what `img::resize_longest_side`
    /// does), zero-padded to the `SIDE` square.
    pub fn input(photo: Photo, (rw, rh): (u32, u32)) -> Result<Tensor, HandlerError> {
        let resized = photo.resize(rw, rh, ResizeFilter::PilBilinear)?;
        drop(photo);
        Ok(resized.pad(SIDE, SIDE, PadMode::Zero)?.as_input("image"))
    }

    /// The `w` x `h` 0/1 mask dilated and encoded as a 0/255 PNG.
    pub fn mask_png(
        plane: &[u8],
        (w, h): (usize, usize),
        dilate: u32,
    ) -> Result<Vec<u8>, HandlerError> {
        let plane = Tensor::from_u8("mask", &[h as u64, w as u64], plane.to_vec())?;
        Image::from_tensor(&plane)?
            .dilate(dilate)?
            .encode(Encoding::Png, 0)
    }
}

/// The same pixel work inside the sandbox.
#[cfg(feature = "in-sandbox")]
mod pixels {
    use super::*;

    pub type Photo = img::Rgb;

    pub fn decode(encoded: &str) -> Result<(u32, u32, Photo), HandlerError> {
        let photo = img::decode_rgb("image", &b64::decode("image", encoded)?)?;
        Ok((photo.width(), photo.height(), photo))
    }

    pub fn input(photo: Photo, _: (u32, u32)) -> Result<Tensor, HandlerError> {
        let resized = img::resize_longest_side(&photo, SIDE);
        drop(photo);
        let (rw, rh) = (resized.width() as usize, resized.height() as usize);
        let side = SIDE as usize;
        let square = img::pad_zero(resized.as_raw(), rw, rh, 3, side, side);
        Tensor::from_u8("image", &[SIDE as u64, SIDE as u64, 3], square)
    }

    pub fn mask_png(
        plane: &[u8],
        (w, h): (usize, usize),
        dilate: u32,
    ) -> Result<Vec<u8>, HandlerError> {
        let mask: Vec<u8> = img::dilate_square(plane, w, h, dilate as usize)
            .iter()
            .map(|&v| if v > 0 { 255 } else { 0 })
            .collect();
        let gray = img::GrayImage::from_raw(w as u32, h as u32, mask).expect("size matches");
        Ok(img::encode_png(&img::DynamicImage::from(gray))?)
    }
}
