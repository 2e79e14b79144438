#!/usr/bin/env python3
"""Host-core benchmark and CUDA end-to-end check (issue 2), run on the GPU machine.

Exports the example model at a GPU-visible size, packs three copies with `tessera pack`, serves
them with a residency budget for two, and measures:
  - first-request time (load + serve) and the server-reported load time,
  - warm request latency over HTTP (median, p99),
  - a bare TorchScript forward in Python on the same file and input (device only, and with the
    host<->device copies), so the server's overhead over a bare forward can be read off,
  - GPU memory (nvidia-smi and the server's allocator-measured residentBytes) as models load,
    get evicted and are unloaded,
  - parity: the server's output pixels vs the Python forward's.
Prints a table and writes results.json / results.md under --out.

    python bench/core_gpu.py --bin ./tessera --handler example.wasm --out $OUT
"""
import argparse
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import request, smi_used_mib, start_server, summary, write_results  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--handler", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    os.makedirs(store)
    model = os.path.join(work, "model.pt")
    subprocess.check_call([sys.executable, os.path.join(ROOT, "models/example/export.py"), "--out", model,
                           "--width", str(args.width), "--depth", str(args.depth)])
    model_mib = os.path.getsize(model) / 2**20
    cfg = os.path.join(work, "model-config.yaml")
    with open(cfg, "w") as f:
        f.write("maxWorkers: 1\nresponseTimeout: 120\ndeviceType: gpu\ntessera:\n  model: model.pt\n"
                "handler:\n  max_pixels: 100000000\n")
    for name in ["m1", "m2", "m3"]:
        subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", model, "--handler", args.handler,
                               "--output", os.path.join(store, f"{name}.tar.gz"), "--skip-model-check"])
    budget = int(model_mib * 2.5)
    results = {"model_mib": model_mib, "budget_mib": budget, "width": args.width, "depth": args.depth,
               "image": args.size, "gpu": torch.cuda.get_device_name(0), "memory": []}

    def mem(label):
        results["memory"].append({"when": label, "nvidia_smi_used_mib": smi_used_mib()})

    mem("before server")
    srv, base, log = start_server(args.bin, store, work, os.path.join(args.out, "server.log"),
                                  "--device", "cuda", "--memory-budget-mib", str(budget))
    mem("server started, no model")

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    body = json.dumps({"image": base64.b64encode(buf.getvalue()).decode(),
                       "gen_args": json.dumps({"strength": 0.8})}).encode()
    hdr = {"content-type": "application/json"}

    def models():
        return json.loads(request("GET", base + "/models")[1])["models"]

    status, data, h, first = request("POST", base + "/predictions/m1", body, hdr)
    assert status == 200, data
    results["first_request_ms"] = first * 1e3
    results["server_load_ms"] = float(h.get("x-model-load-time", "nan"))
    served = np.array(Image.open(io.BytesIO(base64.b64decode(json.loads(data)["generated_image"]))))
    mem("m1 loaded")
    for _ in range(5):
        request("POST", base + "/predictions/m1", body, hdr)
    lat, inf, pre, post = [], [], [], []
    for _ in range(args.n):
        status, data, h, t = request("POST", base + "/predictions/m1", body, hdr)
        assert status == 200
        lat.append(t)
        inf.append(float(h["x-inference-time"]) / 1e3)
        pre.append(float(h["x-preprocess-time"]) / 1e3)
        post.append(float(h["x-postprocess-time"]) / 1e3)
    results["warm_http"] = summary(lat)
    results["warm_server_forward"] = summary(inf)
    results["warm_handler_preprocess"] = summary(pre)
    results["warm_handler_postprocess"] = summary(post)
    results["resident_bytes_m1"] = [m for m in models() if m["modelName"] == "m1"][0]["residentBytes"]

    for name in ["m2", "m3"]:
        status, data, h, t = request("POST", base + f"/predictions/{name}", body, hdr)
        assert status == 200, data
        mem(f"{name} loaded")
    results["models_after_m3"] = [{k: m.get(k) for k in ("modelName", "state", "residentBytes", "evictions")}
                                  for m in models()]
    for name in ["m1", "m2", "m3"]:
        request("DELETE", base + f"/models/{name}")
    time.sleep(0.5)
    mem("all unloaded")
    srv.terminate()
    srv.wait(timeout=30)
    log.close()
    mem("server stopped")

    # Bare forward in Python on the same file and input.
    m = torch.jit.load(model, map_location="cuda").eval()
    x = torch.from_numpy(img)
    s = torch.tensor([0.8])
    with torch.no_grad():
        for _ in range(5):
            m(x.cuda(), s.cuda())
        torch.cuda.synchronize()
        dev, e2e = [], []
        xc, sc = x.cuda(), s.cuda()
        for _ in range(args.n):
            t = time.perf_counter()
            m(xc, sc)
            torch.cuda.synchronize()
            dev.append(time.perf_counter() - t)
        for _ in range(args.n):
            t = time.perf_counter()
            out = m(x.cuda(), s.cuda()).cpu()
            e2e.append(time.perf_counter() - t)
        # What a Python serving handler does around the same forward: base64 + PNG decode,
        # tensor, forward, PNG encode + base64 (TorchServe-style, in-process, no HTTP).
        py = []
        for _ in range(args.n):
            t = time.perf_counter()
            req = json.loads(body)
            arr = np.array(Image.open(io.BytesIO(base64.b64decode(req["image"]))).convert("RGB"))
            o = m(torch.from_numpy(arr).cuda(), torch.tensor([0.8]).cuda()).cpu().numpy()
            b = io.BytesIO()
            Image.fromarray(o).save(b, format="PNG")
            json.dumps({"generated_image": base64.b64encode(b.getvalue()).decode()})
            py.append(time.perf_counter() - t)
    results["python_handler_pipeline"] = summary(py)
    results["bare_forward_device"] = summary(dev)
    results["bare_forward_with_copies"] = summary(e2e)
    ref = out.numpy()
    results["parity_max_abs_diff"] = int(np.abs(ref.astype(int) - served.astype(int)).max())
    results["overhead_ms_http_vs_bare_with_copies"] = (
        results["warm_http"]["median_ms"] - results["bare_forward_with_copies"]["median_ms"])

    lines = [f"GPU: {results['gpu']}; model {model_mib:.0f} MiB (width {args.width}, depth {args.depth}), "
             f"image {args.size}², budget {budget} MiB", "",
             "| measure | median ms | p99 ms |", "|---|---|---|"]
    for k in ["warm_http", "warm_handler_preprocess", "warm_server_forward", "warm_handler_postprocess",
              "python_handler_pipeline", "bare_forward_with_copies", "bare_forward_device"]:
        lines.append(f"| {k} | {results[k]['median_ms']:.2f} | {results[k]['p99_ms']:.2f} |")
    lines += ["", f"first request {results['first_request_ms']:.0f} ms (server load {results['server_load_ms']:.0f} ms)",
              f"overhead over bare forward (median): {results['overhead_ms_http_vs_bare_with_copies']:.2f} ms",
              f"parity max |diff| = {results['parity_max_abs_diff']}",
              f"residentBytes m1 = {results['resident_bytes_m1']}", "", "| when | nvidia-smi used MiB |", "|---|---|"]
    lines += [f"| {m['when']} | {m['nvidia_smi_used_mib']} |" for m in results["memory"]]
    lines += ["", "models after m3: " + json.dumps(results["models_after_m3"])]
    write_results(args.out, results, lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
