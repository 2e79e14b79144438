//! JSON request bodies.
use crate::{HandlerError, Request};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::borrow::Cow;

/// Parses the request body as a JSON object.
pub fn body(req: &Request) -> Result<serde_json::Map<String, Value>, HandlerError> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(HandlerError::bad("request body must be a JSON object")),
        Err(e) => Err(HandlerError::bad(format!(
            "request body is not valid JSON: {e}"
        ))),
    }
}

/// A JSON object's fields with their string values borrowed from the request body where it
/// holds them unescaped (base64 images always are): megabytes of photo are not copied to be
/// read. Other values are only told apart from strings, but read through as serde_json reads
/// them (nesting depth, UTF-8, escapes, number ranges), so a body [`body`] refuses is refused
/// here, with [`body`]'s error; otherwise the same errors as [`body`] and [`str_field`].
pub struct Fields<'a> {
    map: Object<'a>,
    body: &'a [u8],
}

type Object<'a> = std::collections::HashMap<Cow<'a, str>, Field<'a>>;

/// A JSON value as [`Fields`] reads it.
#[derive(Debug, PartialEq)]
enum Field<'a> {
    Str(Cow<'a, str>),
    Object(Object<'a>),
    Null,
    /// An array, read through (its elements dropped).
    Array,
    Other,
    /// A value other than a string as the quick read leaves it: its JSON text, checked.
    Raw(&'a [u8]),
}

impl<'de> serde::Deserialize<'de> for Field<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Field<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Field::Str(Cow::Owned(v)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Field::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Field::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                // Each element read (and dropped) as a Field, not skipped: serde_json checks
                // what it skips less than what it reads (UTF-8, escapes, number ranges), and
                // `body` reads everything.
                while a.next_element::<Field>()?.is_some() {}
                Ok(Field::Array)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                let mut map = Object::new();
                while let Some((k, v)) = a.next_entry::<Cow<'de, str>, Field<'de>>()? {
                    map.insert(k, v);
                }
                Ok(Field::Object(map))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'a> Fields<'a> {
    /// Parses the request body as a JSON object (a 400 otherwise).
    pub fn of(req: &'a Request) -> Result<Fields<'a>, HandlerError> {
        let body = &req.body[..];
        if let Some(map) = scan::object(body) {
            return Ok(Fields { map, body });
        }
        match serde_json::from_slice::<Field>(body) {
            Ok(Field::Object(map)) => Ok(Fields { map, body }),
            Ok(_) => Err(self::body(req)
                .err()
                .unwrap_or_else(|| HandlerError::bad("request body must be a JSON object"))),
            // serde_json words some errors by the type it reads into ("invalid number" for a
            // Field where a Value gets "EOF while parsing a value", for `[-`): an invalid
            // body's error is `body`'s, whatever reader found it.
            Err(e) => Err(self::body(req).err().unwrap_or_else(|| {
                HandlerError::bad(format!("request body is not valid JSON: {e}"))
            })),
        }
    }

    /// A required string field (400 when missing or not a string).
    pub fn str(&self, key: &str) -> Result<&str, HandlerError> {
        match self.map.get(key) {
            Some(Field::Str(s)) => Ok(s),
            Some(_) => Err(HandlerError::bad(format!("field '{key}' must be a string"))),
            None => Err(HandlerError::bad(format!("missing field '{key}'"))),
        }
    }

    /// An optional field's string value (`None` when absent or not a string).
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        match self.map.get(key) {
            Some(Field::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// An optional string field: `None` when absent or null, a 400 when not a string.
    pub fn opt_text(&self, key: &str) -> Result<Option<&str>, HandlerError> {
        match self.map.get(key) {
            None | Some(Field::Null | Field::Raw(b"null")) => Ok(None),
            Some(Field::Str(s)) => Ok(Some(s)),
            Some(_) => Err(HandlerError::bad(format!("field '{key}' must be a string"))),
        }
    }

    /// [`nested`] of this body: an optional field given as a JSON value or as a string holding
    /// JSON; absent, null or a blank string gives `T::default()`.
    pub fn nested<T: DeserializeOwned + Default>(&self, key: &str) -> Result<T, HandlerError> {
        let parsed = match self.map.get(key) {
            None => return Ok(T::default()),
            Some(Field::Str(s)) if s.trim().is_empty() => return Ok(T::default()),
            Some(Field::Str(s)) => serde_json::from_str::<T>(s),
            Some(Field::Raw(b"null") | Field::Null) => return Ok(T::default()),
            // Through a value, as `nested` reads it: the same errors (no position in the text).
            Some(Field::Raw(text)) => {
                serde_json::from_slice::<Value>(text).and_then(serde_json::from_value::<T>)
            }
            // Read by serde_json alone (see `scan`): read it again as a map of values.
            Some(Field::Object(_) | Field::Array | Field::Other) => {
                let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(self.body) else {
                    return Err(HandlerError::bad("request body must be a JSON object"));
                };
                return nested(&map, key);
            }
        };
        parsed.map_err(|e| HandlerError::bad(format!("field '{key}' is invalid: {e}")))
    }
}

/// The top level of a body read quickly: its strings of plain ASCII (base64 images) are
/// skipped over 16 bytes at a time inside the sandbox (Wasm SIMD) instead of byte by byte,
/// anything else (escapes, non-ASCII, other values) is left to serde_json, and any doubt
/// (invalid JSON, not an object) gives `None`, so that [`Fields::of`] reads the body again
/// with serde_json alone and words the error as before. Other values are read as the slow
/// path reads them (a [`Field`], so numbers, nested objects and their strings are checked
/// alike), and one nested nearly as deep as serde_json allows is left to the slow path, whose
/// budget counts the top-level object too.
mod scan {
    use super::{Field, Object};
    use std::borrow::Cow;

    fn space(body: &[u8], mut i: usize) -> usize {
        while matches!(body.get(i), Some(b' ' | b'\n' | b'\t' | b'\r')) {
            i += 1;
        }
        i
    }

    /// Whether a byte may stand for itself in a JSON string that borrows as plain ASCII.
    fn plain(b: u8) -> bool {
        (0x20..0x80).contains(&b) && b != b'"' && b != b'\\'
    }

    /// How many plain bytes `bytes` starts with.
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    fn plain_run(bytes: &[u8]) -> usize {
        use core::arch::wasm32::*;
        // Signed, a byte of 0x80 or more is below 0x20 too: one test for both.
        let (low, quote, backslash) = (i8x16_splat(0x20), u8x16_splat(b'"'), u8x16_splat(b'\\'));
        let mut n = 0;
        for chunk in bytes.chunks_exact(16) {
            // SAFETY: `chunk` is 16 readable bytes, and v128_load needs no alignment.
            let v = unsafe { v128_load(chunk.as_ptr() as *const v128) };
            let stop = v128_or(
                i8x16_lt(v, low),
                v128_or(u8x16_eq(v, quote), u8x16_eq(v, backslash)),
            );
            let mask = u8x16_bitmask(stop);
            if mask != 0 {
                return n + mask.trailing_zeros() as usize;
            }
            n += 16;
        }
        n + bytes[n..].iter().take_while(|&&b| plain(b)).count()
    }

    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    fn plain_run(bytes: &[u8]) -> usize {
        bytes.iter().take_while(|&&b| plain(b)).count()
    }

    /// Nested objects and arrays past which a value is left to the slow path: serde_json
    /// allows 128 levels, the top-level object taking one.
    const MAX_DEPTH: usize = 126;

    /// How deep objects and arrays nest in `text`, one JSON value serde_json has read: counted
    /// on the text, since a key given twice leaves only its last value in a parsed object while
    /// serde_json's depth limit applies to both.
    fn nesting(text: &[u8]) -> usize {
        let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
        for &b in text {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        deepest
    }

    /// One value at `body[i..]`, checked by serde_json, and where it ends.
    fn value<'a, T: serde::Deserialize<'a>>(body: &'a [u8], i: usize) -> Option<(T, usize)> {
        let mut values = serde_json::Deserializer::from_slice(&body[i..]).into_iter::<T>();
        let v = values.next()?.ok()?;
        Some((v, i + values.byte_offset()))
    }

    /// The string at `body[i..]` (which starts with a quote), and where it ends.
    fn string(body: &[u8], i: usize) -> Option<(Cow<'_, str>, usize)> {
        let start = i + 1;
        let end = start + plain_run(&body[start..]);
        if body.get(end) == Some(&b'"') {
            // SAFETY: every byte of it is ASCII (`plain`), so it is UTF-8: checking again
            // would cost as much as finding its end did.
            let text = unsafe { std::str::from_utf8_unchecked(&body[start..end]) };
            return Some((Cow::Borrowed(text), end + 1));
        }
        match value::<Field>(body, i)? {
            (Field::Str(s), end) => Some((s, end)),
            _ => None,
        }
    }

    pub(super) fn object(body: &[u8]) -> Option<Object<'_>> {
        let mut map = Object::new();
        let mut i = space(body, 0);
        if body.get(i) != Some(&b'{') {
            return None;
        }
        i = space(body, i + 1);
        if body.get(i) == Some(&b'}') {
            i += 1;
        } else {
            loop {
                if body.get(i) != Some(&b'"') {
                    return None;
                }
                let (key, after) = string(body, i)?;
                i = space(body, after);
                if body.get(i) != Some(&b':') {
                    return None;
                }
                i = space(body, i + 1);
                let (field, after) = match body.get(i)? {
                    b'"' => {
                        let (s, after) = string(body, i)?;
                        (Field::Str(s), after)
                    }
                    _ => {
                        let (_, after) = value::<Field>(body, i)?;
                        if nesting(&body[i..after]) >= MAX_DEPTH {
                            return None;
                        }
                        (Field::Raw(&body[i..after]), after)
                    }
                };
                map.insert(key, field);
                i = space(body, after);
                match body.get(i)? {
                    b',' => i = space(body, i + 1),
                    b'}' => {
                        i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        (space(body, i) == body.len()).then_some(map)
    }
}

/// A required string field.
pub fn str_field<'a>(
    map: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<&'a str, HandlerError> {
    match map.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(HandlerError::bad(format!("field '{key}' must be a string"))),
        None => Err(HandlerError::bad(format!("missing field '{key}'"))),
    }
}

/// An optional field that may be given either as a JSON value or as a string holding JSON
/// (the seed's clients send `"gen_args": "<json string>"`). Absent or null gives `T::default()`.
pub fn nested<T: DeserializeOwned + Default>(
    map: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<T, HandlerError> {
    let parsed = match map.get(key) {
        None | Some(Value::Null) => return Ok(T::default()),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(T::default()),
        Some(Value::String(s)) => serde_json::from_str::<T>(s),
        Some(v) => serde_json::from_value::<T>(v.clone()),
    };
    parsed.map_err(|e| HandlerError::bad(format!("field '{key}' is invalid: {e}")))
}

/// Serialises a handler's own context for `postprocess` (the WIT `context` bytes).
pub fn to_context<T: Serialize>(ctx: &T) -> Result<Vec<u8>, HandlerError> {
    serde_json::to_vec(ctx).map_err(|e| HandlerError::Internal(format!("serialising context: {e}")))
}

/// Reads back what [`to_context`] wrote.
pub fn from_context<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HandlerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| HandlerError::Internal(format!("reading context: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(body: &str) -> Request {
        Request {
            body: body.as_bytes().to_vec(),
            content_type: "application/json".into(),
            headers: vec![],
        }
    }

    #[test]
    fn fields_borrow_strings_and_answer_like_the_map() {
        let r = req(
            r#"{"image": "aGk=", "esc": "a\/b", "n": 3, "o": {"x": [1, {"y": 2}]}, "image": "bGFzdA=="}"#,
        );
        let f = Fields::of(&r).unwrap();
        // The last of a repeated key, as serde_json's map keeps it.
        assert_eq!(f.str("image").unwrap(), "bGFzdA==");
        assert!(matches!(
            f.map.get("image"),
            Some(Field::Str(Cow::Borrowed(_)))
        ));
        assert_eq!(f.str("esc").unwrap(), "a/b");
        assert_eq!(f.opt_str("n"), None);
        assert_eq!(f.opt_str("missing"), None);
        let msg = |e: HandlerError| match e {
            HandlerError::BadRequest(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(msg(f.str("o").unwrap_err()), "field 'o' must be a string");
        assert_eq!(msg(f.str("gone").unwrap_err()), "missing field 'gone'");
        for not_object in ["[1, 2]", "\"x\"", "3", "null", "true"] {
            let r = req(not_object);
            assert_eq!(
                msg(Fields::of(&r).err().unwrap()),
                "request body must be a JSON object"
            );
            assert_eq!(
                msg(body(&r).unwrap_err()),
                "request body must be a JSON object"
            );
        }
        // serde_json words these by the type read into (found by the request_json fuzz target).
        for text in ["[-", "{\"a\": -", "{\"a\": [1e"] {
            let r = req(text);
            assert_eq!(
                msg(Fields::of(&r).err().unwrap()),
                msg(body(&r).unwrap_err()),
                "{text}"
            );
        }
        let r = req("{\"image\": ");
        let (a, b) = (
            msg(Fields::of(&r).err().unwrap()),
            msg(body(&r).unwrap_err()),
        );
        assert_eq!(a, b);
        assert!(a.starts_with("request body is not valid JSON"));
    }

    /// What the quick read made of `body` is what serde_json makes of it (the values it left
    /// as JSON text read in place).
    fn assert_agrees(body: &[u8], fast: Object<'_>) {
        let fast = fast
            .into_iter()
            .map(|(k, v)| match v {
                Field::Raw(text) => (k, serde_json::from_slice::<Field>(text).unwrap()),
                v => (k, v),
            })
            .collect();
        let slow = serde_json::from_slice::<Field>(body);
        assert!(
            matches!(&slow, Ok(s) if *s == Field::Object(fast)),
            "{:?}: {slow:?}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        );
    }

    #[test]
    fn the_quick_read_agrees_with_serde_json_or_steps_aside() {
        let long = "QUJD".repeat(5000);
        let valid = [
            r#"{}"#.to_string(),
            " \t\r\n{ } \n".to_string(),
            r#"{"image": "aGk=", "mask_image": "bWFzaw=="}"#.to_string(),
            format!(r#"{{"image":"{long}","gen_args":{{"point_coords":[1,2],"point_labels":1}}}}"#),
            format!(r#"{{"image": "{long}", "image": "b"}}"#),
            r#"{"esc": "a\/b\n\u00e9", "k\u0041": 1, "n": -1.5e3, "t": true, "z": null}"#
                .to_string(),
            "{\"utf8\": \"caf\u{e9} \u{1F600}\", \"x\": [1, {\"y\": [\"s\"]}]}".to_string(),
            r#"{"a":{},"b":[],"c":"","d":0}"#.to_string(),
            format!(r#"{{"prompt": "{long}\"quoted\"", "n": 1}}"#),
        ];
        let invalid = [
            "",
            "{",
            "{\"a\"",
            "{\"a\":",
            "{\"a\": 1,}",
            "{\"a\" 1}",
            "{\"a\": 1} x",
            "{\"a\": \"b\u{1}\"}",
            "{a: 1}",
            "{\"a\": 01}",
            "{\"a\": \"\\x\"}",
            "[1]",
            "\"s\"",
            "{\"a\": \"unterminated}",
            "{\"a\": tru}",
            "{,}",
            "{\"a\": 1 \"b\": 2}",
            // Checked inside other values too: a number out of range, a lone surrogate and a
            // control character in a nested string.
            "{\"i\": \"x\", \"n\": 1e400}",
            "{\"m\": {\"k\": \"\\ud800\"}}",
            "{\"m\": {\"k\": \"\u{1}\"}}",
        ];
        for body in &valid {
            let fast = scan::object(body.as_bytes()).expect("a valid object is read quickly");
            assert_agrees(body.as_bytes(), fast);
        }
        // Damaged copies of the valid bodies (bytes replaced, inserted, removed, from JSON's
        // own characters mostly): whatever the quick read takes, serde_json takes the same.
        let alphabet = b"{}[]\":,\\ \n\tetrufalsn0123456789.-+eEu\x01\x7f\xc3\xa9\xffabQ=";
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let (mut taken, mut tried) = (0, 0);
        for round in 0..20_000 {
            let base = valid[round % valid.len()].as_bytes();
            let mut body = base.to_vec();
            for _ in 0..1 + next(3) {
                let at = next(body.len() + 1);
                let c = alphabet[next(alphabet.len())];
                match next(3) {
                    0 if at < body.len() => body[at] = c,
                    1 => body.insert(at, c),
                    _ if at < body.len() => {
                        body.remove(at);
                    }
                    _ => body.push(c),
                }
            }
            tried += 1;
            if let Some(fast) = scan::object(&body) {
                taken += 1;
                assert_agrees(&body, fast);
            }
        }
        assert!(
            taken > 1000 && taken < tried,
            "{taken} of {tried} damaged bodies read quickly"
        );
        for body in invalid {
            assert!(scan::object(body.as_bytes()).is_none(), "{body}");
            let slow = serde_json::from_slice::<Field>(body.as_bytes());
            assert!(!matches!(slow, Ok(Field::Object(_))), "{body}");
        }
        // Nested values, as `nested` reads them, either way.
        #[derive(serde::Deserialize, Default, Debug, PartialEq)]
        struct Args {
            k: Option<u32>,
        }
        for body in [
            r#"{"a": {"k": 3}, "b": "{\"k\": 4}", "c": null, "d": " ", "e": {"k": "x"}}"#,
            r#"{"a": {"k": 3}, "b": "{\"k\": 4}", "c": null, "d": " ", "e": {"k": "x"}, "f": "\u0000"}"#,
        ] {
            let r = req(body);
            let f = Fields::of(&r).unwrap();
            assert_eq!(f.nested::<Args>("a").unwrap(), Args { k: Some(3) });
            assert_eq!(f.nested::<Args>("b").unwrap(), Args { k: Some(4) });
            for default in ["c", "d", "missing"] {
                assert_eq!(f.nested::<Args>(default).unwrap(), Args::default());
            }
            let map = self::body(&r).unwrap();
            let (a, b) = (
                f.nested::<Args>("e").unwrap_err(),
                nested::<Args>(&map, "e").unwrap_err(),
            );
            assert_eq!(format!("{a:?}"), format!("{b:?}"));
        }

        // Nesting: what serde_json takes under the top level is taken, one level more is not
        // (whichever path reads it).
        let nest = |n: usize| {
            format!(
                r#"{{"img": "a", "m": {}1{}}}"#,
                r#"{"k":"#.repeat(n),
                "}".repeat(n)
            )
        };
        for n in [1, 100, 125, 126, 127, 200] {
            let body = nest(n);
            let slow = serde_json::from_slice::<Field>(body.as_bytes());
            match scan::object(body.as_bytes()) {
                Some(fast) => {
                    assert!(slow.is_ok(), "{n}: read quickly, refused by serde_json");
                    assert_eq!(fast.len(), 2);
                }
                None => assert!(n >= 126, "{n} levels left to the slow path"),
            }
            assert_eq!(Fields::of(&req(&body)).is_ok(), slow.is_ok(), "{n}");
        }
        // The same with arrays, and arrays of objects (arrays are read through, not skipped).
        let msg = |e: HandlerError| e.to_string();
        let body_of = |text: &str| body(&req(text));
        let arrays = |n: usize, open: &str, close: &str| {
            format!(
                r#"{{"img": "a", "m": {}1{}}}"#,
                open.repeat(n),
                close.repeat(n)
            )
        };
        for n in [1, 63, 64, 100, 126, 127, 200] {
            for body in [arrays(n, "[", "]"), arrays(n, r#"[{"k":"#, "}]")] {
                let slow = serde_json::from_slice::<Value>(body.as_bytes());
                let r = req(&body);
                let fast = Fields::of(&r);
                assert_eq!(fast.is_ok(), slow.is_ok(), "{n}: {body:.40}");
                if let (Err(a), Err(b)) = (fast, body_of(&body)) {
                    assert_eq!(msg(a), msg(b));
                }
            }
        }
        // A key given twice: the parsed object keeps the last value, serde_json's depth limit
        // counts both (found in review).
        for n in [120, 125, 126, 127] {
            let body = format!(
                r#"{{"a": {{"k": {}{}, "k": 0}}}}"#,
                "[".repeat(n),
                "]".repeat(n)
            );
            let r = req(&body);
            let slow = serde_json::from_slice::<Value>(body.as_bytes());
            assert_eq!(Fields::of(&r).is_ok(), slow.is_ok(), "{n}");
        }
        // Invalid text inside an array (serde_json refuses it where it reads, not where it
        // skips): refused alike, with the same error (found by the request_json fuzz target).
        for text in [
            &b"{\"a\": [\"\xa1\"]}"[..],
            br#"{"a": ["\ud800"]}"#,
            br#"{"a": [1e999]}"#,
            b"[\"\xa1{\"\n\n] ",
        ] {
            let r = Request {
                body: text.to_vec(),
                content_type: String::new(),
                headers: vec![],
            };
            assert_eq!(
                msg(Fields::of(&r).err().unwrap()),
                msg(body(&r).unwrap_err())
            );
        }
        // Non-UTF-8 inside a string: serde_json's error, by the slow path.
        let mut bad = br#"{"a": "x"#.to_vec();
        bad.extend_from_slice(&[0xff, b'"', b'}']);
        assert!(scan::object(&bad).is_none());
        assert!(Fields::of(&Request {
            body: bad,
            content_type: String::new(),
            headers: vec![]
        })
        .is_err());
    }
}
