#!/usr/bin/env python3
"""LaMa photo-size sweep on the GPU (issue 12, real traffic): the full-size big-lama generator
(random weights, fp32), photos of different sizes one after another — new sizes, repeats and odd
sizes — as users send them. Every request is reported, first-seen sizes marked.

In one run:
  - Tessera over HTTP (seed JSON + PNG), once per server mode: TorchScript executor
    `profiling` (libtorch's default) and `simple` (what LaMa's archive asks for), both with the
    server's default CUDA allocator settings (expandable segments), and `simple` with
    libtorch's allocator defaults (`--cuda-alloc-conf ''`): total and forward ms;
  - after the sweep, the model unloaded and requested again (a swap-in from the unpacked copy
    on local disk), at a seen and a new size;
  - the same TorchScript file from Python, default executor and graph-executor optimisation off;
  - eager PyTorch on the same weights: the first call at each size, with libtorch's allocator
    defaults (what a user's own script gets) and with expandable segments.
Each Python mode runs in a fresh process. (Python calls get the image padded to a multiple of 8 on each side, as the LaMa handler pads it.)
The archive is packed with the sandboxed TorchScript check on (no --skip-model-check), so the run
also shows the check and the load path working on CUDA.

    python bench/sweep_gpu.py --bin ./tessera --handler lama.wasm --out $OUT [--modes "simple;simple, freeze"]

(`--modes`: server modes to run, in this order, `;`-separated; all by default. `simple, freeze` is
`simple` with the archive asking the host to freeze the model at load, `tessera.optimize:
freeze`; `simple, warmed up` loads the model through the management API and starts the sweep once
its warm-up is done. The driver's kernel cache is the machine's: the first mode on a fresh
machine compiles what later ones find compiled.)
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
sys.path.insert(0, os.path.join(ROOT, "models/lama"))
from common import (b64png, bench_args, cuda_timed_ms, make_store, request, start_server,  # noqa: E402
                    wait_for_warm_up, write_results)
import lama  # noqa: E402
import export  # noqa: E402

# (width, height) in request order.
SIZES = [(1000, 750), (1001, 751), (800, 600), (1000, 750), (640, 480), (1024, 683), (512, 512),
         (1001, 751), (1280, 960), (640, 480), (768, 1024), (1000, 750)]


# Server modes: label -> extra `tessera serve` arguments.
SERVER_MODES = {
    "profiling": ["--torchscript-executor", "profiling"],
    "simple": ["--torchscript-executor", "simple"],
    "simple, allocator defaults": ["--torchscript-executor", "simple", "--cuda-alloc-conf", ""],
    # The same file frozen by the host at load (`tessera.optimize: freeze`), in its own archive.
    "simple, freeze": ["--torchscript-executor", "simple"],
    # Loaded by the management API first, the sweep starting once the model's warm-up (its
    # `warm_up` method: cuFFT's kernels for every FFT length, compiled by the driver at first
    # use on a machine) is done.
    "simple, warmed up": ["--torchscript-executor", "simple"],
}
# Modes that load the model and wait for its warm-up before the first request.
LOAD_FIRST = {"simple, warmed up"}
# What a mode's archive adds under `tessera:`.
MODE_CONFIG = {"simple, freeze": "  optimize: freeze\n"}
CONFIG = ("maxWorkers: 1\nresponseTimeout: 300\ndeviceType: gpu\ntessera:\n  model: model.pt\n"
          "  handlerMemoryMiB: 2048\nhandler:\n  max_pixels: 4194304\n")


def scene(w, h, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x, y = x / w, y / h
    img = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 100 + 20], -1) + rng.normal(0, 6, (h, w, 3))
    mask = (((x - 0.55) ** 2 + (y - 0.45) ** 2) < 0.2 ** 2).astype(np.uint8) * 255
    return np.clip(img, 0, 255).astype(np.uint8), mask


def padded(w, h):
    """The size the LaMa handler feeds the model: each side padded up to a multiple of 8."""
    return -(-w // 8) * 8, -(-h // 8) * 8


def python_mode(tag, pt):
    """One Python mode over the sweep, in this (fresh) process; prints the rows as JSON."""
    if tag.startswith("eager"):
        g = lama.FFCResNetGenerator()
        export.randomize(g, 0)
        m = lama.LamaInpaint(g.eval().cuda(), torch.float32)
    else:
        torch._C._set_graph_executor_optimize(tag == "torchscript_default")
        m = torch.jit.load(pt, map_location="cuda")
    rows, seen = [], set()
    with torch.no_grad():
        for s in SIZES:
            img, mask = (torch.from_numpy(a) for a in scene(*padded(*s)))
            rows.append({"size": s, "first_seen": s not in seen, "ms": cuda_timed_ms(lambda: m(img.cuda(), mask.cuda()).cpu())})
            seen.add(s)
    print(json.dumps(rows))


def main():
    args = bench_args("--python-mode", "--model", "--modes")
    if args.python_mode:
        return python_mode(args.python_mode, args.model)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store, cfg = make_store(work, CONFIG)
    modes = {m: SERVER_MODES[m] for m in (args.modes.split(";") if args.modes else SERVER_MODES)}
    pt = os.path.join(work, "model.pt")
    subprocess.check_call([sys.executable, os.path.join(ROOT, "models/lama/export.py"), "--random", "--out", pt,
                           "--device", "cuda"])
    t = time.perf_counter()
    subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", pt, "--handler", args.handler,
                           "--output", os.path.join(store, "lama.tar.gz")])
    pack_s = time.perf_counter() - t
    stores = {}
    for mode, extra in MODE_CONFIG.items():
        if mode in modes:
            stores[mode], mode_cfg = make_store(os.path.join(work, f"archive-{len(stores)}"),
                                                CONFIG.replace("tessera:\n", "tessera:\n" + extra))
            subprocess.check_call([args.bin, "pack", "--config", mode_cfg, "--model", pt, "--handler", args.handler,
                                   "--output", os.path.join(stores[mode], "lama.tar.gz"), "--skip-model-check"])
    results = {"gpu": torch.cuda.get_device_name(0), "pack_with_check_s": pack_s,
               "sizes": SIZES, "server": {}, "python": {}}
    def body(img, mask):
        return json.dumps({"image": b64png(img), "mask_image": b64png(mask)}).encode()
    bodies = {s: body(*scene(*s)) for s in set(SIZES) | {(896, 672)}}
    hdr = {"content-type": "application/json"}
    for mode, extra in modes.items():
        srv, base, log = start_server(args.bin, stores.get(mode, store), os.path.join(work, mode), os.path.join(args.out, f"server-{mode.replace(',', '').replace(' ', '-')}.log"),
                                      "--device", "cuda", *extra)
        warm = {}
        if mode in LOAD_FIRST:
            t = time.perf_counter()
            status, data, _, _ = request("POST", f"{base}/models",
                                         json.dumps({"model_name": "lama", "url": "lama.tar.gz"}).encode(), hdr)
            assert status == 200, data[:300]
            warm["load_ms"] = (time.perf_counter() - t) * 1e3
            warm["state"] = wait_for_warm_up(base, "lama")
            warm["warm_up_done_ms"] = (time.perf_counter() - t) * 1e3
        rows, seen = [], set()
        for s in SIZES:
            status, data, h, sec = request("POST", f"{base}/predictions/lama", bodies[s], hdr)
            assert status == 200, data[:300]
            rows.append({"size": s, "first_seen": s not in seen, "total_ms": sec * 1e3,
                         "forward_ms": float(h["x-inference-time"]), "load_ms": float(h.get("x-model-load-time", 0))})
            seen.add(s)
        models = json.loads(request("GET", f"{base}/models")[1])["models"]
        # Swap-in: unload (SageMaker UnloadModel), then the next request reloads the model from
        # its unpacked copy on local disk (already checked), at a size seen and a new one.
        status, data, _, _ = request("DELETE", f"{base}/models/lama")
        assert status == 200, data[:300]
        swap = []
        for s in [SIZES[0], (896, 672)]:
            status, data, h, sec = request("POST", f"{base}/predictions/lama", bodies[s], hdr)
            assert status == 200, data[:300]
            swap.append({"size": s, "total_ms": sec * 1e3, "forward_ms": float(h["x-inference-time"]),
                         "load_ms": float(h.get("x-model-load-time", 0))})
        srv_log = os.path.join(args.out, f"server-{mode.replace(',', '').replace(' ', '-')}.log")
        with open(srv_log) as f:
            warm["log"] = [line.strip() for line in f if "warm-up done" in line]
        results["server"][mode] = {"rows": rows, "resident_bytes": models[0].get("residentBytes"), "swap_in": swap,
                                   "load_first": warm}
        srv.terminate()
        srv.wait(timeout=30)
        log.close()
        with open(os.path.join(args.out, "server-rows.json"), "w") as f:
            json.dump(results["server"], f, indent=1)

    # Python on the same file and weights, each mode in a fresh process (a process that has
    # seen a size has its cuDNN/cuFFT plans and allocator blocks for it).
    for tag in ["torchscript_default", "torchscript_optimize_off", "eager", "eager_expandable"]:
        env = dict(os.environ)
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if tag == "eager_expandable":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        out = subprocess.check_output([sys.executable, __file__, "--python-mode", tag, "--model", pt], env=env)
        results["python"][tag] = json.loads(out.decode().strip().splitlines()[-1])

    lines = [f"GPU: {results['gpu']}; big-lama fp32, random weights; pack incl. sandboxed TorchScript check "
             f"{results['pack_with_check_s']:.1f} s", "",
             "| # | size | first seen | " + " | ".join(f"Tessera {m} total / forward ms" for m in modes)
             + " | TorchScript from Python, default ms | TorchScript, optimize off ms | eager ms "
             "| eager, expandable segments ms |",
             "|---|---|---|" + "---|" * (len(modes) + 4)]
    for i, s in enumerate(SIZES):
        rows = [results["server"][m]["rows"][i] for m in modes]
        lines.append(f"| {i + 1} | {s[0]}x{s[1]} | {'yes' if rows[0]['first_seen'] else ''} | "
                     + " | ".join(f"{r['total_ms']:.0f} / {r['forward_ms']:.0f}" for r in rows)
                     + f" | {results['python']['torchscript_default'][i]['ms']:.0f} "
                     f"| {results['python']['torchscript_optimize_off'][i]['ms']:.0f} "
                     f"| {results['python']['eager'][i]['ms']:.0f} "
                     f"| {results['python']['eager_expandable'][i]['ms']:.0f} |")
    lines += ["", "After the sweep, the model unloaded and requested again (reload from its unpacked copy on "
              "local disk: a swap-in), total / forward / load ms:"]
    for mode in modes:
        lines.append(f"- {mode}: " + "; ".join(
            f"{r['size'][0]}x{r['size'][1]} {r['total_ms']:.0f} / {r['forward_ms']:.0f} / {r['load_ms']:.0f}"
            for r in results["server"][mode]["swap_in"]))
    for mode in modes:
        w = results["server"][mode]["load_first"]
        for line in w.get("log", []):
            lines.append(f"- {mode}, server log: `{line[line.find('INFO'):]}`")
        if "load_ms" in w:
            lines.append(f"- {mode}: loaded through POST /models in {w['load_ms']:.0f} ms, warm-up done "
                         f"{w['warm_up_done_ms']:.0f} ms after the load began; the sweep started then")
    lines += ["", "Request 1 includes the model load on the server (x-model-load-time: " + ", ".join(
        f"{m} {results['server'][m]['rows'][0]['load_ms']:.0f} ms" for m in modes)
        + f"); residentBytes {results['server'][next(iter(modes))]['resident_bytes']}."]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
