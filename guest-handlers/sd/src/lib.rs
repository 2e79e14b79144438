//! Stable Diffusion 2 inpainting handler: replace the masked region from a text prompt.
//!
//! Request (the seed's): JSON `{"image": <base64 PNG/JPEG>, "mask_image": <base64 PNG/JPEG>,
//! "prompt": "...", "negative_prompt": "...", "gen_args": <JSON string or object>}` with
//! `gen_args` = `{"num_inference_steps": 50, "guidance_scale": 7.5, "seed": 0}` (defaults shown;
//! the seed's client sends 50, 10, 1), and `output_format` `"png"` (default) or `"jpeg"`.
//! The mask becomes one channel as PIL's `convert("L")` does and is binarised at 128 (a 0/255
//! PNG mask passes unchanged; a JPEG mask keeps its blurred edge pixels instead of losing them).
//!
//! The handler tokenises both prompts with CLIP's BPE (the archive's `tokenizer/` assets), cuts
//! the seed's 512x512 window around the mask (`crop`), and hands the model token ids, the window
//! and its mask, steps, guidance and seed; the model (see `models/sd`) runs the whole denoising
//! loop. Postprocess pastes the window back and replaces only masked pixels.
//! Response: `{"generated_image": <base64 PNG or JPEG>}`. Same request, same seed: same image.
//! Each prompt is at most `max_prompt_bytes` UTF-8 bytes (handler param, default 4096): 413 over.
pub mod crop;

use serde::{Deserialize, Serialize};
use tessera_sdk::clip::ClipTokenizer;
use tessera_sdk::host_img::{self, Image, PixelFormat};
use tessera_sdk::{img, json, HandlerError, ModelInput, Request, Response, Tensor};

const DEFAULT_STEPS: u32 = 50;
const DEFAULT_GUIDANCE: f64 = 7.5;
/// Default cap on `prompt` and `negative_prompt` (UTF-8 bytes each), overridable with the
/// `max_prompt_bytes` handler param: 77 CLIP tokens are rarely more than a few hundred bytes.
const DEFAULT_MAX_PROMPT_BYTES: usize = 4096;

