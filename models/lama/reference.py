#!/usr/bin/env python3
"""Reference LaMa pipeline in eager PyTorch, for parity with Tessera's handler + TorchScript.

Reads the request JSON (the body sent to the server) on stdin, does what LaMa's own predict
script does — image to RGB, mask to one channel (PIL 'L') binarised > 0, both padded to a
multiple of 8 with numpy's symmetric padding at the bottom/right, generator on
cat(image * (1 - mask), mask), composite, crop — on the eager module with the weights in
--state-dict, and prints the output pixels as JSON.

    python models/lama/reference.py --state-dict lama.pth [--tiny] < request.json
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
from lama import FFCResNetGenerator, LamaInpaint, tiny_generator  # noqa: E402


def pad_to_modulo(a: np.ndarray, mod: int = 8) -> np.ndarray:
    h, w = a.shape[:2]
    ph, pw = (-h) % mod, (-w) % mod
    pads = ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2)
    return np.pad(a, pads, mode="symmetric")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dict", required=True)
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    generator = tiny_generator() if args.tiny else FFCResNetGenerator()
    generator.load_state_dict(torch.load(args.state_dict, map_location="cpu"), strict=True)
    model = LamaInpaint(generator.eval())
    req = json.load(sys.stdin)
    image = np.array(Image.open(io.BytesIO(base64.b64decode(req["image"]))).convert("RGB"))
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(req["mask_image"]))).convert("L"))
    h, w = image.shape[:2]
    with torch.no_grad():
        out = model(torch.from_numpy(pad_to_modulo(image)), torch.from_numpy(pad_to_modulo(mask)))
    out = out.numpy()[:h, :w]
    print(json.dumps({"shape": list(out.shape), "pixels": base64.b64encode(out.tobytes()).decode()}))


if __name__ == "__main__":
    main()
