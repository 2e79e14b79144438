//! Stable Diffusion 2 inpainting end to end: the seed's request through the real server (CLIP
//! tokenizer and crop-for-filling in the Wasm handler, the denoising loop driven by the server
//! through the model's prepare/step/finish, and inside TorchScript),
//! compared with the seed's flow in Python — OpenCV crop-for-filling around diffusers'
//! StableDiffusionInpaintPipeline — on the same tiny weights, CPU.
mod support;

use base64::Engine;
use serde_json::json;
use support::*;

/// `sd`: the loop driven by the server (`prepare`, `step`s, `finish`; each step a CUDA-graph
/// replay on a GPU), as the shipped config has it. `sd-forward`: the same file's `forward`, the
/// whole loop inside TorchScript.
const CONFIG: &str =
    "maxWorkers: 1\nresponseTimeout: 120\ntessera:\n  model: sd.pt\n  handlerMemoryMiB: 1024\n  loop: true\n  cudaGraphs: true\n\
handler:\n  max_pixels: 2000000\n  max_steps: 20\n";

fn sd_server(store: &tempfile::TempDir) -> Server {
    for (name, config) in [
        ("sd", CONFIG.to_string()),
        (
            "sd-forward",
            CONFIG.replace("  loop: true\n  cudaGraphs: true\n", ""),
        ),
    ] {
        let (ok, err) = pack_archive(
            &store.path().join(format!("{name}.tar.gz")),
            &config,
            &[artifact("sd/sd.pt")],
            &artifact("handlers/sd.wasm"),
            &[artifact("sd/tokenizer")],
        );
        assert!(ok, "pack {name}: {err}");
    }
    Server::start(store.path(), &[])
}

/// A photo-like image and a 0/255 mask that is 255 inside the box (x, y, w, h).
fn scene(w: u32, h: u32, bx: (u32, u32, u32, u32), seed: u64) -> (Vec<u8>, Vec<u8>) {
    let n = noise((w * h * 3) as usize, seed);
    let mut image = Vec::with_capacity(n.len());
    for y in 0..h {
        for x in 0..w {
            for c in 0..3u32 {
                let base = (x * 255 / w) * (c + 1) / 3 + (y * 180 / h) / 2;
                image.push(
                    (base as i32 + n[((y * w + x) * 3 + c) as usize] as i32 / 6).clamp(0, 255)
                        as u8,
                );
            }
        }
    }
    let (x0, y0, bw, bh) = bx;
    let mask = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| {
            if x >= x0 && x < x0 + bw && y >= y0 && y < y0 + bh {
                255
            } else {
                0
            }
        })
        .collect();
    (image, mask)
}

fn request(
    w: u32,
    h: u32,
    image: &[u8],
    mask: &[u8],
    gen_args: serde_json::Value,
) -> serde_json::Value {
    json!({
        "image": B64.encode(png_rgb(w, h, image)),
        "mask_image": B64.encode(png_encode(w, h, png::ColorType::Grayscale, mask)),
        "prompt": "a futuristic vase, studio light",
        "negative_prompt": "blurry!",
        // The seed's client sends gen_args as a JSON string.
        "gen_args": gen_args.to_string(),
    })
}

fn reference(body: &serde_json::Value) -> Vec<u8> {
    let script = workspace().join("models/sd/reference.py");
    let pipeline = artifact("sd/pipeline");
    let v = python_json(
        &[
            script.to_str().unwrap(),
            "--pretrained",
            pipeline.to_str().unwrap(),
        ],
        body,
    );
    B64.decode(v["pixels"].as_str().unwrap()).unwrap()
}

fn generated(reply: &Reply) -> (u32, u32, Vec<u8>) {
    assert_eq!(reply.status, 200, "{}", reply.text());
    decode_png(
        &B64.decode(reply.json()["generated_image"].as_str().unwrap())
            .unwrap(),
    )
}

