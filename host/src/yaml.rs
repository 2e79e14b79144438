//! YAML from untrusted files, bounded.
//!
//! A YAML anchor may be aliased many times, and each alias replays the whole anchored node, so a
//! 1 MiB file can describe billions of values. Parsing here first walks the document with a
//! counting visitor that gives up after `max_nodes` nodes (aliases counted as often as they
//! expand), and only then deserializes the real type, which therefore never expands more than
//! that. The parser keeps the file's events, not their expansion, so the walk itself holds no
//! more than the file.
use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::cell::Cell;

/// Nodes a configuration file may expand to; real configs have tens.
pub const MAX_NODES: usize = 10_000;

/// Deserializes `text`, refusing documents that expand to more than `max_nodes` nodes.
pub fn from_str_bounded<T: DeserializeOwned>(text: &str, max_nodes: usize) -> Result<T, String> {
    let seen = Cell::new(0);
    Count {
        seen: &seen,
        max: max_nodes,
    }
    .deserialize(serde_norway::Deserializer::from_str(text))
    .map_err(|e| e.to_string())?;
    serde_norway::from_str(text).map_err(|e| e.to_string())
}

/// Counts every node it visits and fails past `max`.
#[derive(Clone, Copy)]
struct Count<'a> {
    seen: &'a Cell<usize>,
    max: usize,
}

impl Count<'_> {
    fn bump<E: de::Error>(&self) -> Result<(), E> {
        let n = self.seen.get() + 1;
        self.seen.set(n);
        if n > self.max {
            Err(E::custom(format!(
                "document expands to more than {} values (anchors and aliases count each time they are used)",
                self.max
            )))
        } else {
            Ok(())
        }
    }
}

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! leaf {
    ($($name:ident: $t:ty),*) => {$(
        fn $name<E: de::Error>(self, _: $t) -> Result<(), E> { self.bump() }
    )*};
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    leaf!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_i128: i128, visit_u128: u128,
          visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.bump()?;
        self.deserialize(d)
    }
    fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        self.bump()?;
        self.deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.bump()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.bump()?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`).
        use de::VariantAccess;
        self.bump()?;
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn plain_documents_parse() {
        let v: BTreeMap<String, serde_norway::Value> =
            from_str_bounded("a: 1\nb: [x, y]\nc: {d: !t 3}\n", 100).unwrap();
        assert_eq!(v.len(), 3);
    }

    #[test]
    fn alias_expansion_is_bounded() {
        // 10 scalars aliased 10 times per level, three levels: 10^4 values from ~40 lines.
        let mut doc = String::from("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n");
        for (name, prev) in [("b", "a"), ("c", "b"), ("d", "c")] {
            let aliases = vec![format!("*{prev}"); 10].join(", ");
            doc.push_str(&format!("{name}: &{name} [{aliases}]\n"));
        }
        let err =
            from_str_bounded::<BTreeMap<String, serde_norway::Value>>(&doc, 5_000).unwrap_err();
        assert!(err.contains("more than 5000 values"), "{err}");
        // The same document is fine when the bound allows its real size.
        assert!(from_str_bounded::<BTreeMap<String, serde_norway::Value>>(&doc, 20_000).is_ok());
    }
}