struct Sd;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GenArgs {
    num_inference_steps: Option<serde_json::Value>,
    guidance_scale: Option<serde_json::Value>,
    seed: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct Context {
    geom: crop::Geometry,
    jpeg: bool,
}

/// Context bytes: JSON header length (u32 LE), the header, then the original RGB pixels and
/// the binarised mask (postprocess needs both to paste the window back).
fn pack_context(ctx: &Context, image: &[u8], mask: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let header = json::to_context(ctx)?;
    let mut out = Vec::with_capacity(4 + header.len() + image.len() + mask.len());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(image);
    out.extend_from_slice(mask);
    Ok(out)
}

fn unpack_context(bytes: &[u8]) -> Result<(Context, &[u8], &[u8]), HandlerError> {
    let bad = || HandlerError::Internal("context is truncated".into());
    let len = u32::from_le_bytes(bytes.get(..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
    let ctx: Context = json::from_context(bytes.get(4..4 + len).ok_or_else(bad)?)?;
    let (w, h) = ctx.geom.orig;
    let rest = &bytes[4 + len..];
    if rest.len() != w * h * 4 {
        return Err(bad());
    }
    Ok((ctx, &rest[..w * h * 3], &rest[w * h * 3..]))
}

fn int_arg(
    name: &str,
    v: &Option<serde_json::Value>,
    default: u64,
    max: u64,
) -> Result<u64, HandlerError> {
    let Some(v) = v else {
        if default > max {
            return Err(HandlerError::bad(format!(
                "gen_args.{name} defaults to {default}, over this model's limit: give one from 0 to {max}"
            )));
        }
        return Ok(default);
    };
    match v.as_u64() {
        Some(n) if n <= max => Ok(n),
        _ => Err(HandlerError::bad(format!(
            "gen_args.{name} must be an integer from 0 to {max}, got {v}"
        ))),
    }
}

/// A prompt field (absent or null: empty), at most `max_bytes` long: CLIP reads only 77 tokens,
/// and the cap bounds the tokeniser's work on hostile input before it starts.
fn text_field<'a>(
    body: &'a json::Fields,
    key: &str,
    max_bytes: usize,
) -> Result<&'a str, HandlerError> {
    let s = body.opt_text(key)?.unwrap_or("");
    if s.len() > max_bytes {
        return Err(HandlerError::PayloadTooLarge(format!(
            "field '{key}' is {} bytes, over this model's limit of {max_bytes} \
             (handler param max_prompt_bytes); the text encoder reads only the first 77 \
             tokens anyway",
            s.len()
        )));
    }
    Ok(s)
}

fn tokenizer() -> Result<ClipTokenizer, HandlerError> {
    let config = tessera_sdk::asset("tokenizer/tokenizer_config.json").ok();
    // The tables packed by models/sd/tokenizer_files.py (~0.6 ms natively against ~20 ms to
    // build them from the two files, on every request); older archives have only the files.
    if let Ok(bin) = tessera_sdk::asset("tokenizer/clip-bpe.bin") {
        return ClipTokenizer::from_packed(bin, config.as_deref())
            .map_err(|e| HandlerError::Internal(format!("tokenizer: {e}")));
    }
    let vocab = tessera_sdk::asset("tokenizer/vocab.json")?;
    let merges = tessera_sdk::asset("tokenizer/merges.txt")?;
    let merges = String::from_utf8(merges)
        .map_err(|_| HandlerError::Internal("tokenizer/merges.txt is not UTF-8".into()))?;
    ClipTokenizer::new(&vocab, &merges, config.as_deref())
        .map_err(|e| HandlerError::Internal(format!("tokenizer: {e}")))
}

impl tessera_sdk::Handler for Sd {
    fn preprocess(req: Request) -> Result<ModelInput, HandlerError> {
        let body = json::Fields::of(&req)?;
        let jpeg = img::jpeg_format(body.opt_str("output_format"))?;
        let max_prompt =
            tessera_sdk::param::<usize>("max_prompt_bytes").unwrap_or(DEFAULT_MAX_PROMPT_BYTES);
        let prompt = text_field(&body, "prompt", max_prompt)?;
        let negative = text_field(&body, "negative_prompt", max_prompt)?;
        let args: GenArgs = body.nested("gen_args")?;
        let max_steps = tessera_sdk::param::<u64>("max_steps").unwrap_or(100);
        let steps = int_arg(
            "num_inference_steps",
            &args.num_inference_steps,
            DEFAULT_STEPS as u64,
            max_steps,
        )?;
        if steps == 0 {
            return Err(HandlerError::bad(
                "gen_args.num_inference_steps must be at least 1",
            ));
        }
        let max_guidance = tessera_sdk::param::<f64>("max_guidance_scale").unwrap_or(50.0);
        let guidance = match &args.guidance_scale {
            None => DEFAULT_GUIDANCE,
            Some(v) => match v.as_f64() {
                Some(g) if g.is_finite() && (0.0..=max_guidance).contains(&g) => g,
                _ => {
                    return Err(HandlerError::bad(format!(
                        "gen_args.guidance_scale must be a number from 0 to {max_guidance}, got {v}"
                    )))
                }
            },
        };
        let seed = int_arg("seed", &args.seed, 0, i64::MAX as u64)?;

        // Decoded on the host, side by side (the photo's pixels then copied in: the crop and
        // the paste-back are this handler's).
        let [image, luma] = host_img::decode_fields(
            &body,
            [
                ("image", PixelFormat::Rgb),
                ("mask_image", PixelFormat::Luma),
            ],
        )?;
        let (w, h) = (image.width(), image.height());
        if (luma.width(), luma.height()) != (w, h) {
            return Err(img::size_mismatch((w, h), (luma.width(), luma.height())));
        }
        let (image, mut mask) = (image.pixels(), luma.pixels());
        for v in &mut mask {
            *v = if *v >= 128 { 255 } else { 0 };
        }
        if !mask.contains(&255) {
            return Err(HandlerError::bad(
                "mask_image has no masked pixels (none >= 128): nothing to inpaint",
            ));
        }
        let (w, h) = (w as usize, h as usize);
        let window = tessera_sdk::param::<usize>("crop_size").unwrap_or(512);
        // A thin image is scaled up to a `window`-pixel short side first: bound that too.
        let max_pixels = tessera_sdk::param::<u64>("max_pixels").unwrap_or(img::DEFAULT_MAX_PIXELS);
        if let Some((uw, uh)) = crop::upscaled_size((w, h), window) {
            if (uw as u64) * (uh as u64) > max_pixels {
                return Err(HandlerError::PayloadTooLarge(format!(
                    "image is {w}x{h}; scaled up to a {window}-pixel short side it would be {uw}x{uh}, \
                     over this model's limit of {max_pixels} pixels"
                )));
            }
        }

        let tok = tokenizer()?;
        let mut ids = tok.encode_padded(negative);
        ids.extend(tok.encode_padded(prompt));

        let (win_image, win_mask, geom) = crop::pre(&image, &mask, (w, h), window);
        let (ws, ml) = (window as u64, tok.max_len as u64);
        let inputs = vec![
            Tensor::from_i64("input_ids", &[2, ml], &ids)?,
            Tensor::from_u8("image", &[ws, ws, 3], win_image)?,
            Tensor::from_u8("mask", &[ws, ws], win_mask)?,
            Tensor::from_i64("steps", &[], &[steps as i64])?,
            Tensor::from_f32("guidance", &[], &[guidance as f32])?,
            Tensor::from_i64("seed", &[], &[seed as i64])?,
        ];
        let context = pack_context(&Context { geom, jpeg }, &image, &mask)?;
        Ok(ModelInput {
            inputs,
            context,
            cache_key: None,
        })
    }

