#!/usr/bin/env python3
"""The reference Tessera's SD2 inpainting is compared with: diffusers'
StableDiffusionInpaintPipeline on a saved pipeline folder, with the noise of
torch.Generator("cpu").manual_seed(seed).

`pipeline(...)` runs it on a 512² crop; `main` reads a seed-style request (JSON on stdin: image,
mask_image, prompt, negative_prompt, gen_args) and runs the seed's whole flow — crop-for-filling
(see crop.py), the pipeline, pasting back — printing {"pixels": base64 RGB, "width", "height"}.
"""
import argparse
import base64
import io
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load(folder: str):
    from diffusers import StableDiffusionInpaintPipeline
    pipe = StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline(pipe, image: np.ndarray, mask: np.ndarray, prompt: str, negative: str, steps: int,
             guidance: float, seed: int) -> np.ndarray:
    """image u8 [512, 512, 3], mask u8 [512, 512] -> u8 [512, 512, 3]."""
    h, w = mask.shape
    out = pipe(prompt=prompt, negative_prompt=negative or None, image=Image.fromarray(image),
               mask_image=Image.fromarray(mask), height=h, width=w, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    return np.asarray(out)


def decode(b64: str, mode: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert(mode))


def main() -> None:
    import crop
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrained", required=True)
    args = ap.parse_args()
    req = json.load(sys.stdin)
    gen = req.get("gen_args") or {}
    if isinstance(gen, str):
        gen = json.loads(gen)
    image = decode(req["image"], "RGB")
    mask = np.where(decode(req["mask_image"], "L") >= 128, 255, 0).astype(np.uint8)
    pipe = load(args.pretrained)
    win_image, win_mask, geom = crop.crop_for_filling_pre(image, mask)
    filled = pipeline(pipe, win_image, win_mask, req.get("prompt", ""), req.get("negative_prompt", ""),
                      int(gen.get("num_inference_steps", 50)), float(gen.get("guidance_scale", 7.5)),
                      int(gen.get("seed", 0)))
    out = crop.crop_for_filling_post(image, mask, filled, geom)
    print(json.dumps({"pixels": base64.b64encode(out.tobytes()).decode(), "width": out.shape[1],
                      "height": out.shape[0], "window": base64.b64encode(filled.tobytes()).decode()}))


if __name__ == "__main__":
    main()
