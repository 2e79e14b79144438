//! CLIP's byte-level BPE tokenizer, as `transformers`' `CLIPTokenizer` runs it from a
//! `tokenizer/` folder (`vocab.json`, `merges.txt`, `tokenizer_config.json`):
//!
//! 1. normalise: NFC, every run of whitespace to one space, lower case (per character);
//! 2. split out the special tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token: SD2's is
//!    `"!"`, which therefore always becomes id 0, never a BPE piece);
//! 3. pre-tokenise the rest with CLIP's pattern (contractions, letter runs, single digits, runs
//!    of other symbols), map each piece's UTF-8 bytes to the byte-level alphabet, and apply the
//!    BPE merges with `</w>` marking the end of each piece;
//! 4. `<|startoftext|>` + the first `max_len - 2` ids + `<|endoftext|>`, padded to `max_len`.
use std::collections::HashMap;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    /// Merge rank and the merged token's id, by the ids of the pair.
    ranks: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's symbol, inside a piece and at its end (with `</w>`).
    byte_ids: [u32; 256],
    byte_end_ids: [u32; 256],
    /// Special tokens with their ids, longest first (leftmost-longest matching).
    specials: Vec<(String, u32)>,
    pattern: Regex,
    whitespace: Regex,
    bos: u32,
    eos: u32,
    pad: u32,
    pub max_len: usize,
}

/// GPT-2/CLIP's reversible byte -> printable character map.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut extra = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    out
}

