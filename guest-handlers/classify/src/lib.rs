//! Handler of the image classifier (`models/classify`): the TorchServe comparison's workload.
//!
//! Request: JSON `{"image": <base64 PNG or JPEG, 224x224>}`. Model input: `image` u8 [1, 224,
//! 224, 3] (batched along dimension 0 by the host when the archive allows it). Outputs: `score`
//! f32 [1] (the top class's softmax probability) and `top1` i64 [1]. Response: JSON `{"top1":
//! <class>, "score": <probability>}`. Any other image size is a 400 (no resizing: every server
//! compared does the same work).
use serde::Deserialize;
use std::borrow::Cow;
use tessera_sdk::{b64, img, HandlerError, ModelInput, Request, Response, Tensor};

const SIZE: u32 = 224;

struct Classify;

/// The request body, borrowing the (large) base64 image from the request bytes.
#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    image: Cow<'a, str>,
}

impl tessera_sdk::Handler for Classify {
    fn preprocess(req: Request) -> Result<ModelInput, HandlerError> {
        let expected = "expected a JSON object {\"image\": \"<base64 PNG>\"}";
        // serde would also read a struct from a JSON array.
        if req.body.trim_ascii_start().first() != Some(&b'{') {
            return Err(HandlerError::bad(expected));
        }
        let body: Body = serde_json::from_slice(&req.body)
            .map_err(|e| HandlerError::bad(format!("{expected}: {e}")))?;
        let bytes = b64::decode("image", &body.image)?;
        // The header first: a photo of the wrong size is refused before any pixel is decoded.
        let (w, h) = img::dimensions("image", &bytes)?;
        if (w, h) != (SIZE, SIZE) {
            return Err(HandlerError::bad(format!(
                "expected a {SIZE}x{SIZE} image, got {w}x{h}"
            )));
        }
        let rgb = img::decode_rgb("image", &bytes)?;
        let side = SIZE as u64;
        Ok(ModelInput {
            inputs: vec![Tensor::from_u8(
                "image",
                &[1, side, side, 3],
                rgb.into_raw(),
            )?],
            context: Vec::new(),
            cache_key: None,
        })
    }

    fn postprocess(outputs: Vec<Tensor>, _context: Vec<u8>) -> Result<Response, HandlerError> {
        let [score, top1] = &outputs[..] else {
            return Err(HandlerError::Internal(format!(
                "expected (score, top1), got {} outputs",
                outputs.len()
            )));
        };
        let (score, top1) = (score.view().f32()?, top1.view().i64()?);
        let (Some(score), Some(top1)) = (score.first(), top1.first()) else {
            return Err(HandlerError::Internal("empty model outputs".into()));
        };
        Response::json(&serde_json::json!({ "top1": top1, "score": *score as f64 }))
    }
}

tessera_sdk::export_handler!(Classify);
