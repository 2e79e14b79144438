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
    // The exported model's warm-up method (cuFFT's kernels on a GPU) ends at once on the CPU;
    // the model lists its state.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let state = loop {
        let listed = get(&server.url("/models")).json();
        let lama = listed["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["modelName"] == "lama")
            .cloned()
            .unwrap();
        if lama["warmUp"] != "running" || std::time::Instant::now() > deadline {
            break lama["warmUp"].clone();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(state, "done");
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

/// The LaMa handler written in other languages (guest-handlers/python, guest-handlers/js), on
/// the host's imaging: the same response bytes as the Rust handler, errors included.
#[test]
fn handlers_in_other_languages_answer_like_the_rust_one() {
    let store = tempfile::tempdir().unwrap();
    let languages = ["py", "js"];
    for lang in languages {
        pack(
            store.path(),
            &format!("lama-{lang}"),
            CONFIG,
            &artifact("lama/model.pt"),
            &artifact(&format!("handlers/lama-{lang}.wasm")),
        );
    }
    let server = lama_server(&store);
    let (good, _, _) = request(61, 45, 4);
    let (other, _, _) = request(41, 32, 1);
    let (big, _, _) = request(600, 500, 2);
    let (tiny, _, _) = request(12, 40, 3);
    let with = |base: &serde_json::Value, key: &str, value: serde_json::Value| {
        let mut v = base.clone();
        v[key] = value;
        v
    };
    let mut no_mask = good.clone();
    no_mask.as_object_mut().unwrap().remove("mask_image");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("png", serde_json::to_vec(&good).unwrap(), 200),
        (
            "jpeg",
            serde_json::to_vec(&with(&good, "output_format", json!("jpeg"))).unwrap(),
            200,
        ),
        (
            "format not a string",
            serde_json::to_vec(&with(&good, "output_format", json!(5))).unwrap(),
            200,
        ),
        (
            "data url",
            serde_json::to_vec(&with(
                &good,
                "image",
                json!(format!(
                    "data:image/png;base64,{}",
                    good["image"].as_str().unwrap()
                )),
            ))
            .unwrap(),
            200,
        ),
        (
            "webp",
            serde_json::to_vec(&with(&good, "output_format", json!("webp"))).unwrap(),
            400,
        ),
        (
            "mismatched",
            serde_json::to_vec(&with(&good, "mask_image", other["mask_image"].clone())).unwrap(),
            400,
        ),
        ("no mask", serde_json::to_vec(&no_mask).unwrap(), 400),
        (
            "mask a number",
            serde_json::to_vec(&with(&good, "mask_image", json!(3))).unwrap(),
            400,
        ),
        (
            "gif",
            serde_json::to_vec(&with(
                &good,
                "mask_image",
                json!(B64.encode(b"GIF89a nope")),
            ))
            .unwrap(),
            415,
        ),
        (
            "not base64",
            serde_json::to_vec(&with(&good, "image", json!("%%%"))).unwrap(),
            400,
        ),
        (
            "corrupt png",
            serde_json::to_vec(&with(
                &good,
                "image",
                json!(B64.encode(&png_rgb(20, 20, &[7; 1200])[..60])),
            ))
            .unwrap(),
            400,
        ),
        (
            "over the pixel limit",
            serde_json::to_vec(&big).unwrap(),
            413,
        ),
        ("too small", serde_json::to_vec(&tiny).unwrap(), 400),
        ("array body", b"[1, 2]".to_vec(), 400),
        ("not json", b"{\"image\": ".to_vec(), 400),
    ];
    for (case, body, status) in &cases {
        let rust = post(
            &server.url("/predictions/lama"),
            &[("content-type", "application/json")],
            body,
        );
        assert_eq!(rust.status, *status, "{case}: {}", rust.text());
        for lang in languages {
            let url = server.url(&format!("/predictions/lama-{lang}"));
            let other = post(&url, &[("content-type", "application/json")], body);
            assert_eq!(other.status, rust.status, "{lang} {case}: {}", other.text());
            // JSON parsers word their errors differently; everything else is the same bytes.
            if *case != "not json" {
                assert_eq!(other.text(), rust.text(), "{lang} {case}");
            }
        }
    }
}