#[test]
fn inpaints_like_the_diffusers_pipeline_through_crop_for_filling() {
    let store = tempfile::tempdir().unwrap();
    let server = sd_server(&store);
    let url = server.url("/predictions/sd");
    // Each case takes a different path through crop-for-filling.
    let cases = [
        // 512² with a box inside: the window is the image.
        (
            512,
            512,
            (170, 120, 250, 210),
            json!({"num_inference_steps": 4, "guidance_scale": 7.5, "seed": 3}),
        ),
        // Odd and small: scaled up to a 512 short side; box at the corner clamps the window.
        (
            301,
            211,
            (0, 0, 60, 45),
            json!({"num_inference_steps": 3, "guidance_scale": 1.0, "seed": 1}),
        ),
        // Box wider than 512: padded to a square (rows) and scaled down, window clamped.
        (
            701,
            555,
            (40, 300, 640, 200),
            json!({"num_inference_steps": 3, "guidance_scale": 10, "seed": 7}),
        ),
        // Scaled up and padded (columns), box taller than the window after scaling.
        (
            333,
            701,
            (100, 20, 150, 640),
            json!({"num_inference_steps": 3, "guidance_scale": 10, "seed": 2}),
        ),
        // Large image, small box near the bottom-right edge: a plain crop.
        (
            900,
            640,
            (820, 600, 70, 33),
            json!({"num_inference_steps": 3, "guidance_scale": 5, "seed": 9}),
        ),
    ];
    for (i, (w, h, bx, args)) in cases.into_iter().enumerate() {
        let (image, mask) = scene(w, h, bx, i as u64);
        let body = request(w, h, &image, &mask, args);
        let want = reference(&body);
        let reply = post_json(&url, &body);
        let (gw, gh, got) = generated(&reply);
        assert_eq!((gw, gh), (w, h), "case {i}");
        assert_eq!(
            post_json(&server.url("/predictions/sd-forward"), &body).json()["generated_image"],
            reply.json()["generated_image"],
            "case {i}: the server-driven loop and the TorchScript loop differ"
        );
        let max = max_abs_diff(&got, &want);
        assert!(
            max <= 2,
            "case {i} ({w}x{h}): differs from diffusers by {max} grey levels"
        );
        let mut changed = 0;
        for (p, m) in mask.iter().enumerate() {
            let (g, o) = (&got[p * 3..p * 3 + 3], &image[p * 3..p * 3 + 3]);
            if *m == 0 {
                assert_eq!(g, o, "case {i}: unmasked pixel {p} changed");
            } else if g != o {
                changed += 1;
            }
        }
        assert!(
            changed > mask.iter().filter(|m| **m > 0).count() / 2,
            "case {i}: the hole was not regenerated"
        );
    }
}

