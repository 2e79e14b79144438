//! PNG and JPEG bytes from a request, decoded under a pixel limit: never a panic, never an
//! image over the limit, the header's size is the decoded size, and what decodes re-encodes
//! (PNG, the handlers' own encoder) to the same pixels.
//!
//! A panic inside a decoder is contained by `decode`/`dimensions` (a 400, as in the host), so
//! libFuzzer's panic hook, which aborts at once, lets decoder panics unwind to them; any other
//! panic still aborts where it happens, and one that left them would abort too (libfuzzer-sys
//! aborts on any panic leaving the closure).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_imaging::{decode, dimensions, encode_png, luma_pil, panic_is_contained};

const MAX_PIXELS: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        // libFuzzer's hook (report, then abort where the panic happened) for every panic but
        // the decoders' own, which unwind to `decode`/`dimensions` and are expected here.
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.location().is_some_and(|l| panic_is_contained(l.file())) {
                abort(info)
            }
        }))
    });
    let dims = dimensions("image", data, MAX_PIXELS);
    let Ok(img) = decode("image", data, MAX_PIXELS) else {
        return;
    };
    let (w, h) = (img.width(), img.height());
    assert!(u64::from(w) * u64::from(h) <= MAX_PIXELS);
    assert_eq!(dims.ok(), Some((w, h)));
    let luma = luma_pil(img.clone());
    assert_eq!(luma.dimensions(), (w, h));
    let rgb = image_rgb(&img);
    let png = encode_png(&rgb).expect("an RGB image encodes");
    let back = decode("image", &png, MAX_PIXELS).expect("our PNG decodes");
    assert_eq!(image_rgb(&back).as_bytes(), rgb.as_bytes());
});

fn image_rgb(img: &tessera_imaging::DynamicImage) -> tessera_imaging::DynamicImage {
    tessera_imaging::DynamicImage::ImageRgb8(img.to_rgb8())
}
