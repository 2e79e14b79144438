#!/usr/bin/env python3
"""Fixtures the handler SDK is checked against, computed by the reference libraries:

  tokenizer_cases.json  [[text, ids], ...]: the ids `transformers`' CLIPTokenizer gives a few
                        hundred varied prompts with SD2's tokenizer folder, padded/truncated to 77
                        as the inpainting pipeline calls it;
  resize_cases.json     cv2.resize(INTER_LINEAR) results on random 8-bit images, by size and by
                        scale factors (what the seed's crop-for-filling uses).
"""
import argparse
import base64
import json
import os
import random

import numpy as np

from transformers import CLIPTokenizer

FIXED = [
    "", " ", "a", "A futuristic vase", "a photo of a cat", "A PHOTO OF A CAT", "hello!", "Hello!! World!!!",
    "it's a dog's life, isn't it? we'll see; they'd've", "don't STOP", "'s 't 're 've 'm 'll 'd",
    "numbers 1234567890 and 3.14159, 1e-9, 0x1F", "snake_case and kebab-case and CamelCase",
    "emoji 🐱🚀✨ and flags 🇫🇷", "café naïve résumé façade", "cafe\u0301 (decomposed accent)",
    "Ångström ΑΣ ΣΑ όσος İstanbul straße ǅ", "日本語のテキスト 中文 한국어", "Привет, мир! Ωμέγα",
    "العربية עברית हिन्दी ไทย", "tabs\tand\nnewlines\r\nand  double   spaces", "\u00a0non-breaking\u2003em\u3000ideo",
    "<|startoftext|>inside<|endoftext|>", "<|ENDOFTEXT|> upper special", "<|endoftext", "a!b!c", "!!!",
    "quotes “curly” ‘single’ «guillemets» and \"straight\"", "math ∑∫√∞ ≤ ≥ ± × ÷", "¡¿ ¬ ® ° µ ¶ ·",
    "zero\u200bwidth joiner\u200d and soft\u00adhyphen", "control\u0007bell\u0000null", "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "a highly detailed oil painting of a red fox in a snowy forest, trending on artstation, 8k, octane render",
    "masterpiece, best quality, (extremely detailed:1.2), [blurry], {braces}, <angle>, |pipes|",
    "lorem ipsum " * 40, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "https://example.com/path?q=1&x=y#frag user@example.com", "C:\\Windows\\path and /usr/local/bin",
]
POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") * 3
        + list(" \t\n!?.,;:'\"-_()[]{}<>|/\\@#$%^&*+=~`") + list("éèêëàâäôöûüçñßøåæœÉÀÇÑ")
        + list("αβγδΣσςπΩжзийкл日本語中文한국") + ["🐱", "🚀", "✨", "\u0301", "\u00a0", "\u2028", "’", "…"])
WORDS = ["the", "a", "vase", "futuristic", "red", "car", "photo", "of", "cat", "dog", "in", "on", "Garden",
         "SUNSET", "it's", "we'll", "highly", "detailed", "4k", "!", "?", "...", "—", "🙂", "naïve", "über"]


def cases(n_random: int, seed: int):
    rng = random.Random(seed)
    out = list(FIXED)
    for i in range(n_random):
        if i % 2:
            out.append("".join(rng.choice(POOL) for _ in range(rng.randint(1, 60))))
        else:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 90))))
    return out


# (w, h, channels, dsize or None, fx/fy or None)
RESIZES = [
    (300, 200, 3, (768, 512), None), (200, 300, 3, (512, 768), None), (37, 23, 3, (101, 77), None),
    (97, 61, 1, (13, 9), None), (640, 480, 3, (320, 240), None), (64, 64, 1, (32, 32), None),
    (513, 300, 3, None, 512 / 700), (700, 700, 1, None, 512 / 650), (451, 451, 3, None, 650 / 512),
    (33, 17, 3, None, 1.7), (1000, 3, 1, (7, 5), None), (5, 1, 3, (9, 4), None),
]


def resize_cases(seed: int):
    import cv2
    rng = np.random.default_rng(seed)
    out = []
    for w, h, cn, dsize, f in RESIZES:
        shape = (h, w, cn) if cn > 1 else (h, w)
        # Smooth content plus noise: both the interpolation and the rounding matter.
        yy, xx = np.mgrid[0:h, 0:w]
        base = (xx * 255 // max(w - 1, 1) + yy * 128 // max(h - 1, 1)) % 256
        img = np.clip(base.reshape(h, w, *([1] * (cn > 1))) + rng.integers(-40, 40, shape), 0, 255).astype(np.uint8)
        if dsize:
            res = cv2.resize(img, dsize, interpolation=cv2.INTER_LINEAR)
        else:
            res = cv2.resize(img, (0, 0), fx=f, fy=f, interpolation=cv2.INTER_LINEAR)
        out.append({"w": w, "h": h, "cn": cn, "dsize": dsize, "f": f, "src": base64.b64encode(img.tobytes()).decode(),
                    "out_w": res.shape[1], "out_h": res.shape[0], "out": base64.b64encode(res.tobytes()).decode()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokenizer", required=True, help="SD2's tokenizer folder")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--random", type=int, default=300)
    args = ap.parse_args()
    tok = CLIPTokenizer.from_pretrained(args.tokenizer)
    texts = cases(args.random, 1234)
    ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    with open(os.path.join(args.out_dir, "tokenizer_cases.json"), "w") as f:
        json.dump([[t, i] for t, i in zip(texts, ids)], f, ensure_ascii=False)
    with open(os.path.join(args.out_dir, "resize_cases.json"), "w") as f:
        json.dump(resize_cases(7), f)


if __name__ == "__main__":
    main()
