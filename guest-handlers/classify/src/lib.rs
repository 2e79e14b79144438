//! Handler of the image classifier (`models/classify`): the TorchServe comparison's workload.
//!
//! Request: JSON `{"image": <base64 PNG or JPEG, 224x224>}`. Model input: `image` u8 [1, 224,
//! 224, 3] (batched along dimension 0 by the host when the archive allows it). Outputs: `score`
//! f32 [1] (the top class's softmax probability) and `top1` i64 [1]. Response: JSON `{"top1":
//! <class>, "score": <probability>}`. Any other image size is a 400 (no resizing: every server
//! compared does the same work). The photo is decoded by the host (`host_img`) and its 150 KB of
//! pixels go to the model from there (`as_input`, reshaped to the batchable [1, 224, 224, 3]).
use tessera_sdk::host_img::{Image, PixelFormat};
use tessera_sdk::{json, HandlerError, ModelInput, Request, Response, Tensor};

const SIZE: u32 = 224;

struct Classify;

impl tessera_sdk::Handler for Classify {
    fn preprocess(req: Request) -> Result<ModelInput, HandlerError> {
        let expected = "expected a JSON object {\"image\": \"<base64 PNG>\"}";
        let shape = |e: HandlerError| match e {
            HandlerError::BadRequest(m) => HandlerError::bad(format!("{expected}: {m}")),
            other => other,
        };
        let body = json::Fields::of(&req).map_err(shape)?;
        let text = body.str("image").map_err(shape)?;
        let image = Image::decode_base64("image", text.as_bytes(), PixelFormat::Rgb)?;
        // The pixel limit bounds the decode; the size is the model's.
        let (w, h) = (image.width(), image.height());
        if (w, h) != (SIZE, SIZE) {
            return Err(HandlerError::bad(format!(
                "expected a {SIZE}x{SIZE} image, got {w}x{h}"
            )));
        }
        let side = SIZE as u64;
        Ok(ModelInput {
            // The host hands its pixels to the model as they are (no copy through the handler).
            inputs: vec![image.as_input("image").reshape(&[1, side, side, 3])?],
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
