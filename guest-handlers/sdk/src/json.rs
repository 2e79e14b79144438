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
/// read. Other values are only told apart from strings; arrays are skipped unvalidated
/// (serde_json does not check the nesting depth, lone surrogates or number ranges of what it
/// skips, where [`body`] refuses them): they are never read. Otherwise the same errors as [`body`] and
/// [`str_field`].
pub struct Fields<'a>(Object<'a>);

type Object<'a> = std::collections::HashMap<Cow<'a, str>, Field<'a>>;

/// A JSON value as [`Fields`] reads it.
enum Field<'a> {
    Str(Cow<'a, str>),
    Object(Object<'a>),
    Other,
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
                Ok(Field::Other)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Self::Value, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
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
        match serde_json::from_slice::<Field>(&req.body) {
            Ok(Field::Object(map)) => Ok(Fields(map)),
            Ok(_) => Err(HandlerError::bad("request body must be a JSON object")),
            Err(e) => Err(HandlerError::bad(format!(
                "request body is not valid JSON: {e}"
            ))),
        }
    }

    /// A required string field (400 when missing or not a string).
    pub fn str(&self, key: &str) -> Result<&str, HandlerError> {
        match self.0.get(key) {
            Some(Field::Str(s)) => Ok(s),
            Some(_) => Err(HandlerError::bad(format!("field '{key}' must be a string"))),
            None => Err(HandlerError::bad(format!("missing field '{key}'"))),
        }
    }

    /// An optional field's string value (`None` when absent or not a string).
    pub fn opt_str(&self, key: &str) -> Option<&str> {
        match self.0.get(key) {
            Some(Field::Str(s)) => Some(s),
            _ => None,
        }
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
            f.0.get("image"),
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
        let r = req("{\"image\": ");
        let (a, b) = (
            msg(Fields::of(&r).err().unwrap()),
            msg(body(&r).unwrap_err()),
        );
        assert_eq!(a, b);
        assert!(a.starts_with("request body is not valid JSON"));
    }
}
