//! Prompt text and tokenizer tables: a tokenizer built from a small byte-level vocabulary
//! (every byte symbol, with and without `</w>`, and merges over them) tokenises any text into
//! exactly `max_len` ids from its vocabulary; `from_packed` takes any bytes (the tail of the
//! input) without panicking and, when it accepts them, tokenises without panicking too.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tessera_sdk::clip::ClipTokenizer;

fn tokenizer() -> &'static (ClipTokenizer, u32) {
    static TOK: OnceLock<(ClipTokenizer, u32)> = OnceLock::new();
    TOK.get_or_init(|| {
        // GPT-2's byte alphabet, as CLIP's vocab.json spells its byte symbols.
        let printable = |b: u32| {
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
        };
        let mut extra = 0;
        let chars: Vec<char> = (0..256u32)
            .map(|b| {
                if printable(b) {
                    char::from_u32(b).unwrap()
                } else {
                    extra += 1;
                    char::from_u32(255 + extra).unwrap()
                }
            })
            .collect();
        let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
        let mut merges = String::from("#version: 0.2\n");
        for pair in [
            "t h", "th e</w>", "a n", "an d</w>", "i n", "in g</w>", "e r", "o n</w>", "c a",
            "ca t</w>",
        ] {
            let (a, b) = pair.split_once(' ').unwrap();
            merges.push_str(pair);
            merges.push('\n');
            vocab.push(format!("{a}{b}"));
        }
        vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
        vocab.sort();
        vocab.dedup();
        let n = vocab.len() as u32;
        let map: serde_json::Map<String, serde_json::Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, serde_json::Value::from(i)))
            .collect();
        let tok = ClipTokenizer::new(&serde_json::to_vec(&map).unwrap(), &merges, None).unwrap();
        (tok, n)
    })
}

fuzz_target!(|data: &[u8]| {
    let (tok, n) = tokenizer();
    let split = data.iter().position(|&b| b == 0xff).unwrap_or(data.len());
    let text = String::from_utf8_lossy(&data[..split]);
    let ids = tok.encode_padded(&text);
    assert_eq!(ids.len(), tok.max_len);
    assert!(ids.iter().all(|&i| (0..i64::from(*n)).contains(&i)));
    if split < data.len() {
        if let Ok(packed) = ClipTokenizer::from_packed(data[split + 1..].to_vec(), None) {
            assert_eq!(packed.encode_padded(&text).len(), packed.max_len);
        }
    }
});
