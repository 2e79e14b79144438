//! A request body as handlers read it: the SDK's quick field reader (`json::Fields`) must
//! take exactly what serde_json takes (the slow reader, `json::body`), give the same string
//! values and the same error texts, and never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tessera_sdk::{json, Request};

fuzz_target!(|data: &[u8]| {
    let req = Request {
        body: data.to_vec(),
        content_type: "application/json".into(),
        headers: vec![],
    };
    let fast = json::Fields::of(&req);
    let slow = json::body(&req);
    match (&fast, &slow) {
        (Ok(fields), Ok(map)) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(s) => {
                        assert_eq!(fields.str(key).ok(), Some(s.as_str()), "{key}")
                    }
                    serde_json::Value::Null => assert_eq!(fields.opt_text(key).ok(), Some(None)),
                    _ => assert!(fields.str(key).is_err() && fields.opt_str(key).is_none()),
                }
                // Nested reads parse what they find, and never panic.
                let a = fields
                    .nested::<serde_json::Value>(key)
                    .map_err(|e| e.to_string());
                let b = json::nested::<serde_json::Value>(map, key).map_err(|e| e.to_string());
                assert_eq!(a.is_ok(), b.is_ok(), "{key}: {a:?} / {b:?}");
            }
            assert!(fields.str("\u{0}absent").is_err());
        }
        (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
        _ => panic!(
            "the readers disagree: quick {:?}, serde_json {:?}",
            fast.as_ref().err().map(|e| e.to_string()),
            slow.as_ref().err().map(|e| e.to_string())
        ),
    }
});
