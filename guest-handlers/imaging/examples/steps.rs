//! Times each step of LaMa's pixel path natively (base64, PNG decode, luma, padding, PNG
//! encode, base64 out) on a photo-like image, to see where a request's handler time goes.
use base64::Engine;
use std::time::Instant;
use tessera_imaging as imaging;

fn main() {
    for (w, h) in [(1024u32, 683u32), (2048, 1536)] {
        let mut s = 1u32;
        let img = imaging::Rgb::from_fn(w, h, |x, y| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            let j = (s >> 27) as u32;
            image::Rgb([
                (x * 255 / w + j) as u8,
                (y * 255 / h + j) as u8,
                ((x + y) % 256) as u8,
            ])
        });
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let text = base64::engine::general_purpose::STANDARD.encode(&png);
        let mut t = Instant::now();
        let mut lap = |what: &str| {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            println!("{w}x{h} {what}: {ms:.2} ms");
            t = Instant::now();
        };
        let bytes = imaging::base64_decode("image", &text).unwrap();
        lap("base64 decode");
        let decoded = imaging::decode("image", &bytes, u64::MAX).unwrap();
        lap("PNG decode");
        let rgb = decoded.clone().into_rgb8();
        lap("to RGB");
        let luma = imaging::luma_pil(decoded);
        lap("luma");
        let (pw, ph) = (w.div_ceil(8) as usize * 8, h.div_ceil(8) as usize * 8);
        let padded = imaging::pad_symmetric(rgb.as_raw(), w as usize, h as usize, 3, pw, ph);
        lap("pad");
        let _ = imaging::pad_symmetric(luma.as_raw(), w as usize, h as usize, 1, pw, ph);
        lap("pad mask");
        let cropped = imaging::crop(&padded, (pw, ph, 3), (0, 0, w as usize, h as usize)).unwrap();
        lap("crop");
        let out = imaging::DynamicImage::ImageRgb8(imaging::Rgb::from_raw(w, h, cropped).unwrap());
        lap("to image");
        let encoded = imaging::encode_png(&out).unwrap();
        lap("PNG encode");
        let _ = base64::engine::general_purpose::STANDARD.encode(&encoded);
        lap("base64 encode");
        println!(
            "{w}x{h}: png in {} bytes, out {} bytes",
            png.len(),
            encoded.len()
        );
    }
}
