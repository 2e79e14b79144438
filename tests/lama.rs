//! LaMa end to end: the seed's request through the real server, compared with the eager
//! PyTorch reference pipeline on the same weights (tiny model, CPU).
mod support;

use base64::Engine;
use serde_json::json;
use support::*;

const CONFIG: &str = "maxWorkers: 1\nresponseTimeout: 60\ntessera:\n  model: model.pt\nhandler:\n  max_pixels: 250000\n";

fn png_gray(w: u32, h: u32, pixels: &[u8]) -> Vec<u8> {
    png_encode(w, h, png::ColorType::Grayscale, pixels)
}

/// A photo-like image (smooth gradients + noise) and a 0/255 mask with an object-shaped blob.
fn scene(w: u32, h: u32, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let n = noise((w * h * 3) as usize, seed);
    let mut image = Vec::with_capacity(n.len());
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let base = (x * 255 / w.max(1)) as i32 * (c as i32 + 1) / 3
                    + (y * 200 / h.max(1)) as i32 / 2;
                let jitter = n[((y * w + x) * 3 + c) as usize] as i32 / 8;
                image.push((base + jitter).clamp(0, 255) as u8);
            }
        }
    }
    let (cx, cy, r) = (w as f32 * 0.55, h as f32 * 0.45, w.min(h) as f32 * 0.3);
    let mask = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| {
            if ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() < r {
                255
            } else {
                0
            }
        })
        .collect();
    (image, mask)
}

fn request(w: u32, h: u32, seed: u64) -> (serde_json::Value, Vec<u8>, Vec<u8>) {
    let (image, mask) = scene(w, h, seed);
    let body = json!({
        "image": B64.encode(png_rgb(w, h, &image)),
        "mask_image": B64.encode(png_gray(w, h, &mask)),
        "prompt": "ignored, as the seed ignores it",
    });
    (body, image, mask)
}

fn reference(request: &serde_json::Value) -> Vec<u8> {
    let script = workspace().join("models/lama/reference.py");
    let state = artifact("lama/generator.pth");
    let v = python_json(
        &[
            script.to_str().unwrap(),
            "--tiny",
            "--state-dict",
            state.to_str().unwrap(),
        ],
        request,
    );
    B64.decode(v["pixels"].as_str().unwrap()).unwrap()
}

fn lama_server(store: &tempfile::TempDir) -> Server {
    pack(
        store.path(),
        "lama",
        CONFIG,
        &artifact("lama/model.pt"),
        &artifact("handlers/lama.wasm"),
    );
    Server::start(store.path(), &[])
}

#[test]
fn erases_like_the_reference_and_keeps_unmasked_pixels() {
    let store = tempfile::tempdir().unwrap();
    let server = lama_server(&store);
    // Odd sizes exercise the symmetric padding and the crop.
    for (i, (w, h)) in [(61u32, 45u32), (64, 64), (17, 130)]
        .into_iter()
        .enumerate()
    {
        let (body, image, mask) = request(w, h, i as u64);
        let want = reference(&body);
        let reply = post_json(&server.url("/predictions/lama"), &body);
        assert_eq!(reply.status, 200, "{}", reply.text());
        let png = B64
            .decode(reply.json()["generated_image"].as_str().unwrap())
            .unwrap();
        let (gw, gh, got) = decode_png(&png);
        assert_eq!((gw, gh), (w, h));
        let max = max_abs_diff(&got, &want);
        assert!(
            max <= 1,
            "{w}x{h}: differs from the eager reference by {max} grey levels"
        );
        for (p, m) in mask.iter().enumerate() {
            if *m == 0 {
                assert_eq!(
                    &got[p * 3..p * 3 + 3],
                    &image[p * 3..p * 3 + 3],
                    "{w}x{h}: unmasked pixel {p} changed"
                );
            }
        }
        let filled = mask
            .iter()
            .enumerate()
            .filter(|(p, m)| **m > 0 && got[p * 3..p * 3 + 3] != image[p * 3..p * 3 + 3])
            .count();
        assert!(filled > 0, "{w}x{h}: nothing in the hole changed");
    }
}

#[test]
fn jpeg_output_and_bad_inputs() {
    let store = tempfile::tempdir().unwrap();
    let server = lama_server(&store);
    let url = server.url("/predictions/lama");
    let (mut body, _, _) = request(40, 32, 9);
    body["output_format"] = json!("jpeg");
    let reply = post_json(&url, &body);
    assert_eq!(reply.status, 200, "{}", reply.text());
    let jpeg = B64
        .decode(reply.json()["generated_image"].as_str().unwrap())
        .unwrap();
    assert_eq!(&jpeg[..3], &[0xFF, 0xD8, 0xFF], "JPEG magic");

    let (good, _, _) = request(40, 32, 1);
    let (other, _, _) = request(41, 32, 1);
    let mut mismatched = good.clone();
    mismatched["mask_image"] = other["mask_image"].clone();
    let r = post_json(&url, &mismatched);
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("same size"),
        "{}",
        r.text()
    );

    let mut no_mask = good.clone();
    no_mask.as_object_mut().unwrap().remove("mask_image");
    let r = post_json(&url, &no_mask);
    assert_eq!(r.status, 400);
    assert!(r.json()["error"].as_str().unwrap().contains("mask_image"));

    let mut not_image = good.clone();
    not_image["mask_image"] = json!(B64.encode(b"GIF89a nope"));
    assert_eq!(post_json(&url, &not_image).status, 415);

    let (big, _, _) = request(600, 500, 2); // 300k pixels > 250k limit
    let r = post_json(&url, &big);
    assert_eq!(r.status, 413, "{}", r.text());

    let (tiny, _, _) = request(12, 40, 3);
    let r = post_json(&url, &tiny);
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("at least 16x16"),
        "{}",
        r.text()
    );

    let mut bad_format = good.clone();
    bad_format["output_format"] = json!("webp");
    assert_eq!(post_json(&url, &bad_format).status, 400);
    assert_eq!(post_json(&url, &good).status, 200);
}
