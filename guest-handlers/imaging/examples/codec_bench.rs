//! Times PNG encode/decode settings on a photo-like image (native; relative numbers only),
//! and the strip encoder `encode_png` uses.
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ImageEncoder, RgbImage};
use std::time::Instant;

fn main() {
    let n = 1024u32;
    let mut img = RgbImage::new(n, n);
    let mut s = 1u32;
    for (x, y, p) in img.enumerate_pixels_mut() {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        let j = (s >> 28) as i32;
        p.0 = [
            ((x * 200 / n) as i32 + 30 + j) as u8,
            ((y * 180 / n) as i32 + 40 + j) as u8,
            (((x + y) * 100 / n) as i32 + 20 + j) as u8,
        ];
    }
    for (name, c, f) in [
        (
            "default/adaptive",
            CompressionType::Default,
            FilterType::Adaptive,
        ),
        ("fast/adaptive", CompressionType::Fast, FilterType::Adaptive),
        ("fast/sub", CompressionType::Fast, FilterType::Sub),
        ("fast/up", CompressionType::Fast, FilterType::Up),
    ] {
        let t = Instant::now();
        let mut out = Vec::new();
        for _ in 0..5 {
            out.clear();
            PngEncoder::new_with_quality(&mut out, c, f)
                .write_image(img.as_raw(), n, n, image::ExtendedColorType::Rgb8)
                .unwrap();
        }
        let enc = t.elapsed().as_secs_f64() / 5.0 * 1e3;
        let t = Instant::now();
        for _ in 0..5 {
            let _ = image::load_from_memory(&out).unwrap().to_rgb8();
        }
        let dec = t.elapsed().as_secs_f64() / 5.0 * 1e3;
        println!(
            "{name:18} encode {enc:6.1} ms  decode {dec:6.1} ms  {} KiB",
            out.len() / 1024
        );
    }
    // What encode_png does: Sub, in strips with a code of their own, side by side natively
    // (set RAYON_NUM_THREADS=1 for one thread).
    let t = Instant::now();
    let mut out = Vec::new();
    for _ in 0..5 {
        out = tessera_imaging::encode_png_pixels(img.as_raw(), (n, n), 3).unwrap();
    }
    let enc = t.elapsed().as_secs_f64() / 5.0 * 1e3;
    println!(
        "{:18} encode {enc:6.1} ms  {} KiB",
        "strips/sub",
        out.len() / 1024
    );
}
