"""Writes SD2's `tokenizer/` folder (CLIP BPE vocab.json + merges.txt + configs, and the
handler's packed tables clip-bpe.bin) from the BPE
table that PyPI's open_clip_torch ships, since no model hub is reachable here.

The files are laid out as stabilityai/stable-diffusion-2-inpainting's `tokenizer/` folder is:
the OpenCLIP vocabulary (49408 ids), max length 77, and "!" (id 0) as the pad token (SD1 pads
with <|endoftext|>).
"""

import argparse
import gzip
import importlib.util
import json
from pathlib import Path

BOS, EOS, PAD = "<|startoftext|>", "<|endoftext|>", "!"


def bpe_table_path() -> Path:
    spec = importlib.util.find_spec("open_clip")  # located, not imported (it needs ftfy/timm)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip_torch is not installed (scripts/env.sh installs it)")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256+n.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab_and_merges(table: Path) -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(table).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(bpe_table_path())
    assert len(vocab) == 49408, len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = lambda s: {"content": s, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": special(BOS), "eos_token": special(EOS), "pad_token": PAD, "unk_token": special(EOS)}, indent=2))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": special(BOS), "do_lower_case": True,
        "eos_token": special(EOS), "errors": "replace", "model_max_length": 77, "pad_token": PAD,
        "tokenizer_class": "CLIPTokenizer", "unk_token": special(EOS)}, indent=2))
    write_packed(out)


# char::is_whitespace in Rust (Unicode White_Space), which the handler's merges reader uses.
_RUST_WHITESPACE = set("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | {
    chr(c) for c in range(0x2000, 0x200B)}
PACKED_MAGIC = b"TSCLIPB1"


def write_packed(folder: Path) -> None:
    """`folder/clip-bpe.bin` from `folder`'s vocab.json and merges.txt: the tables the Wasm
    handler's CLIP tokenizer would otherwise build on every request, in the layout its
    `ClipTokenizer::from_packed` reads (guest-handlers/sdk/src/clip.rs; u32 little-endian):
    magic, n_vocab, n_merges, blob_len; (offset, id) per token sorted by its UTF-8 bytes;
    (a, b, rank, merged) per merge sorted by (a, b); the tokens' bytes. Merges are kept and
    ranked as `ClipTokenizer::new` ranks them: lines other than `#version...` and blank ones,
    in order; a pair's first line wins; a merge whose parts or result are not in the
    vocabulary is left out."""
    import struct

    raw = (folder / "vocab.json").read_bytes()
    # What serde_json takes: UTF-8 without a byte-order mark, ids as non-negative integers
    # ("-0" is a float to it).
    if raw.startswith(b"\xef\xbb\xbf"):
        raise ValueError("vocab.json: starts with a byte-order mark")
    vocab = json.loads(raw.decode("utf-8"), parse_int=lambda t: float(t) if t.startswith("-") else int(t))
    if not isinstance(vocab, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2 ** 32 for v in vocab.values()):
        raise ValueError("vocab.json: not an object of token -> id (u32)")
    text = (folder / "merges.txt").read_bytes().decode("utf-8")
    # Rust's str::lines(): split at "\n", a "\r" before it dropped (a last line's bare "\r" stays).
    pieces = text.split("\n")
    lines = [l[:-1] if l.endswith("\r") and k < len(pieces) - 1 else l for k, l in enumerate(pieces)]
    merges = {}
    rank = 0
    for n, line in enumerate(lines):
        if line.startswith("#version") or all(c in _RUST_WHITESPACE for c in line):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merges.txt line {n + 1}: {line!r} is not 'a b'")
        a, b = parts
        ids = (vocab.get(a), vocab.get(b), vocab.get(a + b))
        if None not in ids:
            merges.setdefault((ids[0], ids[1]), (rank, ids[2]))
        rank += 1
    tokens = sorted((t.encode("utf-8"), i) for t, i in vocab.items())
    blob = b"".join(t for t, _ in tokens)
    out = [PACKED_MAGIC, struct.pack("<3I", len(tokens), len(merges), len(blob))]
    at = 0
    for t, i in tokens:
        out.append(struct.pack("<2I", at, i))
        at += len(t)
    for (a, b), (r, m) in sorted(merges.items()):
        out.append(struct.pack("<4I", a, b, r, m))
    out.append(blob)
    (folder / "clip-bpe.bin").write_bytes(b"".join(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    write(ap.parse_args().out)
