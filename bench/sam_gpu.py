#!/usr/bin/env python3
"""SAM benchmark (issue 4), run on the GPU machine: full-size vit_b and vit_h with random
weights, in one run.

For each variant:
  - bare PyTorch: segment-anything's SamPredictor for one click (set_image + predict, masks
    back in host memory), median / p99 over --n photos;
  - Tessera over HTTP, the seed's JSON + PNG request: a first click on a new photo (encoder +
    decoder) and a repeated click on the same photo (decoder only, embeddings reused),
    median / p99 over --n each;
  - GPU memory: the server's residentBytes (weights + the reserved embedding cache) and
    nvidia-smi.
Writes results.json / results.md under --out.

    python bench/sam_gpu.py --bin ./tessera --handler sam.wasm --out $OUT
"""
import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import b64png, request, smi_used_mib, start_server, summary, write_results  # noqa: E402


def photo(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 255], -1) + rng.normal(0, 8, (h, w, 3))
    blob = ((x - w * 0.5) ** 2 + (y - h * 0.4) ** 2) < (min(w, h) * 0.25) ** 2
    img[blob] = [220, 40, 40]
    return np.clip(img, 0, 255).astype(np.uint8)



def export_sam(work, variant="vit_h", state_dict=False, encoder_dtype="float32"):
    """Exports SAM `variant` with random weights on CUDA into `work/<variant>` (its image encoder
    in `encoder_dtype`); returns that folder (encoder.pt, decoder.pt, warmup.json and, with
    `state_dict`, sam.pth)."""
    d = os.path.join(work, variant)
    cmd = [sys.executable, os.path.join(ROOT, "models/sam/export.py"), "--variant", variant, "--random",
           "--out-dir", d, "--device", "cuda", "--encoder-dtype", encoder_dtype]
    if state_dict:
        cmd += ["--save-state-dict", os.path.join(d, "sam.pth")]
    subprocess.check_call(cmd)
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--handler", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--variants", default="vit_b,vit_h")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=683)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    os.makedirs(store)
    cfg = os.path.join(ROOT, "models/sam/model-config.yaml")
    variants = args.variants.split(",")
    for v in variants:
        d = export_sam(work, v, state_dict=True)
        subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", os.path.join(d, "encoder.pt"),
                               "--model", os.path.join(d, "decoder.pt"), "--asset", os.path.join(d, "warmup.json"),
                               "--handler", args.handler,
                               "--output", os.path.join(store, f"sam-{v}.tar.gz"), "--skip-model-check"])
    results = {"gpu": torch.cuda.get_device_name(0), "image": [args.width, args.height], "runs": {}}
    w, h = args.width, args.height
    photos = [photo(w, h, s) for s in range(args.n + 3)]
    bodies = [json.dumps({"image": b64png(p), "gen_args": json.dumps(
        {"point_coords": [w // 2, int(h * 0.4)], "point_labels": 1, "dilate_kernel_size": 15})}).encode() for p in photos]
    hdr = {"content-type": "application/json"}
    smi0 = smi_used_mib()
    srv, base, log = start_server(args.bin, store, work, os.path.join(args.out, "server.log"), "--device", "cuda")
    for v in variants:
        url = f"{base}/predictions/sam-{v}"
        t0 = time.perf_counter()
        status, data, hd, _ = request("POST", url, bodies[-1], hdr)
        assert status == 200, data[:300]
        load_s = time.perf_counter() - t0
        for b in bodies[-3:-1]:  # warm-up (new photos)
            request("POST", url, b, hdr)
        first, first_fwd, repeat, repeat_fwd, handler_first, handler_repeat = [], [], [], [], [], []
        for b in bodies[: args.n]:
            status, data, hd, t = request("POST", url, b, hdr)
            assert status == 200 and hd.get("x-stage-cache") == "miss", (status, hd)
            first.append(t)
            first_fwd.append(float(hd["x-inference-time"]) / 1e3)
            handler_first.append((float(hd["x-preprocess-time"]) + float(hd["x-postprocess-time"])) / 1e3)
            status, data, hd, t = request("POST", url, b, hdr)
            assert status == 200 and hd.get("x-stage-cache") == "hit", (status, hd)
            repeat.append(t)
            repeat_fwd.append(float(hd["x-inference-time"]) / 1e3)
            handler_repeat.append((float(hd["x-preprocess-time"]) + float(hd["x-postprocess-time"])) / 1e3)
        models = json.loads(request("GET", f"{base}/models")[1])["models"]
        held = [m for m in models if m["modelName"] == f"sam-{v}"][0].get("residentBytes")
        results["runs"][v] = {"first_request_with_load_s": load_s, "first_click_http": summary(first),
                              "first_click_forward": summary(first_fwd), "repeat_click_http": summary(repeat),
                              "repeat_click_forward": summary(repeat_fwd), "resident_bytes": held,
                              "first_click_handler": summary(handler_first),
                              "repeat_click_handler": summary(handler_repeat)}
    results["nvidia_smi_before_mib"] = smi0
    results["nvidia_smi_with_models_mib"] = smi_used_mib()
    srv.terminate()
    srv.wait(timeout=30)
    log.close()

    sys.path.insert(0, os.path.join(ROOT, "models/sam"))
    import export as sam_export
    from segment_anything import SamPredictor
    for v in variants:
        sam = sam_export.sam_model_registry[v](checkpoint=None)
        sam.load_state_dict(torch.load(os.path.join(work, v, "sam.pth")))
        predictor = SamPredictor(sam.eval().cuda())
        pt = np.array([[w // 2, int(h * 0.4)]], np.float32)
        lab = np.array([1], np.float32)
        for p in photos[-3:]:
            predictor.set_image(p)
            predictor.predict(point_coords=pt, point_labels=lab, multimask_output=True)
        xs = []
        for p in photos[: args.n]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            predictor.set_image(p)
            masks, scores, _ = predictor.predict(point_coords=pt, point_labels=lab, multimask_output=True)
            xs.append(time.perf_counter() - t)
        r = results["runs"][v]
        r["bare_predictor_one_click"] = summary(xs)
        r["ratio_first_click_vs_bare"] = r["first_click_http"]["median_ms"] / r["bare_predictor_one_click"]["median_ms"]
        r["repeat_over_first"] = r["repeat_click_http"]["median_ms"] / r["first_click_http"]["median_ms"]
        del predictor, sam
        torch.cuda.empty_cache()

    lines = [f"GPU: {results['gpu']}; photo {w}x{h} PNG; random weights, fp32; n = {args.n}", "",
             "| variant | bare SamPredictor click median / p99 ms | Tessera first click median / p99 ms (forward) "
             "| ratio first / bare | Tessera repeated click median / p99 ms (forward) | repeated / first "
             "| resident MiB (incl. 256 MiB cache) |", "|---|---|---|---|---|---|---|"]
    for v, r in results["runs"].items():
        lines.append(
            f"| {v} | {r['bare_predictor_one_click']['median_ms']:.1f} / {r['bare_predictor_one_click']['p99_ms']:.1f} "
            f"| {r['first_click_http']['median_ms']:.1f} / {r['first_click_http']['p99_ms']:.1f} ({r['first_click_forward']['median_ms']:.1f}) "
            f"| {r['ratio_first_click_vs_bare']:.2f} "
            f"| {r['repeat_click_http']['median_ms']:.1f} / {r['repeat_click_http']['p99_ms']:.1f} ({r['repeat_click_forward']['median_ms']:.1f}) "
            f"| {r['repeat_over_first']:.1%} | {(r['resident_bytes'] or 0) / 2**20:.0f} |")
    lines += ["", f"nvidia-smi: {results['nvidia_smi_before_mib']} MiB before the server, "
                  f"{results['nvidia_smi_with_models_mib']} MiB with both models resident (incl. CUDA context)",
              "first request incl. load: " + ", ".join(f"{v} {r['first_request_with_load_s']:.1f} s" for v, r in results["runs"].items()),
              "handler pre+post median (first / repeated click): " + ", ".join(
                  f"{v} {r['first_click_handler']['median_ms']:.1f} / {r['repeat_click_handler']['median_ms']:.1f} ms"
                  for v, r in results["runs"].items())]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
