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
//!
//! Building the tables from `vocab.json` and `merges.txt` takes ~20 ms natively (more in the
//! sandbox), on every request since each runs in a fresh instance; `models/sd/tokenizer_files.py`
//! (run by `export.py`) also writes them packed (`clip-bpe.bin`, see
//! [`ClipTokenizer::from_packed`]), read in place.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    /// Merge rank and the merged token's id, by the ids of the pair.
    ranks: Ranks,
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

/// The merges: built from `merges.txt`, or read in place from a packed file.
enum Ranks {
    Map(HashMap<(u32, u32), (u32, u32)>),
    Packed(Packed),
}

impl Ranks {
    fn get(&self, pair: (u32, u32)) -> Option<(u32, u32)> {
        match self {
            Ranks::Map(m) => m.get(&pair).copied(),
            Ranks::Packed(p) => p.merge(pair),
        }
    }
}

/// `clip-bpe.bin`, all integers u32 little-endian:
///
/// ```text
/// "TSCLIPB1" | n_vocab | n_merges | blob_len
/// n_vocab x (offset, id)            tokens sorted by their UTF-8 bytes; token k is
///                                   blob[offset_k .. offset_k+1] (the last ends at blob_len)
/// n_merges x (a, b, rank, merged)   sorted by (a, b), one entry a pair: the first line of
///                                   merges.txt naming it, ranked by its place among the
///                                   lines kept, as `new` ranks them
/// blob
/// ```
///
/// Only the header's sizes are checked up front; a lookup that finds an offset out of range
/// or out of order treats the token as absent (a damaged file gives wrong ids, never a panic).
/// Unsorted entries make lookups miss in the same way.
struct Packed {
    bytes: Vec<u8>,
    n_vocab: usize,
    n_merges: usize,
    merges_at: usize,
    blob_at: usize,
}

const PACKED_MAGIC: &[u8; 8] = b"TSCLIPB1";

impl Packed {
    fn parse(bytes: Vec<u8>) -> Result<Self, String> {
        let word = |i: usize| -> Option<usize> {
            let b = bytes.get(8 + 4 * i..12 + 4 * i)?;
            Some(u32::from_le_bytes(b.try_into().ok()?) as usize)
        };
        if bytes.get(..8) != Some(&PACKED_MAGIC[..]) {
            return Err("clip-bpe.bin: not a packed CLIP tokenizer (bad magic)".into());
        }
        let (Some(n_vocab), Some(n_merges), Some(blob_len)) = (word(0), word(1), word(2)) else {
            return Err("clip-bpe.bin: truncated header".into());
        };
        let merges_at = n_vocab.checked_mul(8).and_then(|v| v.checked_add(20));
        let blob_at = merges_at.and_then(|m| n_merges.checked_mul(16)?.checked_add(m));
        let end = blob_at.and_then(|b| b.checked_add(blob_len));
        match (merges_at, blob_at, end) {
            (Some(merges_at), Some(blob_at), Some(end)) if end == bytes.len() => Ok(Packed {
                bytes,
                n_vocab,
                n_merges,
                merges_at,
                blob_at,
            }),
            _ => Err(format!(
                "clip-bpe.bin: {} bytes, which its header ({n_vocab} tokens, {n_merges} merges, \
                 {blob_len} bytes of text) does not add up to",
                bytes.len()
            )),
        }
    }

    fn u32_at(&self, at: usize) -> Option<u32> {
        Some(u32::from_le_bytes(
            self.bytes.get(at..at + 4)?.try_into().ok()?,
        ))
    }

    /// Token k's bytes and id.
    fn token(&self, k: usize) -> Option<(&[u8], u32)> {
        let at = 20 + 8 * k;
        let start = self.u32_at(at)? as usize;
        let end = if k + 1 < self.n_vocab {
            self.u32_at(at + 8)? as usize
        } else {
            self.bytes.len() - self.blob_at
        };
        let text = self
            .bytes
            .get(self.blob_at.checked_add(start)?..self.blob_at.checked_add(end)?)?;
        Some((text, self.u32_at(at + 4)?))
    }

