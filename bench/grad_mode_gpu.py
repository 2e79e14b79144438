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
Each mode also meets what users meet: the first request after the load, photo sizes not seen
before (640x480, 1000x752: first and second request each), and a swap-in (the model unloaded and
requested again from its unpacked copy); Python gets the same sizes on its loaded module (first
and second call). Every call is kept in the JSON; the first table shows medians and p90 of 30
(Python) / 24 (server) calls at 512² after 8 warm-up calls.

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


NEW_SIZES = [(640, 480), (1000, 752)]


def photo(w, h, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 255, (h, w, 3), dtype=torch.uint8, generator=g)
    mask = (torch.rand(h, w, generator=g) > 0.7).to(torch.uint8) * 255
    return img, mask


def python_calls(pt, img, mask, executor, grad):
    """First call after load, steady calls at 512², then first/second call at each new size."""
    torch._C._set_graph_executor_optimize(executor == "profiling")
    m = torch.jit.load(pt, map_location="cuda")
    ctx = torch.inference_mode if grad == "inference" else torch.no_grad

    def call(a, b):
        torch.cuda.synchronize()
        t = time.perf_counter()
        m(a.cuda(), b.cuda()).cpu()
        return (time.perf_counter() - t) * 1e3

    with ctx():
        xs = [call(img, mask) for _ in range(WARM + PY_RUNS)]
        new = [[call(*photo(w, h, 1)) for _ in range(2)] for w, h in NEW_SIZES]
    torch._C._set_graph_executor_optimize(True)
    return {"first_ms": xs[0], "steady_ms": xs[WARM:], "new_sizes_ms": new}


def server_calls(args, work, pt, img, mask, executor, grad):
    tag = f"{os.path.basename(os.path.dirname(pt))}-{executor}-{grad}"
    d = os.path.join(work, tag)
    os.makedirs(d)
    store, cfg = make_store(d, f"maxWorkers: 1\ntessera:\n  model: model.pt\n  executor: {executor}\n")
    subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", pt, "--handler", args.handler,
                           "--output", os.path.join(store, "lama.tar.gz")], stdout=subprocess.DEVNULL)
    log_path = os.path.join(d, "server.log")
    srv, base, log = start_server(args.bin, store, d, log_path, "--device", "cuda",
                                  "--forward-grad-mode", grad)

    def post(i, m):
        body = json.dumps({"image": b64png(i.numpy()), "mask_image": b64png(m.numpy())}).encode()
        st, data, h, t = request("POST", f"{base}/predictions/lama", body,
                                 {"content-type": "application/json"})
        assert st == 200, data[:300]
        return {"forward_ms": float(h["x-inference-time"]), "total_ms": t * 1e3,
                "load_ms": float(h.get("x-model-load-time", 0))}

    try:
        calls = [post(img, mask) for _ in range(WARM + SRV_RUNS)]
        new = [[post(*photo(w, h, 1)) for _ in range(2)] for w, h in NEW_SIZES]
        st, data, _, _ = request("DELETE", f"{base}/models/lama")
        assert st == 200, data[:300]
        swap = post(img, mask)
    finally:
        srv.terminate()
        srv.wait()
        log.close()
    phases = []
    for line in open(log_path, errors="replace"):
        if "forward phases" in line:
            nums = dict(re.findall(r"(\w+_ms)=([0-9.]+)", line))
            phases.append(sum(float(v) for v in nums.values()))
    return {"first": calls[0], "steady": calls[WARM:], "new_sizes": new, "swap_in": swap,
            "steady_call_phases_ms": phases[WARM:WARM + SRV_RUNS]}


def med(xs):
    return float(np.median(xs)) if xs else float("nan")


def main():
    args = bench_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    # The servers log each forward's phases (the libtorch call alone) at trace level.
    os.environ["RUST_LOG"] = "info,tessera::runtime=trace"
    img, mask = photo(512, 512, 0)
    results, lines, users = [], [], []
    lines.append(f"# Per-op gap: LaMa, server vs Python, no-grad vs inference mode ({torch.cuda.get_device_name()})\n")
    lines.append("Medians (p90) in ms at 512², after 8 warm-up calls. Python: `m(image.cuda(), mask.cuda()).cpu()` "
                 "on a freshly loaded module. Server: `x-inference-time` (inputs to the device, forward, outputs "
                 "back) and the libtorch call phases alone (trace line: inputs + launch + outputs).\n")
    lines.append("| dtype | executor | grad mode | Python call | server forward | server call phases | server total (HTTP) | server forward / Python |")
    lines.append("|---|---|---|---|---|---|---|---|")
    users.append("\n## What users meet: first request after the load, new sizes, swap-in\n")
    users.append("Server forward ms (total over HTTP in brackets); Python: the same call on its module. "
                 "First-seen sizes marked *new*; the second request at that size follows it. "
                 "Swap-in: `DELETE /models/lama`, then the next request (its load + warm-up in `load`).\n")
    size_cols = " | ".join(f"{w}x{h} new / again" for w, h in NEW_SIZES)
    users.append(f"| dtype | executor | grad mode | first after load: server (load) / Python | {size_cols}: server | {size_cols}: Python | swap-in: server (load) |")
    users.append("|---|---|---|---|" + "---|" * (2 * len(NEW_SIZES)) + "---|")
    for fp16 in (False, True):
        pt = export(work, fp16)
        for executor in ("simple", "profiling"):
            for grad in ("no-grad", "inference"):
                py = python_calls(pt, img, mask, executor, grad)
                srv = server_calls(args, work, pt, img, mask, executor, grad)
                dtype = "fp16" if fp16 else "fp32"
                results.append({"dtype": dtype, "executor": executor, "grad": grad, "python": py, "server": srv})
                fwd = [c["forward_ms"] for c in srv["steady"]]
                tot = [c["total_ms"] for c in srv["steady"]]
                ph = srv["steady_call_phases_ms"]
                lines.append(f"| {dtype} | {executor} | {grad} | {med(py['steady_ms']):.1f} ({pct(py['steady_ms'], 90):.1f}) | "
                             f"{med(fwd):.1f} ({pct(fwd, 90):.1f}) | {med(ph):.1f} | {med(tot):.1f} | "
                             f"{med(fwd) / med(py['steady_ms']):.2f} |")
                f, sw = srv["first"], srv["swap_in"]
                srv_new = " | ".join(" / ".join(f"{c['forward_ms']:.0f} ({c['total_ms']:.0f})" for c in pair)
                                     for pair in srv["new_sizes"])
                py_new = " | ".join(" / ".join(f"{x:.0f}" for x in pair) for pair in py["new_sizes_ms"])
                users.append(f"| {dtype} | {executor} | {grad} | {f['forward_ms']:.0f} ({f['total_ms']:.0f}; load {f['load_ms']:.0f}) / "
                             f"{py['first_ms']:.0f} | {srv_new} | {py_new} | {sw['forward_ms']:.0f} ({sw['total_ms']:.0f}; load {sw['load_ms']:.0f}) |")
                print(lines[-1], "\n", users[-1], flush=True)
    write_results(args.out, results, lines + users)


if __name__ == "__main__":
    main()
