//! LaMa handler: erase the masked object.
//!
//! Request (the seed's): JSON `{"image": <base64 PNG/JPEG>, "mask_image": <base64 PNG/JPEG>}`;
//! other fields (a prompt, say) are ignored as the seed ignores them, except `output_format`
//! (`"png"`, the default, or `"jpeg"`). The mask becomes one channel as PIL's `convert("L")`
//! does and a pixel is a hole where it is > 0. Image and mask are padded at the bottom/right
//! to a multiple of 8 with symmetric padding, as LaMa's reference does; the model (see
//! `models/lama`) returns the composite and we crop it back to the original size.
//! Response: `{"generated_image": <base64 PNG or JPEG>}`.
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
        let body = json::body(&req)?;
        let jpeg = img::wants_jpeg(&body)?;
        let (image, mask) = img::decode_image_and_mask(&body)?;
        let (w, h) = (image.width() as usize, image.height() as usize);
        if w < MIN_SIDE || h < MIN_SIDE {
            return Err(HandlerError::bad(format!(
                "image is {w}x{h}; LaMa needs at least {MIN_SIDE}x{MIN_SIDE} pixels"
            )));
        }
        let (pw, ph) = (round_up(w), round_up(h));
        let image = img::pad_symmetric(image.as_raw(), w, h, 3, pw, ph);
        let mask = img::pad_symmetric(mask.as_raw(), w, h, 1, pw, ph);
        let inputs = vec![
            Tensor::from_u8("image", &[ph as u64, pw as u64, 3], image)?,
            Tensor::from_u8("mask", &[ph as u64, pw as u64], mask)?,
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
        let image = img::rgb_from_tensor(out, Some((ctx.width, ctx.height)))?;
        let encoded = img::encode(&image, ctx.jpeg)?;
        Response::base64_field("generated_image", &encoded)
    }
}

tessera_sdk::export_handler!(Lama);
