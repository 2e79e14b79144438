#!/usr/bin/env python3
"""SAM vit_h image encoder at lower precision (issue 12: first click <= 0.5x SamPredictor fp32).
Full-size random weights on the GPU, one process: SamPredictor fp32 (set_image + predict, the
baseline) and the archive's Encoder as export.py writes it with the ViT in float32, float32 with
TF32 matmuls, bfloat16 and float16 (photo normalised and embeddings returned in float32), each
run under the profiling executor as the server runs the stage. For each: the first call and
the next five (ms, synchronised), the embeddings' error against float32, and the masks the
float32 prompt decoder gives from them for clicks on several photos against SamPredictor's
(pixels that differ, IoU).

    python bench/sam_precision_gpu.py --out $OUT
Needs segment-anything-py importable.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "models/sam"))
import export as sam_export  # noqa: E402
from common import cuda_timed_ms  # noqa: E402
from sam_gpu import photo  # noqa: E402

SIZES = [(1000, 750), (640, 480), (1024, 683), (768, 1024)]


def padded(p):
    """The handler's input: resized to longest side 1024 (as SamPredictor), zero-padded."""
    from segment_anything.utils.transforms import ResizeLongestSide
    r = ResizeLongestSide(1024).apply_image(p)
    sq = np.zeros((1024, 1024, 3), np.uint8)
    sq[:r.shape[0], :r.shape[1]] = r
    return torch.from_numpy(sq).cuda(), torch.tensor(r.shape[:2], dtype=torch.int64).cuda()


def masks_from(predictor, emb, p, click):
    """SamPredictor's three masks for `click` on photo `p`, given embeddings `emb` (float32)."""
    predictor.reset_image()
    predictor.original_size = p.shape[:2]
    predictor.input_size = tuple(predictor.transform.get_preprocess_shape(p.shape[0], p.shape[1], 1024))
    predictor.features = emb
    predictor.is_image_set = True
    m, _, _ = predictor.predict(point_coords=np.array([click], np.float32), point_labels=np.array([1]),
                                multimask_output=True)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    from segment_anything import SamPredictor
    sam = sam_export.build("vit_h", None, False, 0).cuda()
    predictor = SamPredictor(sam)
    photos = [photo(w, h, i) for i, (w, h) in enumerate(SIZES)]
    clicks = [[w // 2, int(h * 0.4)] for (w, h) in SIZES]
    res = {"gpu": torch.cuda.get_device_name(0), "sizes": SIZES, "predictor_ms": [], "variants": {}}
    ref_masks, ref_emb = [], []
    with torch.no_grad():
        for i, p in enumerate(photos):
            ms = cuda_timed_ms(lambda: (predictor.set_image(p), predictor.predict(
                point_coords=np.array([clicks[i]], np.float32), point_labels=np.array([1]), multimask_output=True)))
            res["predictor_ms"].append(ms)
        for i, p in enumerate(photos):
            predictor.set_image(p)
            ref_emb.append(predictor.features.clone())
            m, _, _ = predictor.predict(point_coords=np.array([clicks[i]], np.float32), point_labels=np.array([1]),
                                        multimask_output=True)
            ref_masks.append(m)
        for _ in range(3):
            ms = cuda_timed_ms(lambda: (predictor.set_image(photos[0]), predictor.predict(
                point_coords=np.array([clicks[0]], np.float32), point_labels=np.array([1]), multimask_output=True)))
            res["predictor_ms"].append(ms)
        print("predictor", [round(v, 1) for v in res["predictor_ms"]], flush=True)
        for tag, dt, tf32 in [("float32", torch.float32, False), ("tf32", torch.float32, True),
                              ("bfloat16", torch.bfloat16, False), ("float16", torch.float16, False)]:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            enc = sam_export.encoder(sam, "cuda", torch.float32, dt)
            torch.cuda.empty_cache()
            inputs = [padded(p) for p in photos]
            times = []
            for k in range(8):
                x, hw = inputs[k % len(inputs)]
                ms = cuda_timed_ms(lambda: enc(x, hw))
                times.append(ms)
            errs, diff_px, ious = [], [], []
            for i, p in enumerate(photos):
                emb = enc(*inputs[i]).float()
                errs.append(float((emb - ref_emb[i]).norm() / ref_emb[i].norm()))
                m = masks_from(predictor, emb, p, clicks[i])
                r = ref_masks[i]
                diff_px.append(int((m != r).sum()))
                inter = (m & r).sum(axis=(1, 2))
                union = (m | r).sum(axis=(1, 2))
                ious.append([float(a / b) if b else 1.0 for a, b in zip(inter, union)])
            res["variants"][tag] = {"ms": times, "rel_err": errs, "mask_px_differing": diff_px, "iou": ious}
            print(tag, [round(v, 1) for v in times], "err", [f"{e:.1e}" for e in errs], "px", diff_px,
                  "iou min", min(min(i) for i in ious), flush=True)
            del enc
        torch.backends.cuda.matmul.allow_tf32 = False
    base = float(np.median(res["predictor_ms"][len(SIZES):]))
    lines = [f"GPU: {res['gpu']}; SAM vit_h, random weights; encoder forward (1024² padded photo -> float32 embeddings), ms",
             "", f"SamPredictor fp32 set_image + predict: first {res['predictor_ms'][0]:.1f}, photos "
             + ", ".join(f"{v:.1f}" for v in res["predictor_ms"][1:len(SIZES)]) + ", repeats "
             + ", ".join(f"{v:.1f}" for v in res["predictor_ms"][len(SIZES):]), "",
             "| ViT precision | calls 1-8 ms | median of 2-8 / SamPredictor | embeddings rel. error | mask pixels differing (3 masks x 4 photos) | min mask IoU |",
             "|---|---|---|---|---|---|"]
    for tag, v in res["variants"].items():
        med = float(np.median(v["ms"][1:]))
        lines.append(f"| {tag} | {', '.join(f'{t:.1f}' for t in v['ms'])} | {med / base:.2f} | "
                     f"{max(v['rel_err']):.1e} | {', '.join(map(str, v['mask_px_differing']))} | "
                     f"{min(min(i) for i in v['iou']):.4f} |")
    with open(os.path.join(args.out, "sam_precision.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, "sam_precision.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
