#!/usr/bin/env python3
"""The seed's SAM handler logic in Python, on given weights: the reference Tessera must match.

Reads a request JSON (the body sent to the server) on stdin and prints JSON with the mask the
seed's pipeline produces (SamPredictor.set_image on the RGB photo, predict with the clicked
points and multimask_output=True, pick mask `mask_index` — the seed always took 1 — dilate once
with np.ones((k, k)) by cv2.dilate, scale to 0/255) plus the three IoU scores.

    python models/sam/reference.py --state-dict sam.pth --tiny < request.json
    python models/sam/reference.py --resize-only < request.json   # SAM's resized input
"""
import argparse
import base64
import io
import json
import os
import sys

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_request():
    req = json.load(sys.stdin)
    image = np.array(Image.open(io.BytesIO(base64.b64decode(req["image"]))).convert("RGB"))
    args = req.get("gen_args") or {}
    if isinstance(args, str):
        args = json.loads(args)
    return image, args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--state-dict")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--variant", default="vit_h")
    ap.add_argument("--resize-only", action="store_true")
    args = ap.parse_args()
    from segment_anything import SamPredictor
    from segment_anything.utils.transforms import ResizeLongestSide

    image, gen = load_request()
    if args.resize_only:
        resized = ResizeLongestSide(1024).apply_image(image)
        print(json.dumps({"shape": list(resized.shape), "pixels": base64.b64encode(resized.tobytes()).decode()}))
        return
    import export
    sam = export.tiny_sam() if args.tiny else export.sam_model_registry[args.variant](checkpoint=None)
    sam.load_state_dict(torch.load(args.state_dict, map_location="cpu"), strict=True)
    predictor = SamPredictor(sam.eval())
    predictor.set_image(image)
    coords = np.array(gen["point_coords"], dtype=np.float32).reshape(-1, 2)
    labels = np.array(gen.get("point_labels", 1), dtype=np.float32).reshape(-1)
    masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=True)
    idx = gen.get("mask_index", 1)
    idx = int(np.argmax(scores)) if idx == "best" else int(idx)
    k = int(gen.get("dilate_kernel_size", 0) or 0)

    def finish(mask):
        mask = mask.astype(np.uint8)
        if k > 0:
            mask = cv2.dilate(mask, np.ones((k, k), np.uint8), iterations=1)
        return base64.b64encode((mask * 255).tobytes()).decode()

    out = [finish(m) for m in masks]
    print(json.dumps({"shape": list(masks[idx].shape), "pixels": out[idx], "all_masks": out,
                      "scores": [float(s) for s in scores], "mask_index": idx}))


if __name__ == "__main__":
    main()
