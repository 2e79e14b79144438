#!/usr/bin/env python3
"""LaMa benchmark (issue 5), run on the GPU machine: full-size big-lama generator with random
weights, fp32 and fp16, at 512² and 1024².

For each precision and size, in one run:
  - bare PyTorch: the eager module on the GPU, uint8 image + mask in host memory -> uint8
    result in host memory (the copies included), and the same TorchScript file Tessera serves,
    run from Python;
  - Tessera over HTTP (the seed's JSON + PNG request, kept-alive connection), with the
    server's own handler/forward breakdown;
  - the seed's Python handler path in-process on the same request body and the same
    TorchScript file (issue 12, item 6): json + base64 + PIL decode of image and mask, padding
    to a multiple of 8, the forward with graph-executor optimisation off (the server's `simple`
    executor), the crop, PIL PNG encode + base64 + json; and that forward alone;
  - GPU memory held (the server's allocator-measured residentBytes, nvidia-smi).
Writes results.json / results.md under --out.

    python bench/lama_gpu.py --bin ./tessera --handler lama.wasm --out $OUT \
        [--tessera 'cudaGraphs: true' --tessera 'executor: simple'] [--server-arg ...]
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
sys.path.insert(0, os.path.join(ROOT, "models/lama"))
from common import (b64png, make_store, request, seed_lama_decode, seed_lama_response, smi_used_mib,  # noqa: E402
                    start_server, summary, wait_for_warm_up, write_results)
import lama  # noqa: E402
import export  # noqa: E402


def scene(size, seed=0):
    """A photo-like image (gradients + mild noise) and a 0/255 mask over an object-sized blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([x * 200 + 30, y * 180 + 40, (x + y) * 100 + 20], -1) + rng.normal(0, 6, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    mask = (((x - 0.55) ** 2 + (y - 0.45) ** 2) < 0.2 ** 2).astype(np.uint8) * 255
    return img, mask



def seed_path(body_bytes, model):
    """The seed's LaMa handler, in-process: request body in, response body out."""
    image, mask, h, w = seed_lama_decode(body_bytes)
    with torch.no_grad():
        out = model(torch.from_numpy(image).cuda(), torch.from_numpy(mask).cuda()).cpu().numpy()
    return seed_lama_response(out[:h, :w])


def time_it(fn, n, warmup=5, idle_s=0.0):
    """Median/p99 of `fn` (synchronised). `idle_s` leaves the GPU idle that long before each
    call, as a server's GPU is while the handler decodes and encodes between forwards."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    xs = []
    for _ in range(n):
        if idle_s:
            time.sleep(idle_s)
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        xs.append(time.perf_counter() - t)
    return summary(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--handler", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `tessera serve` argument")
    ap.add_argument("--tessera", action="append", default=[],
                    help="extra `tessera:` key of the archive config, as `key: value` (e.g. `cudaGraphs: true`)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    extra = "".join(f"  {kv}\n" for kv in args.tessera)
    store, cfg = make_store(work, "maxWorkers: 1\nresponseTimeout: 300\ndeviceType: gpu\ntessera:\n  model: model.pt\n"
                                  f"  handlerMemoryMiB: 2048\n{extra}handler:\n  max_pixels: 4194304\n")
    results = {"gpu": torch.cuda.get_device_name(0), "runs": [], "server_args": args.server_arg,
               "tessera_keys": args.tessera,
               "python_math": {"cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                               "cudnn_benchmark": torch.backends.cudnn.benchmark,
                               "cudnn_deterministic": torch.backends.cudnn.deterministic,
                               "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}}
    torch.manual_seed(0)
    generator = lama.FFCResNetGenerator()
    export.randomize(generator, 0)
    sd = os.path.join(work, "g.pth")
    torch.save(generator.state_dict(), sd)
    results["params_m"] = sum(p.numel() for p in generator.parameters()) / 1e6
    for prec in ["fp32", "fp16"]:
        d = os.path.join(work, prec)
        os.makedirs(d)
        pt = os.path.join(d, "model.pt")
        cmd = [sys.executable, os.path.join(ROOT, "models/lama/export.py"), "--random", "--out", pt,
               "--device", "cuda"] + (["--fp16"] if prec == "fp16" else [])
        subprocess.check_call(cmd)
        subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", pt, "--handler", args.handler,
                               "--output", os.path.join(store, f"lama-{prec}.tar.gz"), "--skip-model-check"])
    smi0 = smi_used_mib()
    srv, base, log = start_server(args.bin, store, work, os.path.join(args.out, "server.log"), "--device", "cuda",
                                  *args.server_arg)
    hdr = {"content-type": "application/json"}
    for prec in ["fp32", "fp16"]:
        name = f"lama-{prec}"
        for size in [512, 1024]:
            img, mask = scene(size)
            body = json.dumps({"image": b64png(img), "mask_image": b64png(mask), "prompt": "ignored"}).encode()
            status, data, h, first = request("POST", f"{base}/predictions/{name}", body, hdr)
            assert status == 200, data[:300]
            # The model's warm-up (cuFFT's kernels for every FFT length) runs between requests
            # from its load on: let it finish, so that the timed requests do not wait for its
            # steps (seconds on a machine whose driver has not compiled them yet).
            t = time.perf_counter()
            wait_for_warm_up(base, name)
            results.setdefault("warm_up_wait_ms", {})[f"{name} {size}"] = (time.perf_counter() - t) * 1e3
            for _ in range(5):
                request("POST", f"{base}/predictions/{name}", body, hdr)
            lat, inf, pre, post = [], [], [], []
            for _ in range(args.n):
                status, data, h, t = request("POST", f"{base}/predictions/{name}", body, hdr)
                assert status == 200
                lat.append(t)
                inf.append(float(h["x-inference-time"]) / 1e3)
                pre.append(float(h["x-preprocess-time"]) / 1e3)
                post.append(float(h["x-postprocess-time"]) / 1e3)
            served = np.array(Image.open(io.BytesIO(base64.b64decode(json.loads(data)["generated_image"]))))
            models = json.loads(request("GET", f"{base}/models")[1])["models"]
            held = [m for m in models if m["modelName"] == name][0].get("residentBytes")
            results["runs"].append({"precision": prec, "size": size, "first_request_ms": first * 1e3, "body": body,
                                    "http": summary(lat), "server_forward": summary(inf),
                                    "handler_pre": summary(pre), "handler_post": summary(post),
                                    "resident_bytes": held, "served": served, "img": img, "mask": mask})
    results["nvidia_smi_before_mib"] = smi0
    results["nvidia_smi_two_models_mib"] = smi_used_mib()
    srv.terminate()
    srv.wait(timeout=30)
    log.close()

    # Bare PyTorch on the same weights, in this process after the server is gone.
    for prec in ["fp32", "fp16"]:
        dtype = torch.float16 if prec == "fp16" else torch.float32
        g = lama.FFCResNetGenerator()
        g.load_state_dict(torch.load(sd))
        g = g.eval().cuda().to(dtype)
        eager = lama.LamaInpaint(g, dtype)
        scripted = torch.jit.load(os.path.join(work, prec, "model.pt"), map_location="cuda")
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
        for run in [r for r in results["runs"] if r["precision"] == prec]:
            img, mask = torch.from_numpy(run["img"]), torch.from_numpy(run["mask"])
            with torch.no_grad():
                run["bare_eager"] = time_it(lambda: eager(img.cuda(), mask.cuda()).cpu(), args.n)
                run["bare_torchscript"] = time_it(lambda: scripted(img.cuda(), mask.cuda()).cpu(), args.n)
                # The same calls with the GPU idle between them for as long as the server's
                # requests leave it idle (handler pre + post + HTTP).
                gap = (run["http"]["median_ms"] - run["server_forward"]["median_ms"]) / 1e3
                run["idle_gap_ms"] = gap * 1e3
                run["bare_torchscript_idle"] = time_it(lambda: scripted(img.cuda(), mask.cuda()).cpu(), args.n,
                                                       idle_s=gap)
                run["bare_eager_idle"] = time_it(lambda: eager(img.cuda(), mask.cuda()).cpu(), args.n, idle_s=gap)
                ref = eager(img.cuda(), mask.cuda()).cpu().numpy()
            # The seed's path and the forward alone, under the server's executor (`simple`:
            # graph-executor optimisation off, a per-thread switch).
            torch._C._set_graph_executor_optimize(False)
            try:
                run["seed_path"] = time_it(lambda: seed_path(run["body"], scripted), args.n)
                with torch.no_grad():
                    run["bare_torchscript_simple"] = time_it(
                        lambda: scripted(img.cuda(), mask.cuda()).cpu(), args.n)
            finally:
                torch._C._set_graph_executor_optimize(True)
            run["ratio_http_vs_seed_path"] = run["http"]["median_ms"] / run["seed_path"]["median_ms"]
            run["ratio_forward_vs_python"] = (run["server_forward"]["median_ms"]
                                              / run["bare_torchscript_simple"]["median_ms"])
            run["parity_max_diff_vs_eager"] = int(np.abs(ref.astype(int) - run["served"].astype(int)).max())
            run["parity_pixels_over_1"] = int((np.abs(ref.astype(int) - run["served"].astype(int)) > 1).sum())
            run["ratio_http_vs_bare_eager"] = run["http"]["median_ms"] / run["bare_eager"]["median_ms"]
            run["eager_peak_mib"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
            for k in ["served", "img", "mask", "body"]:
                del run[k]
        del eager, scripted, g
        torch.cuda.empty_cache()

    lines = [f"GPU: {results['gpu']}; big-lama generator {results['params_m']:.1f} M params, random weights; "
             f"server args {args.server_arg or '(none)'}; archive keys {args.tessera or '(none)'}", "",
             "| precision | size | Tessera HTTP median / p99 ms | handler pre / post ms | server forward ms "
             "| bare eager PyTorch median / p99 ms | TorchScript from Python ms | with idle gaps: eager / TorchScript ms "
             "| ratio HTTP / eager | resident MiB | parity max diff (px > 1) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(
            f"| {r['precision']} | {r['size']}² | {r['http']['median_ms']:.1f} / {r['http']['p99_ms']:.1f} "
            f"| {r['handler_pre']['median_ms']:.1f} / {r['handler_post']['median_ms']:.1f} "
            f"| {r['server_forward']['median_ms']:.1f} | {r['bare_eager']['median_ms']:.1f} / {r['bare_eager']['p99_ms']:.1f} "
            f"| {r['bare_torchscript']['median_ms']:.1f} "
            f"| {r['bare_eager_idle']['median_ms']:.1f} / {r['bare_torchscript_idle']['median_ms']:.1f} "
            f"| {r['ratio_http_vs_bare_eager']:.2f} "
            f"| {(r['resident_bytes'] or 0) / 2**20:.0f} | {r['parity_max_diff_vs_eager']} ({r['parity_pixels_over_1']}) |")
    lines += ["", "The seed's handler path in-process (json, base64, PIL decode, pad, forward, crop, PIL PNG encode) "
              "on the same body and TorchScript file, optimisation off as the server runs it (issue 12 item 6: "
              "HTTP ≤ 1.0x the seed path, server forward ≤ 1.05x the forward from Python):", "",
              "| precision | size | Tessera HTTP median ms | seed path in-process median / p99 ms | HTTP / seed path "
              "| server forward median ms | TorchScript from Python, optimisation off, median ms | forward ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        lines.append(
            f"| {r['precision']} | {r['size']}² | {r['http']['median_ms']:.1f} "
            f"| {r['seed_path']['median_ms']:.1f} / {r['seed_path']['p99_ms']:.1f} | {r['ratio_http_vs_seed_path']:.2f} "
            f"| {r['server_forward']['median_ms']:.1f} | {r['bare_torchscript_simple']['median_ms']:.1f} "
            f"| {r['ratio_forward_vs_python']:.2f} |")
    lines += ["", f"nvidia-smi: {results['nvidia_smi_before_mib']} MiB before the server, "
                  f"{results['nvidia_smi_two_models_mib']} MiB with both models resident (incl. CUDA context)",
              "idle gaps: the bare calls repeated with the GPU left idle before each for the server's "
              "non-forward time (HTTP median - forward median), as it is between a server's forwards",
              f"waited for each model's warm-up after its first request (ms): {results.get('warm_up_wait_ms')}"]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