    fn postprocess(outputs: Vec<Tensor>, context: Vec<u8>) -> Result<Response, HandlerError> {
        let (ctx, image, mask) = unpack_context(&context)?;
        let out = tessera_sdk::first_output(&outputs)?;
        let c = ctx.geom.crop as u64;
        if out.shape != [c, c, 3] {
            return Err(HandlerError::Internal(format!(
                "model returned shape {:?}, expected [{c}, {c}, 3]",
                out.shape
            )));
        }
        let filled = out.view().u8()?;
        let pixels = crop::post(image, mask, filled, &ctx.geom);
        let (w, h) = ctx.geom.orig;
        // Encoded (PNG in strips on several cores) and base64'd on the host.
        let result = Tensor::from_u8("generated_image", &[h as u64, w as u64, 3], pixels)?;
        host_img::base64_response("generated_image", &Image::from_tensor(&result)?, ctx.jpeg)
    }
}

tessera_sdk::export_handler!(Sd);

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> Request {
        Request {
            body: serde_json::to_vec(&v).unwrap(),
            content_type: "application/json".into(),
            headers: vec![],
        }
    }

    #[test]
    fn prompts_over_the_cap_are_413() {
        let r = req(serde_json::json!({
            "prompt": "a".repeat(4097),
            "negative_prompt": "é".repeat(2048),
            "null": null,
        }));
        let b = json::Fields::of(&r).unwrap();
        match text_field(&b, "prompt", DEFAULT_MAX_PROMPT_BYTES) {
            Err(HandlerError::PayloadTooLarge(m)) => {
                assert!(
                    m.contains("'prompt' is 4097 bytes") && m.contains("4096"),
                    "{m}"
                )
            }
            other => panic!("expected a 413, got {other:?}"),
        }
        // Bytes, not characters: 2048 two-byte characters are exactly at the cap.
        assert_eq!(
            text_field(&b, "negative_prompt", DEFAULT_MAX_PROMPT_BYTES).unwrap(),
            "é".repeat(2048)
        );
        assert!(matches!(
            text_field(&b, "negative_prompt", 4095),
            Err(HandlerError::PayloadTooLarge(_))
        ));
        assert_eq!(text_field(&b, "absent", 0).unwrap(), "");
        assert_eq!(text_field(&b, "null", 0).unwrap(), "");
        for wrong in [
            serde_json::json!(3),
            serde_json::json!([]),
            serde_json::json!({}),
        ] {
            let r = req(serde_json::json!({ "prompt": wrong }));
            assert!(matches!(
                text_field(&json::Fields::of(&r).unwrap(), "prompt", 10),
                Err(HandlerError::BadRequest(m)) if m == "field 'prompt' must be a string"
            ));
        }
    }
}