#[test]
fn same_seed_same_bytes_and_clear_errors() {
    let store = tempfile::tempdir().unwrap();
    let server = sd_server(&store);
    let url = server.url("/predictions/sd");
    let (w, h) = (96, 80);
    let (image, mask) = scene(w, h, (20, 10, 30, 40), 5);
    let args = json!({"num_inference_steps": 2, "guidance_scale": 7.5, "seed": 11});
    let body = request(w, h, &image, &mask, args.clone());
    let a = post_json(&url, &body);
    let b = post_json(&url, &body);
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(
        a.json()["generated_image"],
        b.json()["generated_image"],
        "same seed, different image"
    );
    let mut other = body.clone();
    other["gen_args"] = json!({"num_inference_steps": 2, "guidance_scale": 7.5, "seed": 12});
    assert_ne!(
        generated(&post_json(&url, &other)).2,
        generated(&a).2,
        "the seed changes nothing"
    );
    // gen_args may be an object too; defaults fill what is missing (50 steps is over this
    // archive's max_steps of 20, so steps must be given here).
    let mut obj = body.clone();
    obj["gen_args"] = json!({"num_inference_steps": 2, "seed": 11, "guidance_scale": 7.5});
    assert_eq!(
        post_json(&url, &obj).json()["generated_image"],
        a.json()["generated_image"]
    );
    let mut jpeg = body.clone();
    jpeg["output_format"] = json!("jpeg");
    let j = post_json(&url, &jpeg);
    assert_eq!(j.status, 200);
    let bytes = B64
        .decode(j.json()["generated_image"].as_str().unwrap())
        .unwrap();
    assert_eq!(&bytes[..3], &[0xff, 0xd8, 0xff], "not a JPEG");

    let small_mask = png_encode(10, 10, png::ColorType::Grayscale, &[255; 100]);
    let empty_mask = png_encode(w, h, png::ColorType::Grayscale, &vec![0; (w * h) as usize]);
    let big = png_rgb(2000, 1001, &vec![0; 2000 * 1001 * 3]);
    let thin = png_rgb(2000, 3, &vec![90; 2000 * 3 * 3]);
    let thin_mask = png_encode(2000, 3, png::ColorType::Grayscale, &[255; 2000 * 3]);
    let cases: Vec<(&str, Box<dyn Fn(&mut serde_json::Value)>, u16, &str)> = vec![
        (
            "missing image",
            Box::new(|b| drop(b.as_object_mut().unwrap().remove("image"))),
            400,
            "missing field 'image'",
        ),
        (
            "mask size",
            Box::new(move |b| b["mask_image"] = json!(B64.encode(&small_mask))),
            400,
            "must be the same size",
        ),
        (
            "empty mask",
            Box::new(move |b| b["mask_image"] = json!(B64.encode(&empty_mask))),
            400,
            "no masked pixels",
        ),
        (
            "not an image",
            Box::new(|b| b["image"] = json!(B64.encode(b"hello"))),
            400,
            "image",
        ),
        (
            "steps 0",
            Box::new(|b| b["gen_args"] = json!({"num_inference_steps": 0})),
            400,
            "at least 1",
        ),
        (
            "default steps over the limit",
            Box::new(|b| b["gen_args"] = json!({})),
            400,
            "from 0 to 20",
        ),
        (
            "too many steps",
            Box::new(|b| b["gen_args"] = json!({"num_inference_steps": 21})),
            400,
            "from 0 to 20",
        ),
        (
            "negative guidance",
            Box::new(|b| b["gen_args"] = json!({"num_inference_steps": 2, "guidance_scale": -1})),
            400,
            "guidance_scale",
        ),
        (
            "negative seed",
            Box::new(|b| b["gen_args"] = json!({"num_inference_steps": 2, "seed": -1})),
            400,
            "gen_args.seed",
        ),
        (
            "unknown arg",
            Box::new(|b| b["gen_args"] = json!({"num_inference_step": 2})),
            400,
            "unknown field",
        ),
        (
            "bad gen_args",
            Box::new(|b| b["gen_args"] = json!("{not json")),
            400,
            "gen_args",
        ),
        (
            "prompt type",
            Box::new(|b| b["prompt"] = json!(5)),
            400,
            "'prompt' must be a string",
        ),
        (
            "a prompt of one 1 MiB word (tokenised before truncation, it took minutes)",
            Box::new(|b| b["prompt"] = json!("x".repeat(1 << 20))),
            413,
            "max_prompt_bytes",
        ),
        (
            "negative prompt over the limit",
            Box::new(|b| b["negative_prompt"] = json!("a ".repeat(4000))),
            413,
            "'negative_prompt'",
        ),
        (
            "format",
            Box::new(|b| b["output_format"] = json!("gif")),
            400,
            "output_format",
        ),
        (
            "too many pixels",
            Box::new(move |b| b["image"] = json!(B64.encode(&big))),
            413,
            "pixels",
        ),
        (
            "too thin to scale up",
            Box::new(move |b| {
                b["image"] = json!(B64.encode(&thin));
                b["mask_image"] = json!(B64.encode(&thin_mask));
                b["gen_args"] = json!({"num_inference_steps": 2});
            }),
            413,
            "scaled up to a 512-pixel short side it would be 341333x512",
        ),
    ];
    for (what, edit, status, needle) in cases {
        let mut b = body.clone();
        edit(&mut b);
        let r = post_json(&url, &b);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        assert!(
            r.text().contains(needle),
            "{what}: '{}' lacks '{needle}'",
            r.text()
        );
    }
    // The server is still fine.
    assert_eq!(post_json(&url, &body).status, 200);
}