    fn id(&self, token: &str) -> Option<u32> {
        let (mut lo, mut hi) = (0, self.n_vocab);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (text, id) = self.token(mid)?;
            match text.cmp(token.as_bytes()) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(id),
            }
        }
        None
    }

    fn merge(&self, pair: (u32, u32)) -> Option<(u32, u32)> {
        let (mut lo, mut hi) = (0, self.n_merges);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let at = self.merges_at + 16 * mid;
            let key = (self.u32_at(at)?, self.u32_at(at + 4)?);
            match key.cmp(&pair) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => {
                    return Some((self.u32_at(at + 8)?, self.u32_at(at + 12)?))
                }
            }
        }
        None
    }
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
        Self::finish(Ranks::Map(ranks), |_, t| vocab.get(t).copied(), config)
    }

    /// The tokenizer from `clip-bpe.bin` (written by `models/sd/tokenizer_files.py` beside
    /// `vocab.json` and `merges.txt`, from them): the same ids as [`ClipTokenizer::new`] on
    /// those files, with nothing to build.
    pub fn from_packed(bin: Vec<u8>, config: Option<&[u8]>) -> Result<Self, String> {
        let lookup = |r: &Ranks, t: &str| match r {
            Ranks::Packed(p) => p.id(t),
            Ranks::Map(_) => None,
        };
        Self::finish(Ranks::Packed(Packed::parse(bin)?), lookup, config)
    }

    /// The rest of the tokenizer, given the merges and a vocabulary lookup (which may read
    /// the merges' packed file).
    fn finish(
        ranks: Ranks,
        vocab: impl Fn(&Ranks, &str) -> Option<u32>,
        config: Option<&[u8]>,
    ) -> Result<Self, String> {
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
        let id = |t: &str| vocab(&ranks, t).ok_or_else(|| format!("vocab.json has no '{t}'"));
        let (bos, eos, pad) = (id(BOS)?, id(EOS)?, id(&pad_token)?);
        let mut specials = vec![(BOS.to_string(), bos), (EOS.to_string(), eos)];
        if pad_token != BOS && pad_token != EOS {
            specials.push((pad_token.clone(), pad));
        }
        specials.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        // Every byte symbol (with and without </w>) is in CLIP's vocab; a vocabulary without
        // one maps it to <|endoftext|>, the unknown token.
        let chars = byte_chars();
        let lookup = |t: String| vocab(&ranks, &t).unwrap_or(eos);
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
        self.encode_at_most(text, usize::MAX)
    }

    /// The first `limit` ids of `text` (all of them if there are fewer). Tokenising stops once
    /// `limit` are out: later text never changes earlier ids, since each piece is merged on its
    /// own and the pieces come left to right.
    fn encode_at_most(&self, text: &str, limit: usize) -> Vec<u32> {
        let text = self.normalize(text);
        let mut ids = Vec::new();
        let mut at = 0;
        // Where each special token next occurs at or after `at`, searched again only once
        // passed: finding them all is linear in the text, however many there are.
        let mut next: Vec<Option<usize>> = self
            .specials
            .iter()
            .map(|(s, _)| text.find(s.as_str()))
            .collect();
        while ids.len() < limit {
            for (found, (s, _)) in next.iter_mut().zip(&self.specials) {
                if matches!(*found, Some(p) if p < at) {
                    *found = text[at..].find(s.as_str()).map(|p| at + p);
                }
            }
            // The earliest special token; the longest where several start at the same place
            // (`specials` is sorted longest first and `min_by_key` keeps the first minimum).
            let Some((start, (s, id))) = next
                .iter()
                .zip(&self.specials)
                .filter_map(|(found, special)| found.map(|p| (p, special)))
                .min_by_key(|(p, _)| *p)
            else {
                self.encode_plain(&text[at..], &mut ids, limit);
                break;
            };
            self.encode_plain(&text[at..start], &mut ids, limit);
            ids.push(*id);
            at = start + s.len();
        }
        ids.truncate(limit);
        ids
    }

    /// Pre-tokenises `text` and appends each piece's BPE ids, until `ids` holds `limit`.
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>, limit: usize) {
        for piece in self.pattern.find_iter(text) {
            if ids.len() >= limit {
                return;
            }
            ids.extend(self.bpe(self.piece_symbols(piece.as_str())));
        }
    }

    /// A piece's byte symbols, the last one marked as the end of a word (`</w>`).
    fn piece_symbols(&self, piece: &str) -> Vec<u32> {
        let bytes = piece.as_bytes();
        let mut word: Vec<u32> = bytes.iter().map(|&b| self.byte_ids[b as usize]).collect();
        if let (Some(last), Some(&b)) = (word.last_mut(), bytes.last()) {
            *last = self.byte_end_ids[b as usize];
        }
        word
    }

    /// Byte-pair merges as transformers applies them: the lowest-ranked pair present, every
    /// occurrence left to right, then again until no ranked pair is left.
    ///
    /// O(n log n) in the word's length: the symbols form a linked list (indexed by the byte
    /// position each starts at; a merge keeps the left one), and a min-heap holds the candidate
    /// pairs keyed by (rank, position). Entries are checked when popped rather than removed
    /// when a merge breaks them. All entries of the lowest rank are merged as one round, in
    /// position order (left to right); pairs a round creates join the heap after it, so that
    /// even a merges file whose ranks are out of training order merges as transformers does.
    fn bpe(&self, mut word: Vec<u32>) -> Vec<u32> {
        const NONE: usize = usize::MAX;
        let n = word.len();
        if n < 2 {
            return word;
        }
        let mut next: Vec<usize> = (0..n)
            .map(|i| if i + 1 < n { i + 1 } else { NONE })
            .collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i > 0 { i - 1 } else { NONE }).collect();
        // The rank of the pair starting at i and the id it merges into.
        let rank_at = |word: &[u32], next: &[usize], i: usize| -> Option<(u32, u32)> {
            let j = next[i];
            if j == NONE {
                return None;
            }
            self.ranks.get((word[i], word[j]))
        };
        let mut heap: BinaryHeap<Reverse<(u32, usize)>> = (0..n - 1)
            .filter_map(|i| rank_at(&word, &next, i).map(|(rank, _)| Reverse((rank, i))))
            .collect();
        // Merged-away symbols; `word[i]` is the id of the symbol starting at byte `i`.
        let mut dead = vec![false; n];
        let mut created = Vec::new();
        while let Some(&Reverse((round, _))) = heap.peek() {
            while let Some(&Reverse((rank, i))) = heap.peek() {
                if rank != round {
                    break;
                }
                heap.pop();
                // Still the pair it was when pushed? (A rank names one pair of ids.)
                let merged = match rank_at(&word, &next, i) {
                    Some((r, merged)) if r == rank && !dead[i] => merged,
                    _ => continue,
                };
                let j = next[i];
                word[i] = merged;
                dead[j] = true;
                next[i] = next[j];
                if next[j] != NONE {
                    prev[next[j]] = i;
                }
                if prev[i] != NONE {
                    created.push(prev[i]);
                }
                created.push(i);
            }
            for i in created.drain(..) {
                if !dead[i] {
                    if let Some((rank, _)) = rank_at(&word, &next, i) {
                        heap.push(Reverse((rank, i)));
                    }
                }
            }
        }
        let mut out = Vec::new();
        let mut i = 0;
        while i != NONE {
            out.push(word[i]);
            i = next[i];
        }
        out
    }

    /// `<|startoftext|>` + ids (truncated) + `<|endoftext|>`, padded with the pad token to
    /// `max_len`: what the pipeline feeds the text encoder.
    pub fn encode_padded(&self, text: &str) -> Vec<i64> {
        let ids = self.encode_at_most(text, self.max_len - 2);
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
        let tok = sd2_tokenizer();
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

    fn packed_sd2_tokenizer() -> ClipTokenizer {
        let read = |name: &str| crate::test_fixture(&format!("sd/{name}"));
        ClipTokenizer::from_packed(
            read("tokenizer/clip-bpe.bin"),
            Some(&read("tokenizer/tokenizer_config.json")),
        )
        .unwrap()
    }

    /// `clip-bpe.bin` (as models/sd/tokenizer_files.py packs SD2's files) gives the ids the
    /// files themselves give: transformers' for the fixture prompts, and the same BPE as the
    /// built tables for random words over the byte alphabet.
    #[test]
    fn packed_tables_give_the_same_ids() {
        let read = |name: &str| crate::test_fixture(&format!("sd/{name}"));
        let (built, packed) = (sd2_tokenizer(), packed_sd2_tokenizer());
        let cases: Vec<(String, Vec<i64>)> =
            serde_json::from_slice(&read("tokenizer_cases.json")).unwrap();
        for (text, want) in &cases {
            assert_eq!(&packed.encode_padded(text), want, "{text:?}");
        }
        assert_eq!(
            (
                built.byte_ids,
                built.byte_end_ids,
                built.bos,
                built.eos,
                built.pad
            ),
            (
                packed.byte_ids,
                packed.byte_end_ids,
                packed.bos,
                packed.eos,
                packed.pad
            )
        );
        let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyz0123456789éü漢!?.'"
            .chars()
            .collect();
        let mut seed = 11;
        for len in 1..40 {
            for _ in 0..30 {
                let word = random_word(&alphabet, len, &mut seed);
                assert_eq!(
                    built.bpe(built.piece_symbols(&word)),
                    packed.bpe(packed.piece_symbols(&word)),
                    "{word:?}"
                );
            }
        }
    }

    /// A packed file that does not add up is refused; one damaged inside (offsets, ids,
    /// merges) gives some ids, never a panic.
    #[test]
    fn damaged_packed_files_are_refused_or_harmless() {
        let good = crate::test_fixture("sd/tokenizer/clip-bpe.bin");
        let refused = |bin: Vec<u8>| ClipTokenizer::from_packed(bin, None).is_err();
        assert!(refused(Vec::new()));
        assert!(refused(good[..19].to_vec()));
        assert!(refused(good[..good.len() - 1].to_vec()));
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(refused(magic));
        for field in 0..3 {
            for value in [0u32, 1, u32::MAX, u32::MAX / 8] {
                let mut bin = good.clone();
                bin[8 + 4 * field..12 + 4 * field].copy_from_slice(&value.to_le_bytes());
                assert!(refused(bin), "header field {field} = {value}");
            }
        }
        let mut seed = 3u64;
        for round in 0..200 {
            let mut bin = good.clone();
            for _ in 0..1 + round % 50 {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Anywhere past the header: the token index, the merges or the text.
                let at = 20 + (seed >> 33) as usize % (bin.len() - 20);
                bin[at] = (seed >> 20) as u8;
            }
            if let Ok(tok) = ClipTokenizer::from_packed(bin, None) {
                let ids = tok.encode_padded("a futuristic vase on a wooden table, 4k photo!");
                assert_eq!(ids.len(), tok.max_len);
            }
        }
    }

    /// The BPE as transformers writes it (and as this file did before the heap): find the
    /// lowest-ranked pair, rebuild the word merging its occurrences left to right, repeat.
    /// Quadratic in the word's length; the reference the heap version must equal.
    fn reference_bpe(tok: &ClipTokenizer, mut word: Vec<u32>) -> Vec<u32> {
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|p| {
                    tok.ranks
                        .get((p[0], p[1]))
                        .map(|(rank, id)| (rank, (p[0], p[1], id)))
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

    fn sd2_tokenizer() -> ClipTokenizer {
        let read = |name: &str| crate::test_fixture(&format!("sd/{name}"));
        ClipTokenizer::new(
            &read("tokenizer/vocab.json"),
            &String::from_utf8(read("tokenizer/merges.txt")).unwrap(),
            Some(&read("tokenizer/tokenizer_config.json")),
        )
        .unwrap()
    }

    /// Words of `len` characters drawn from `alphabet` by a fixed LCG.
    fn random_word(alphabet: &[char], len: usize, seed: &mut u64) -> String {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                alphabet[(*seed >> 33) as usize % alphabet.len()]
            })
            .collect()
    }

    fn assert_bpe_matches_reference(tok: &ClipTokenizer, word: &str) {
        let symbols = tok.piece_symbols(word);
        let want = reference_bpe(tok, symbols.clone());
        let got = tok.bpe(symbols);
        assert_eq!(
            got,
            want,
            "word of {} bytes: {:?}",
            word.len(),
            &word[..word.len().min(80)]
        );
    }

    #[test]
    fn heap_bpe_equals_the_reference_on_sd2_merges() {
        let tok = sd2_tokenizer();
        let mut seed = 1;
        let alphabets: [&[char]; 5] = [
            &['a'],
            &['a', 'b'],
            &['e', 's', 't', 'r', 'n', 'o'],
            &('a'..='z').collect::<Vec<_>>(),
            &['é', 'ß', 'ж', '中', '!', '#'],
        ];
        for alphabet in alphabets {
            for len in [1, 2, 3, 5, 8, 13, 40, 100, 333] {
                for _ in 0..8 {
                    assert_bpe_matches_reference(&tok, &random_word(alphabet, len, &mut seed));
                }
            }
        }
        // Long words, up to the SD handler's default prompt cap and beyond.
        for alphabet in alphabets {
            assert_bpe_matches_reference(&tok, &random_word(alphabet, 4096, &mut seed));
        }
        assert_bpe_matches_reference(&tok, &"ab".repeat(4096));
        assert_bpe_matches_reference(&tok, &"photograph".repeat(800));
    }

    /// A merges file whose ranks are out of training order: `ab a`, `c ab` and `ab ab` outrank
    /// the `a b` that makes `ab`, so pairs a round creates can outrank the round itself (in
    /// `a b a b`, merging the first `a b` makes `ab a`). transformers still finishes the round
    /// first (`ab ab`, not `aba b`); so must the heap.
    #[test]
    fn heap_bpe_equals_the_reference_on_out_of_order_merges() {
        let mut vocab: Vec<String> = ["<|startoftext|>", "<|endoftext|>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let merges =
            "#version: 0.2\nab a\nc ab\nab ab\nabab c</w>\na b\nc a\nb b</w>\nb a\nc c\nca b\n";
        for line in merges.lines().skip(1) {
            let (a, b) = line.split_once(' ').unwrap();
            vocab.extend([a.to_string(), b.to_string(), format!("{a}{b}")]);
        }
        for c in ['a', 'b', 'c'] {
            vocab.extend([c.to_string(), format!("{c}</w>")]);
        }
        vocab.sort();
        vocab.dedup();
        let vocab: HashMap<&str, usize> = vocab
            .iter()
            .enumerate()
            .map(|(i, s)| (s.as_str(), i))
            .collect();
        let tok = ClipTokenizer::new(&serde_json::to_vec(&vocab).unwrap(), merges, None).unwrap();
        // a b a b c</w> -> ab ab c</w> -> abab c</w> -> ababc</w> (not aba b c</w>).
        assert_eq!(
            tok.bpe(tok.piece_symbols("ababc")),
            [vocab["ababc</w>"] as u32]
        );
        let mut seed = 7;
        for len in 1..60 {
            for _ in 0..20 {
                assert_bpe_matches_reference(&tok, &random_word(&['a', 'b', 'c'], len, &mut seed));
            }
        }
        assert_bpe_matches_reference(&tok, &random_word(&['a', 'b', 'c'], 5000, &mut seed));
    }

    /// Tokenising stops at `max_len - 2` ids; the result is what tokenising everything and
    /// truncating gives.
    #[test]
    fn padded_ids_stop_early_without_changing() {
        let tok = sd2_tokenizer();
        let mut seed = 3;
        let words = ['a', 'b', 'c', ' ', ' ', '!', '1', 'é'];
        let mut texts: Vec<String> = (0..20)
            .map(|i| random_word(&words, 50 * i + 1, &mut seed))
            .collect();
        texts.push("<|endoftext|>".repeat(200));
        texts.push("a photo of <|startoftext|> a cat! ".repeat(30));
        texts.push(format!("{} tail", "x".repeat(3000)));
        for text in &texts {
            let mut want: Vec<i64> = vec![tok.bos as i64];
            want.extend(
                tok.encode(text)
                    .iter()
                    .take(tok.max_len - 2)
                    .map(|&i| i as i64),
            );
            want.push(tok.eos as i64);
            want.resize(tok.max_len, tok.pad as i64);
            assert_eq!(tok.encode_padded(text), want, "{text:?}");
        }
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
