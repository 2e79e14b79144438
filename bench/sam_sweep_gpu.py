#!/usr/bin/env python3
"""SAM vit_h photo-size sweep on the GPU (issue 12, real traffic): first clicks on photos of
different sizes one after another (new sizes, repeats, odd sizes), every request reported,
first-seen sizes marked: Tessera under both TorchScript executors, and segment-anything's
SamPredictor (set_image + predict, fresh process) at the same sizes.

    python bench/sam_sweep_gpu.py --bin ./tessera --handler sam.wasm --out $OUT
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
from sam_gpu import photo  # noqa: E402

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
    args = bench_args("--predictor")
    if args.predictor:
        return predictor_mode(args.predictor)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    os.makedirs(store)
    d = os.path.join(work, "vit_h")
    subprocess.check_call([sys.executable, os.path.join(ROOT, "models/sam/export.py"), "--variant", "vit_h", "--random",
                           "--out-dir", d, "--device", "cuda", "--save-state-dict", os.path.join(d, "sam.pth")])
    subprocess.check_call([args.bin, "pack", "--config", os.path.join(ROOT, "models/sam/model-config.yaml"),
                           "--model", os.path.join(d, "encoder.pt"), "--model", os.path.join(d, "decoder.pt"),
                           "--handler", args.handler, "--output", os.path.join(store, "sam.tar.gz")])
    results = {"gpu": torch.cuda.get_device_name(0), "sizes": SIZES, "server": {}}
    hdr = {"content-type": "application/json"}
    for mode in ["profiling", "simple"]:
        srv, base, log = start_server(args.bin, store, os.path.join(work, mode), os.path.join(args.out, f"server-{mode}.log"),
                                      "--device", "cuda", "--torchscript-executor", mode)
        rows, seen = [], set()
        for i, (w, h) in enumerate(SIZES):
            body = json.dumps({"image": b64png(photo(w, h, i)), "gen_args": json.dumps(
                {"point_coords": click(w, h), "point_labels": 1, "dilate_kernel_size": 15})}).encode()
            status, data, hd, sec = request("POST", f"{base}/predictions/sam", body, hdr)
            rows.append({"size": [w, h], "first_seen": (w, h) not in seen, "total_ms": sec * 1e3, "status": status,
                         "forward_ms": float(hd.get("x-inference-time", "nan")),
                         "load_ms": float(hd.get("x-model-load-time", 0))})
            if status != 200:
                rows[-1]["error"] = data[:2000].decode(errors="replace")
                print(mode, w, h, status, rows[-1]["error"], flush=True)
            seen.add((w, h))
        results["server"][mode] = rows
        with open(os.path.join(args.out, "server-rows.json"), "w") as f:
            json.dump(results["server"], f, indent=1)
        srv.terminate()
        srv.wait(timeout=30)
        log.close()
    out = subprocess.check_output([sys.executable, __file__, "--predictor", os.path.join(d, "sam.pth")])
    results["predictor"] = json.loads(out.decode().strip().splitlines()[-1])
    lines = [f"GPU: {results['gpu']}; SAM vit_h fp32, random weights; a new photo (first click) per request", "",
             "| # | size | first seen | Tessera profiling total / forward ms | Tessera simple total / forward ms "
             "| SamPredictor set_image + predict ms |", "|---|---|---|---|---|---|"]
    for i, (w, h) in enumerate(SIZES):
        p, q, b = results["server"]["profiling"][i], results["server"]["simple"][i], results["predictor"][i]
        cell = lambda r: f"{r['total_ms']:.0f} / {r['forward_ms']:.0f}" if r["status"] == 200 else f"status {r['status']}"
        lines.append(f"| {i + 1} | {w}x{h} | {'yes' if p['first_seen'] else ''} | {cell(p)} | {cell(q)} | {b['ms']:.0f} |")
    lines += ["", "Request 1 includes the load (x-model-load-time: "
              f"profiling {results['server']['profiling'][0]['load_ms']:.0f} ms, simple {results['server']['simple'][0]['load_ms']:.0f} ms)."]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