fn token_content(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Builds the tokenizer from the folder's files. `config` is `tokenizer_config.json` (its
    /// `pad_token` and `model_max_length` are used; absent: `<|endoftext|>` and 77).
    pub fn new(vocab_json: &[u8], merges_txt: &str, config: Option<&[u8]>) -> Result<Self, String> {
        let vocab: HashMap<String, u32> =
            serde_json::from_slice(vocab_json).map_err(|e| format!("vocab.json: {e}"))?;
        let mut ranks = HashMap::new();
        for (rank, line) in merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .enumerate()
        {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => {
                    // A merge whose parts or result the vocabulary lacks can never apply.
                    if let (Some(&ia), Some(&ib), Some(&im)) =
                        (vocab.get(a), vocab.get(b), vocab.get(&format!("{a}{b}")))
                    {
                        ranks.entry((ia, ib)).or_insert((rank as u32, im));
                    }
                }
                _ => {
                    return Err(format!(
                        "merges.txt line {}: '{line}' is not 'a b'",
                        rank + 2
                    ))
                }
            }
        }
        let config: serde_json::Value = match config {
            Some(bytes) => {
                serde_json::from_slice(bytes).map_err(|e| format!("tokenizer_config.json: {e}"))?
            }
            None => serde_json::Value::Null,
        };
        let pad_token = config
            .get("pad_token")
            .and_then(token_content)
            .unwrap_or_else(|| EOS.to_string());
        let max_len = config
            .get("model_max_length")
            .and_then(|v| v.as_u64())
            .filter(|n| (2..=4096).contains(n))
            .unwrap_or(77) as usize;
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| format!("vocab.json has no '{t}'"))
        };
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(&pad_token)?);
        let mut specials = vec![(BOS.to_string(), bos), (EOS.to_string(), eos)];
        if pad_token != BOS && pad_token != EOS {
            specials.push((pad_token.clone(), pad));
        }
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        // Every byte symbol (with and without </w>) is in CLIP's vocab; a vocabulary without
        // one maps it to <|endoftext|>, the unknown token.
        let chars = byte_chars();
        let lookup = |t: String| vocab.get(&t).copied().unwrap_or(eos);
        let byte_ids = std::array::from_fn(|b| lookup(chars[b].to_string()));
        let byte_end_ids = std::array::from_fn(|b| lookup(format!("{}</w>", chars[b])));
        Ok(ClipTokenizer {
            ranks,
            byte_ids,
            byte_end_ids,
            specials,
            pattern: Regex::new(PATTERN).expect("valid pattern"),
            whitespace: Regex::new(r"\s+").expect("valid pattern"),
            bos,
            eos,
            pad,
            max_len,
        })
    }

    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        let spaced = self.whitespace.replace_all(&nfc, " ");
        spaced.chars().flat_map(char::to_lowercase).collect()
    }

    /// The ids of `text`, without BOS/EOS, truncation or padding.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let text = self.normalize(text);
        let mut ids = Vec::new();
        let mut rest = text.as_str();
        // The earliest special token; the longest where several start at the same place.
        while let Some((at, len, id)) = self
            .specials
            .iter()
            .filter_map(|(s, id)| rest.find(s.as_str()).map(|at| (at, s.len(), *id)))
            .min_by_key(|(at, len, _)| (*at, std::cmp::Reverse(*len)))
        {
            self.encode_plain(&rest[..at], &mut ids);
            ids.push(id);
            rest = &rest[at + len..];
        }
        self.encode_plain(rest, &mut ids);
        ids
    }

    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) {
        for piece in self.pattern.find_iter(text) {
            let bytes = piece.as_str().as_bytes();
            let mut word: Vec<u32> = bytes.iter().map(|&b| self.byte_ids[b as usize]).collect();
            if let (Some(last), Some(&b)) = (word.last_mut(), bytes.last()) {
                *last = self.byte_end_ids[b as usize];
            }
            ids.extend(self.bpe(word));
        }
    }

    /// Byte-pair merges, lowest rank first, all occurrences of the chosen pair left to right.
    fn bpe(&self, mut word: Vec<u32>) -> Vec<u32> {
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|p| {
                    self.ranks
                        .get(&(p[0], p[1]))
                        .map(|&(rank, id)| (rank, (p[0], p[1], id)))
                })
                .min_by_key(|(rank, _)| *rank);
            let Some((_, (a, b, merged_id))) = best else {
                break;
            };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == a && word[i + 1] == b {
                    merged.push(merged_id);
                    i += 2;
                } else {
                    merged.push(word[i]);
                    i += 1;
                }
            }
            word = merged;
        }
        word
    }

    /// `<|startoftext|>` + ids (truncated) + `<|endoftext|>`, padded with the pad token to
    /// `max_len`: what the pipeline feeds the text encoder.
    pub fn encode_padded(&self, text: &str) -> Vec<i64> {
        let mut ids = self.encode(text);
        ids.truncate(self.max_len - 2);
        let mut out = Vec::with_capacity(self.max_len);
        out.push(self.bos as i64);
        out.extend(ids.iter().map(|&i| i as i64));
        out.push(self.eos as i64);
        out.resize(self.max_len, self.pad as i64);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids from `transformers`' CLIPTokenizer for a few hundred prompts, written by
    /// `models/sd/fixtures.py` next to SD2's tokenizer files (scripts/artifacts.sh).
    #[test]
    fn ids_match_transformers() {
        let read = |name: &str| crate::test_fixture(&format!("sd/{name}"));
        let tok = ClipTokenizer::new(
            &read("tokenizer/vocab.json"),
            &String::from_utf8(read("tokenizer/merges.txt")).unwrap(),
            Some(&read("tokenizer/tokenizer_config.json")),
        )
        .unwrap();
        let cases: Vec<(String, Vec<i64>)> =
            serde_json::from_slice(&read("tokenizer_cases.json")).unwrap();
        assert!(cases.len() >= 200, "only {} cases", cases.len());
        let mut bad = Vec::new();
        for (text, want) in &cases {
            let got = tok.encode_padded(text);
            if &got != want {
                bad.push(format!("{text:?}\n  got  {got:?}\n  want {want:?}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{} of {} prompts differ:\n{}",
            bad.len(),
            cases.len(),
            bad.join("\n")
        );
    }

    #[test]
    fn byte_alphabet_is_a_bijection_onto_printables() {
        let chars = byte_chars();
        let set: std::collections::HashSet<char> = chars.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(chars[b' ' as usize], '\u{120}'); // 'Ġ'
    }
}
