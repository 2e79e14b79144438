#!/usr/bin/env python3
"""SAM vit_h photo-size sweep on the GPU (issue 12, real traffic): clicks on photos of different
sizes one after another (new sizes, repeats, odd sizes), every request reported, first-seen
sizes marked: Tessera with the archive as shipped (loaded and warmed by POST /models first), a
first click on each photo and a second click on the same photo (embedding cached), then a
swap-in (unload, click again), and segment-anything's SamPredictor (set_image + predict, fresh
process) at the same sizes.

    python bench/sam_sweep_gpu.py --bin ./tessera --handler sam.wasm --out $OUT [--encoder-dtype bfloat16]
(--encoder-dtype: the image encoder's precision, export.py's flag; SamPredictor stays float32.)
Needs segment-anything-py importable.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import b64png, bench_args, request, start_server, write_results  # noqa: E402
from sam_gpu import export_sam, photo  # noqa: E402

SIZES = [(1000, 750), (1001, 751), (800, 600), (1000, 750), (640, 480), (1024, 683), (1280, 960), (1001, 751),
         (768, 1024), (640, 480)]


def click(w, h):
    return [w // 2, int(h * 0.4)]


def predictor_mode(state_dict):
    """SamPredictor over the sweep in this fresh process; prints the rows as JSON."""
    sys.path.insert(0, os.path.join(ROOT, "models/sam"))
    import export as sam_export
    from segment_anything import SamPredictor
    sam = sam_export.sam_model_registry["vit_h"](checkpoint=None)
    sam.load_state_dict(torch.load(state_dict))
    predictor = SamPredictor(sam.eval().cuda())
    rows, seen = [], set()
    for i, (w, h) in enumerate(SIZES):
        p = photo(w, h, i)
        torch.cuda.synchronize()
        t = time.perf_counter()
        predictor.set_image(p)
        predictor.predict(point_coords=np.array([click(w, h)], np.float32), point_labels=np.array([1], np.float32),
                          multimask_output=True)
        torch.cuda.synchronize()
        rows.append({"size": [w, h], "first_seen": (w, h) not in seen, "ms": (time.perf_counter() - t) * 1e3})
        seen.add((w, h))
    print(json.dumps(rows))


def main():
    args = bench_args("--predictor", "--encoder-dtype")
    dtype = args.encoder_dtype or "float32"
    if args.predictor:
        return predictor_mode(args.predictor)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    os.makedirs(store)
    d = export_sam(work, "vit_h", state_dict=True, encoder_dtype=dtype)
    subprocess.check_call([args.bin, "pack", "--config", os.path.join(ROOT, "models/sam/model-config.yaml"),
                           "--model", os.path.join(d, "encoder.pt"), "--model", os.path.join(d, "decoder.pt"),
                           "--asset", os.path.join(d, "warmup.json"),
                           "--handler", args.handler, "--output", os.path.join(store, "sam.tar.gz")])
    results = {"gpu": torch.cuda.get_device_name(0), "sizes": SIZES, "server": [], "encoder_dtype": dtype}
    hdr = {"content-type": "application/json"}
    srv, base, log = start_server(args.bin, store, os.path.join(work, "srv"), os.path.join(args.out, "server.log"),
                                  "--device", "cuda")
    status, data, hd, sec = request("POST", f"{base}/models", json.dumps({"model_name": "sam", "url": "sam.tar.gz"}).encode(),
                                    hdr)
    assert status == 200, data[:300]
    results["load_and_warm_up_ms"] = sec * 1e3
    seen = set()
    for i, (w, h) in enumerate(SIZES):
        row = {"size": [w, h], "first_seen": (w, h) not in seen}
        image = b64png(photo(w, h, i))
        for tag, point in [("first", click(w, h)), ("second", [w // 4, h // 4])]:
            body = json.dumps({"image": image, "gen_args": json.dumps(
                {"point_coords": point, "point_labels": 1, "dilate_kernel_size": 15})}).encode()
            status, data, hd, sec = request("POST", f"{base}/predictions/sam", body, hdr)
            assert status == 200, data[:2000]
            row[tag] = {"total_ms": sec * 1e3, "forward_ms": float(hd["x-inference-time"]),
                        "stage_cache": hd.get("x-stage-cache")}
        results["server"].append(row)
        seen.add((w, h))
    # Swap-in: unload (SageMaker UnloadModel), then the next click reloads the model from its
    # unpacked copy on local disk and warms it up before answering; a seen size, then a new one.
    status, data, _, _ = request("DELETE", f"{base}/models/sam")
    assert status == 200, data[:300]
    results["swap_in"] = []
    for i, (w, h) in enumerate([SIZES[0], (896, 672)]):
        body = json.dumps({"image": b64png(photo(w, h, 100 + i)), "gen_args": json.dumps(
            {"point_coords": click(w, h), "point_labels": 1, "dilate_kernel_size": 15})}).encode()
        status, data, hd, sec = request("POST", f"{base}/predictions/sam", body, hdr)
        assert status == 200, data[:2000]
        results["swap_in"].append({"size": [w, h], "total_ms": sec * 1e3, "forward_ms": float(hd["x-inference-time"]),
                                   "load_ms": float(hd.get("x-model-load-time", 0))})
    srv.terminate()
    srv.wait(timeout=30)
    log.close()
    with open(os.path.join(args.out, "server.log")) as f:
        results["warm_up_log"] = [line.strip() for line in f if "warm-up" in line or "model loaded" in line]
    out = subprocess.check_output([sys.executable, __file__, "--predictor", os.path.join(d, "sam.pth")])
    results["predictor"] = json.loads(out.decode().strip().splitlines()[-1])
    lines = [f"GPU: {results['gpu']}; SAM vit_h, random weights, image encoder in {dtype} (SamPredictor: float32), "
             f"the archive as shipped (profiling executor, "
             f"1024² encoder input, two warm-up clicks); POST /models (load + warm-up) "
             f"{results['load_and_warm_up_ms']:.0f} ms", "",
             "| # | size | first seen | Tessera first click total / forward ms | Tessera second click (embedding "
             "cached) total / forward ms | SamPredictor set_image + predict ms | first click forward / SamPredictor "
             "| first click total / SamPredictor |",
             "|---|---|---|---|---|---|---|---|"]
    for i, (w, h) in enumerate(SIZES):
        r, b = results["server"][i], results["predictor"][i]
        f, g = r["first"], r["second"]
        lines.append(f"| {i + 1} | {w}x{h} | {'yes' if r['first_seen'] else ''} | {f['total_ms']:.0f} / "
                     f"{f['forward_ms']:.0f} | {g['total_ms']:.0f} / {g['forward_ms']:.1f} ({g['stage_cache']}) "
                     f"| {b['ms']:.0f} | {f['forward_ms'] / b['ms']:.2f} | {f['total_ms'] / b['ms']:.2f} |")
    lines += ["", "After the sweep, the model unloaded and clicked again (reload from its unpacked copy on local disk "
              "and warm-up: a swap-in), total / forward / load + warm-up ms: " + "; ".join(
                  f"{r['size'][0]}x{r['size'][1]} {r['total_ms']:.0f} / {r['forward_ms']:.0f} / {r['load_ms']:.0f}"
                  for r in results["swap_in"]),
              "", "Row 1 of the SamPredictor column includes its CUDA initialisation. Server log:", ""]
    lines += ["    " + line for line in results["warm_up_log"]]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
