//! Base64 text as requests carry images: decoding takes any bytes without panicking, the
//! text as given and re-encoded round-trips, and a decode large enough to run on several
//! threads gives the same bytes (or the same refusal) as one piece at a time would.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_imaging::{base64_decode, base64_encode};

fuzz_target!(|data: &[u8]| {
    let Ok(bytes) = base64_decode("image", data) else {
        return;
    };
    let text = base64_encode(&bytes);
    assert_eq!(
        base64_decode("image", &text).ok().as_deref(),
        Some(&bytes[..])
    );
    // Repeated past the parallel threshold (1 MiB of text) when it has no padding: the pieces
    // decode to the bytes repeated.
    if !bytes.is_empty() && bytes.len() % 3 == 0 {
        let copies = (1 << 20) / text.len() + 2;
        let whole = base64_decode("image", text.repeat(copies).as_bytes()).expect("valid");
        assert_eq!(whole, bytes.repeat(copies));
    }
});
