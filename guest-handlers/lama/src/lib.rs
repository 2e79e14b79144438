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
//! model without entering the handler's memory.
use serde::{Deserialize, Serialize};
use tessera_sdk::host_img::{self, Image, PadMode, PixelFormat};
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
        let body = json::body(&req)?;
        let jpeg = img::wants_jpeg(&body)?;
        let image = host_img::decode_field(&body, "image", PixelFormat::Rgb)?;
        let mask = host_img::decode_field(&body, "mask_image", PixelFormat::Luma)?;
        let (w, h) = (image.width(), image.height());
        if (mask.width(), mask.height()) != (w, h) {
            return Err(img::size_mismatch((w, h), (mask.width(), mask.height())));
        }
        let (w, h) = (w as usize, h as usize);
        if w < MIN_SIDE || h < MIN_SIDE {
            return Err(HandlerError::bad(format!(
                "image is {w}x{h}; LaMa needs at least {MIN_SIDE}x{MIN_SIDE} pixels"
            )));
        }
        let (pw, ph) = (round_up(w) as u32, round_up(h) as u32);
        let inputs = vec![
            image.pad(pw, ph, PadMode::Symmetric)?.as_input("image"),
            mask.pad(pw, ph, PadMode::Symmetric)?.as_input("mask"),
        ];
        let context = json::to_context(&Context {
            width: w as u32,
            height: h as u32,
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
        let image = Image::from_tensor(out)?.crop(0, 0, ctx.width, ctx.height)?;
        host_img::base64_response("generated_image", &image, ctx.jpeg)
    }
}

tessera_sdk::export_handler!(Lama);
