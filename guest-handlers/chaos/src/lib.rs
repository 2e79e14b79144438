//! A deliberately misbehaving handler for the sandbox tests (never shipped to users).
//!
//! The JSON body's `mode` picks the misbehaviour: `loop` spins forever, `hog` allocates without
//! bound, `stack` recurses without bound, `trap` hits `unreachable`, `log` floods the log,
//! `asset` reads `assets/<path>` and returns it, `escape` tries to read `../model-config.yaml`;
//! `big` (in postprocess) answers a huge body; with host images, `image-hog` keeps making
//! 12 MB images, `image-loop` resizes forever (dropping each), `image-stretch` asks for a resize whose
//! intermediate image is over the pixel limit, `image-stage` returns a staged
//! input with a shape of fewer elements. Anything else passes a small image through the example model.
use tessera_sdk::host_img::{Image, ResizeFilter};
use tessera_sdk::{json, HandlerError, LogLevel, ModelInput, Request, Response, Tensor};

/// A 2x2 RGB image held by the host.
fn small_image() -> Result<Image, HandlerError> {
    Image::from_tensor(&Tensor::from_u8("px", &[2, 2, 3], vec![9u8; 12])?)
}

struct Chaos;

#[inline(never)]
#[allow(unconditional_recursion)]
fn recurse(depth: u64, buf: &mut [u8; 256]) -> u64 {
    buf[(depth % 256) as usize] = depth as u8;
    let mut local = [0u8; 256];
    local[0] = buf[0];
    recurse(depth + 1, &mut local) + local[1] as u64
}

impl tessera_sdk::Handler for Chaos {
    fn preprocess(req: Request) -> Result<ModelInput, HandlerError> {
        let body = json::body(&req)?;
        let mode = json::str_field(&body, "mode")?.to_string();
        match mode.as_str() {
            "loop" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "hog" => {
                let mut keep: Vec<Vec<u8>> = Vec::new();
                loop {
                    keep.push(vec![1u8; 16 << 20]);
                    std::hint::black_box(&keep);
                }
            }
            "image-hog" => {
                let small = small_image()?;
                let mut keep = Vec::new();
                loop {
                    keep.push(small.resize(2000, 2000, ResizeFilter::Nearest)?);
                }
            }
            "image-stretch" => {
                // 600 KB in, 600 KB out, but Pillow's two passes would go through an image of
                // 200 000 x 200 000: refused before anything is allocated.
                let line = Image::from_tensor(&Tensor::from_u8(
                    "px",
                    &[1, 200_000, 3],
                    vec![1; 600_000],
                )?)?;
                line.resize(1, 200_000, ResizeFilter::PilBilinear)?;
            }
            "image-loop" => {
                let small = small_image()?;
                loop {
                    std::hint::black_box(small.resize(500, 500, ResizeFilter::PilBilinear)?);
                }
            }
            "image-stage" => {
                let mut staged = small_image()?.as_input("image");
                staged.shape = vec![2, 2, 2];
                let inputs = vec![staged, Tensor::from_f32("strength", &[1], &[0.0])?];
                return Ok(ModelInput {
                    inputs,
                    context: mode.into_bytes(),
                    cache_key: None,
                });
            }
            "stack" => {
                let mut buf = [0u8; 256];
                let n = recurse(0, &mut buf);
                return Err(HandlerError::Internal(format!("unreachable {n}")));
            }
            "trap" => core::arch::wasm32::unreachable(),
            "log" => {
                for i in 0..100_000 {
                    tessera_sdk::log(LogLevel::Info, &format!("flood line {i}"));
                }
            }
            "asset" | "escape" => {
                let path = if mode == "escape" {
                    "../model-config.yaml"
                } else {
                    json::str_field(&body, "path")?
                };
                let bytes = tessera_sdk::asset(path).map_err(|e| match e {
                    HandlerError::Internal(m) => HandlerError::bad(m),
                    other => other,
                })?;
                return Err(HandlerError::Unprocessable(
                    String::from_utf8_lossy(&bytes).into_owned(),
                ));
            }
            _ => {}
        }
        let inputs = vec![
            Tensor::from_u8("image", &[2, 2, 3], vec![7u8; 12])?,
            Tensor::from_f32("strength", &[1], &[0.0])?,
        ];
        Ok(ModelInput {
            inputs,
            context: mode.into_bytes(),
            cache_key: None,
        })
    }

    fn postprocess(outputs: Vec<Tensor>, context: Vec<u8>) -> Result<Response, HandlerError> {
        if context == b"big" {
            let body = vec![b'x'; 32 << 20];
            return Ok(Response {
                status: 200,
                content_type: "text/plain".into(),
                body,
            });
        }
        let n = outputs.first().map(|t| t.data.len()).unwrap_or(0);
        Response::json(
            &serde_json::json!({ "mode": String::from_utf8_lossy(&context), "bytes": n }),
        )
    }
}

tessera_sdk::export_handler!(Chaos);
