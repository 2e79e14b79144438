//! Handler of the example image-to-image model (`models/example`).
//!
//! Request: JSON `{"image": <base64 PNG/JPEG>, "gen_args": {"strength": 0..1, "output_format":
//! "png"|"jpeg"}}` (`gen_args` may also be a JSON string, as the seed's clients send it).
//! Model input: `image` u8 [H, W, 3] and `strength` f32 [1]. Output: u8 [H, W, 3].
//! Response: JSON `{"generated_image": <base64 image>}`.
use serde::{Deserialize, Serialize};
use tessera_sdk::{b64, img, json, HandlerError, ModelInput, Request, Response, Tensor};

struct Example;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GenArgs {
    strength: Option<f32>,
    output_format: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Context {
    jpeg: bool,
}

impl tessera_sdk::Handler for Example {
    fn preprocess(req: Request) -> Result<ModelInput, HandlerError> {
        let body = json::body(&req)?;
        let bytes = b64::decode("image", json::str_field(&body, "image")?)?;
        let image = img::decode_rgb("image", &bytes)?;
        let args: GenArgs = json::nested(&body, "gen_args")?;
        let strength = args.strength.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&strength) {
            return Err(HandlerError::bad(format!(
                "gen_args.strength must be in [0, 1], got {strength}"
            )));
        }
        let jpeg = match args.output_format.as_deref() {
            None | Some("png") => false,
            Some("jpeg" | "jpg") => true,
            Some(other) => {
                return Err(HandlerError::bad(format!(
                    "gen_args.output_format '{other}' is not png or jpeg"
                )))
            }
        };
        let (w, h) = image.dimensions();
        let inputs = vec![
            Tensor::from_u8("image", &[h as u64, w as u64, 3], image.into_raw())?,
            Tensor::from_f32("strength", &[1], &[strength])?,
        ];
        let context = json::to_context(&Context { jpeg })?;
        Ok(ModelInput {
            inputs,
            context,
            cache_key: None,
        })
    }

    fn postprocess(outputs: Vec<Tensor>, context: Vec<u8>) -> Result<Response, HandlerError> {
        let ctx: Context = json::from_context(&context)?;
        let out = tessera_sdk::first_output(&outputs)?;
        let encoded = img::encode(&img::rgb_from_tensor(out, None)?, ctx.jpeg)?;
        Response::base64_field("generated_image", &encoded)
    }
}

tessera_sdk::export_handler!(Example);
