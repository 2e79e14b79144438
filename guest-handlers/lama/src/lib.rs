//! LaMa handler: erase the masked object.
//!
//! Request (the seed's): JSON `{"image": <base64 PNG/JPEG>, "mask_image": <base64 PNG/JPEG>}`;
//! other fields (a prompt, say) are ignored as the seed ignores them, except `output_format`
//! (`"png"`, the default, or `"jpeg"`). The mask becomes one channel as PIL's `convert("L")`
//! does and a pixel is a hole where it is > 0. Image and mask are padded at the bottom/right
//! to a multiple of 8 with symmetric padding, as LaMa's reference does; the model (see
//! `models/lama`) returns the composite and we crop it back to the original size.
//! Response: `{"generated_image": <base64 PNG or JPEG>}`.
//!
//! The pixel work is the host's (`host_img`): the photo is decoded, padded and handed to the
//! model without entering the handler's memory. Built with the `in-sandbox` feature, the same
//! work runs inside the handler on the SDK's `img` (the same code, compiled to Wasm): only the
//! handler benchmark (`bench/handlers_cpu.py`) builds it so.
use serde::{Deserialize, Serialize};
use tessera_sdk::{img, json, HandlerError, ModelInput, Request, Response, Tensor};

const MODULO: usize = 8;
/// Three stride-2 downsamplings and reflection padding in the bottleneck need at least 2
/// pixels there: 16 at the input.
const MIN_SIDE: usize = 16;

struct Lama;

#[derive(Serialize, Deserialize)]
struct Context {
    width: u32,
    height: u32,
    jpeg: bool,
}

fn round_up(n: usize) -> usize {
    n.div_ceil(MODULO) * MODULO
}

impl tessera_sdk::Handler for Lama {
    fn preprocess(req: Request) -> Result<ModelInput, HandlerError> {
        let body = json::Fields::of(&req)?;
        let jpeg = img::jpeg_format(body.opt_str("output_format"))?;
        let (inputs, w, h) = pixels::inputs(&body)?;
        let context = json::to_context(&Context {
            width: w,
            height: h,
            jpeg,
        })?;
        Ok(ModelInput {
            inputs,
            context,
            cache_key: None,
        })
    }

    fn postprocess(outputs: Vec<Tensor>, context: Vec<u8>) -> Result<Response, HandlerError> {
        let ctx: Context = json::from_context(&context)?;
        let out = tessera_sdk::first_output(&outputs)?;
        pixels::response(out, &ctx)
    }
}

fn check_size(w: u32, h: u32) -> Result<(), HandlerError> {
    if (w as usize) < MIN_SIDE || (h as usize) < MIN_SIDE {
        return Err(HandlerError::bad(format!(
            "image is {w}x{h}; LaMa needs at least {MIN_SIDE}x{MIN_SIDE} pixels"
        )));
    }
    Ok(())
}

/// The pixel work on the host's images.
#[cfg(not(feature = "in-sandbox"))]
mod pixels {
    use super::*;
    use tessera_sdk::host_img::{self, Image, PadMode, PixelFormat};

    /// The padded image and mask as model inputs, and the photo's size.
    pub fn inputs(body: &json::Fields) -> Result<(Vec<Tensor>, u32, u32), HandlerError> {
        let [image, mask] = host_img::decode_fields(
            body,
            [
                ("image", PixelFormat::Rgb),
                ("mask_image", PixelFormat::Luma),
            ],
        )?;
        let (w, h) = (image.width(), image.height());
        if (mask.width(), mask.height()) != (w, h) {
            return Err(img::size_mismatch((w, h), (mask.width(), mask.height())));
        }
        check_size(w, h)?;
        let (pw, ph) = (round_up(w as usize) as u32, round_up(h as usize) as u32);
        let inputs = vec![
            image.pad(pw, ph, PadMode::Symmetric)?.as_input("image"),
            mask.pad(pw, ph, PadMode::Symmetric)?.as_input("mask"),
        ];
        Ok((inputs, w, h))
    }

    pub fn response(out: &Tensor, ctx: &Context) -> Result<Response, HandlerError> {
        let image = Image::from_tensor(out)?.crop(0, 0, ctx.width, ctx.height)?;
        host_img::base64_response("generated_image", &image, ctx.jpeg)
    }
}

/// The same pixel work inside the sandbox.
#[cfg(feature = "in-sandbox")]
mod pixels {
    use super::*;

    pub fn inputs(body: &json::Fields) -> Result<(Vec<Tensor>, u32, u32), HandlerError> {
        use tessera_sdk::b64;
        let image = img::decode_rgb("image", &b64::decode("image", body.str("image")?)?)?;
        let mask = b64::decode("mask_image", body.str("mask_image")?)?;
        let mask = img::decode_luma_pil("mask_image", &mask)?;
        if image.dimensions() != mask.dimensions() {
            return Err(img::size_mismatch(image.dimensions(), mask.dimensions()));
        }
        let (w, h) = image.dimensions();
        check_size(w, h)?;
        let (w, h) = (w as usize, h as usize);
        let (pw, ph) = (round_up(w), round_up(h));
        let image = img::pad_symmetric(image.as_raw(), w, h, 3, pw, ph);
        let mask = img::pad_symmetric(mask.as_raw(), w, h, 1, pw, ph);
        let inputs = vec![
            Tensor::from_u8("image", &[ph as u64, pw as u64, 3], image)?,
            Tensor::from_u8("mask", &[ph as u64, pw as u64], mask)?,
        ];
        Ok((inputs, w as u32, h as u32))
    }

    pub fn response(out: &Tensor, ctx: &Context) -> Result<Response, HandlerError> {
        let image = img::rgb_from_tensor(out, Some((ctx.width, ctx.height)))?;
        Response::base64_field("generated_image", &img::encode(&image, ctx.jpeg)?)
    }
}

tessera_sdk::export_handler!(Lama);
