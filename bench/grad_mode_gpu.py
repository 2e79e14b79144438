#!/usr/bin/env python3
"""The per-op gap (issue 12, item 3): the same LaMa TorchScript forward inside the server and
from Python, with autograd kept out by a no-grad guard only or by inference mode.

Full-size big-lama generator (random weights), 512x512 photo, fp32 and fp16, both TorchScript
executors (`profiling`, `simple`). In one run:
  - Python, each mode in this process on a freshly loaded module: the call `m(image, mask)` with
    the uint8 inputs copied to the GPU and the output copied back (what the server's forward
    does), under `torch.no_grad()` and under `torch.inference_mode()`;
  - Tessera over HTTP (seed JSON + PNG), one server per mode: `--forward-grad-mode no-grad`
    (the forward threads before this change) and `inference` (now the default); the forward's
    own time (`x-inference-time`) and the libtorch call alone (the runtime's trace line).
Every timed call is kept in the JSON; the table shows medians and p90 of 30 (Python) / 24
(server) calls after 8 warm-up calls.

    python bench/grad_mode_gpu.py --bin ./tessera --handler lama.wasm --out $OUT
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import b64png, bench_args, make_store, pct, request, start_server, write_results  # noqa: E402

WARM, PY_RUNS, SRV_RUNS = 8, 30, 24


def export(work, fp16):
    pt = os.path.join(work, f"lama{'16' if fp16 else '32'}", "model.pt")
    os.makedirs(os.path.dirname(pt), exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "models/lama/export.py"), "--random", "--out", pt,
           "--device", "cuda"] + (["--fp16"] if fp16 else [])
    subprocess.check_call(cmd, stdout=subprocess.DEVNULL)
    return pt


def python_calls(pt, img, mask, executor, grad):
    torch._C._set_graph_executor_optimize(executor == "profiling")
    m = torch.jit.load(pt, map_location="cuda")
    ctx = torch.inference_mode if grad == "inference" else torch.no_grad
    xs = []
    with ctx():
        for i in range(WARM + PY_RUNS):
            torch.cuda.synchronize()
            t = time.perf_counter()
            m(img.cuda(), mask.cuda()).cpu()
            if i >= WARM:
                xs.append((time.perf_counter() - t) * 1e3)
    torch._C._set_graph_executor_optimize(True)
    return xs


def server_calls(args, work, pt, img, mask, executor, grad):
    tag = f"{os.path.basename(os.path.dirname(pt))}-{executor}-{grad}"
    d = os.path.join(work, tag)
    os.makedirs(d)
    store, cfg = make_store(d, f"maxWorkers: 1\ntessera:\n  model: model.pt\n  executor: {executor}\n")
    subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", pt, "--handler", args.handler,
                           "--output", os.path.join(store, "lama.tar.gz")], stdout=subprocess.DEVNULL)
    env = dict(os.environ, RUST_LOG="info,tessera::runtime=trace")
    log_path = os.path.join(args.out, f"server-{tag}.log")
    old = os.environ.copy()
    os.environ.update(env)
    try:
        srv, base, log = start_server(args.bin, store, d, log_path, "--device", "cuda",
                                      "--forward-grad-mode", grad)
    finally:
        os.environ.clear()
        os.environ.update(old)
    body = json.dumps({"image": b64png(img.numpy()), "mask_image": b64png(mask.numpy())}).encode()
    forward, total = [], []
    try:
        for i in range(WARM + SRV_RUNS):
            st, data, h, t = request("POST", f"{base}/predictions/lama", body,
                                     {"content-type": "application/json"})
            assert st == 200, data[:300]
            if i >= WARM:
                forward.append(float(h["x-inference-time"]))
                total.append(t * 1e3)
    finally:
        srv.terminate()
        srv.wait()
        log.close()
    calls = []
    for line in open(log_path, errors="replace"):
        if "forward phases" in line:
            nums = dict(re.findall(r"(\w+_ms)=([0-9.]+)", line))
            calls.append(sum(float(v) for v in nums.values()))
    return forward, total, calls[WARM:]


def med(xs):
    return float(np.median(xs)) if xs else float("nan")


def main():
    args = bench_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 255, (512, 512, 3), dtype=torch.uint8, generator=g)
    mask = ((torch.rand(512, 512, generator=g) > 0.7).to(torch.uint8) * 255)
    results, lines = [], []
    lines.append(f"# Per-op gap: LaMa 512², server vs Python, no-grad vs inference mode ({torch.cuda.get_device_name()})\n")
    lines.append("Medians (p90) in ms. Python: `m(image.cuda(), mask.cuda()).cpu()` on a fresh module. "
                 "Server: `x-inference-time` (inputs to the device, forward, outputs back) and the libtorch "
                 "call phases alone (trace line: inputs + launch + outputs).\n")
    lines.append("| dtype | executor | grad mode | Python call | server forward | server call phases | server total (HTTP) | server forward / Python |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for fp16 in (False, True):
        pt = export(work, fp16)
        for executor in ("simple", "profiling"):
            for grad in ("no-grad", "inference"):
                py = python_calls(pt, img, mask, executor, grad)
                fwd, tot, calls = server_calls(args, work, pt, img, mask, executor, grad)
                r = {"dtype": "fp16" if fp16 else "fp32", "executor": executor, "grad": grad,
                     "python_ms": py, "server_forward_ms": fwd, "server_total_ms": tot,
                     "server_call_phases_ms": calls}
                results.append(r)
                lines.append(f"| {r['dtype']} | {executor} | {grad} | {med(py):.1f} ({pct(py, 90):.1f}) | "
                             f"{med(fwd):.1f} ({pct(fwd, 90):.1f}) | {med(calls):.1f} | {med(tot):.1f} | "
                             f"{med(fwd) / med(py):.2f} |")
                print(lines[-1], flush=True)
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
