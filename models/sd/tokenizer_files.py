"""Writes SD2's `tokenizer/` folder (CLIP BPE vocab.json + merges.txt + configs) from the BPE
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


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    write(ap.parse_args().out)
