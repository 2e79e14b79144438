#!/usr/bin/env python3
"""SAM clicks from 16 concurrent clients, batched against one by one (issue 15), on the GPU
machine: full-size vit_h with random weights, one server holding two archives of the same
export, `sam-b16` as shipped (`models/sam/model-config.yaml`: batchSize 16, maxBatchDelay 5,
the decoder batchable) and `sam-b1` (the same with batchSize 1).

Each of --clients clients owns one photo (photos of 8 different sizes, so batches mix sizes)
whose embedding is cached by a first click; then all clients click at once in a closed loop,
--clicks clicks each (a new point every time, the seed's request: JSON + PNG photo, mask back
as PNG), every click's latency, forward time and `x-batch-size` recorded. Rounds alternate
b1, b16, b1, b16. Also reported: each archive's load, the first click on each photo after it
(first-seen sizes marked), and a swap-in (sam-b16 unloaded, clicked again). Writes
results.json (every request) and results.md under --out.

    python bench/sam_batch_gpu.py --bin ./tessera --handler sam.wasm --out $OUT
"""
import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import b64png, pct, request, start_server, write_results  # noqa: E402
from sam_gpu import export_sam, photo  # noqa: E402

SIZES = [(1024, 683), (1001, 751), (800, 600), (640, 480), (1280, 960), (512, 768), (1500, 1000), (333, 500)]


def clicker(base, model, body_for, clicks, start, out):
    """One client: its own kept-alive connection, `clicks` clicks after `start` fires."""
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.netloc, timeout=300)
    start.wait()
    for k in range(clicks):
        t = time.perf_counter()
        conn.request("POST", f"/predictions/{model}", body=body_for(k), headers={"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        sec = time.perf_counter() - t
        assert r.status == 200, data[:500]
        out.append({"ms": sec * 1e3, "forward_ms": float(r.getheader("x-inference-time")),
                    "queue_ms": float(r.getheader("x-queue-time")),
                    "handler_ms": float(r.getheader("x-preprocess-time")) + float(r.getheader("x-postprocess-time")),
                    "batch": int(r.getheader("x-batch-size")), "cache": r.getheader("x-stage-cache"),
                    "end": time.perf_counter()})
    conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--handler", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--clicks", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    os.makedirs(store)
    d = export_sam(work, "vit_h")
    shipped = open(os.path.join(ROOT, "models/sam/model-config.yaml")).read()
    assert "batchSize: 16\n" in shipped
    for name, config in [("sam-b16", shipped), ("sam-b1", shipped.replace("batchSize: 16\n", "batchSize: 1\n"))]:
        cfg = os.path.join(work, f"{name}.yaml")
        with open(cfg, "w") as f:
            f.write(config)
        subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", os.path.join(d, "encoder.pt"),
                               "--model", os.path.join(d, "decoder.pt"), "--asset", os.path.join(d, "warmup.json"),
                               "--handler", args.handler, "--output", os.path.join(store, f"{name}.tar.gz"),
                               "--skip-model-check"])
    photos = []
    for c in range(args.clients):
        w, h = SIZES[c % len(SIZES)]
        photos.append((w, h, b64png(photo(w, h, c))))

    def body_for(c):
        # The photo's part of the body encoded once: the client's per-click work is a copy,
        # so the clients (Python threads) measure the server, not their own JSON encoding.
        w, h, image = photos[c]
        rng = np.random.default_rng(c)
        points = [[int(rng.integers(0, w)), int(rng.integers(0, h))] for _ in range(args.clicks + 1)]
        prefix = json.dumps({"image": image})[:-1].encode()
        return lambda k: prefix + (', "gen_args": ' + json.dumps(json.dumps(
            {"point_coords": points[k], "point_labels": 1, "dilate_kernel_size": 15})) + "}").encode()

    bodies = [body_for(c) for c in range(args.clients)]
    results = {"gpu": torch.cuda.get_device_name(0), "clients": args.clients, "clicks": args.clicks,
               "sizes": [p[:2] for p in photos], "rounds": []}
    srv, base, log = start_server(args.bin, store, work, os.path.join(args.out, "server.log"), "--device", "cuda")
    hdr = {"content-type": "application/json"}
    results["loads"] = {}
    for name in ["sam-b1", "sam-b16"]:
        status, data, _, sec = request("POST", f"{base}/models", json.dumps({"model_name": name, "url": f"{name}.tar.gz"}).encode(), hdr)
        assert status == 200, data[:300]
        # Each client's photo: its embedding cached by a first click, one after another (the
        # first is the first request after the load; sizes repeat after 8 clients).
        first, seen = [], set()
        for c in range(args.clients):
            status, data, hd, t = request("POST", f"{base}/predictions/{name}", bodies[c](args.clicks), hdr)
            assert status == 200 and hd.get("x-stage-cache") == "miss", (status, hd, data[:300])
            size = tuple(photos[c][:2])
            first.append({"size": list(size), "first_seen": size not in seen, "ms": t * 1e3,
                          "forward_ms": float(hd["x-inference-time"])})
            seen.add(size)
        results["loads"][name] = {"load_and_warm_up_ms": sec * 1e3, "first_clicks": first}
    for r in range(args.rounds):
        for name in ["sam-b1", "sam-b16"]:
            per = [[] for _ in range(args.clients)]
            start = threading.Event()
            threads = [threading.Thread(target=clicker, args=(base, name, bodies[c], args.clicks, start, per[c]))
                       for c in range(args.clients)]
            for t in threads:
                t.start()
            t0 = time.perf_counter()
            start.set()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            reqs = [x for xs in per for x in xs]
            assert all(x["cache"] == "hit" for x in reqs)
            ms = [x["ms"] for x in reqs]
            batches = [x["batch"] for x in reqs]
            row = {"round": r + 1, "model": name, "wall_s": wall, "clicks_per_s": len(reqs) / wall,
                   "p50_ms": statistics.median(ms), "p90_ms": pct(ms, 90), "p99_ms": pct(ms, 99), "max_ms": max(ms),
                   "forward_p50_ms": statistics.median(x["forward_ms"] for x in reqs),
                   "queue_p50_ms": statistics.median(x["queue_ms"] for x in reqs),
                   "handler_p50_ms": statistics.median(x["handler_ms"] for x in reqs),
                   "mean_batch": sum(batches) / len(batches), "max_batch": max(batches), "requests": per}
            results["rounds"].append(row)
            print(f"round {r + 1} {name}: {row['clicks_per_s']:.1f} clicks/s, p50 {row['p50_ms']:.1f} ms, "
                  f"p99 {row['p99_ms']:.1f} ms, mean batch {row['mean_batch']:.2f}", flush=True)
    # A swap-in: the batched archive unloaded, then a click on a cached photo of before (the
    # embedding went with the model: encoder + decoder after the reload).
    status, data, _, _ = request("DELETE", f"{base}/models/sam-b16")
    assert status == 200, data[:300]
    status, data, hd, t = request("POST", f"{base}/predictions/sam-b16", bodies[0](0), hdr)
    assert status == 200, data[:300]
    results["swap_in"] = {"size": photos[0][:2], "ms": t * 1e3, "forward_ms": float(hd["x-inference-time"]),
                          "load_ms": float(hd.get("x-model-load-time", 0))}
    srv.terminate()
    srv.wait(timeout=30)
    log.close()

    lines = [f"GPU: {results['gpu']}; SAM vit_h, random weights, fp32; {args.clients} clients clicking at once "
             f"(closed loop, {args.clicks} clicks each, on cached embeddings of photos of {len(SIZES)} sizes: "
             f"{', '.join(f'{w}x{h}' for w, h in SIZES)}); the seed's JSON + PNG request, mask back as PNG.", "",
             "| round | archive | clicks/s | p50 / p90 / p99 / max ms | p50 ms: decoder forward / queue / handler "
             "(pre + post) | mean / max batch |",
             "|---|---|---:|---|---|---|"]
    for row in results["rounds"]:
        lines.append(f"| {row['round']} | {row['model']} | {row['clicks_per_s']:.1f} | {row['p50_ms']:.1f} / "
                     f"{row['p90_ms']:.1f} / {row['p99_ms']:.1f} / {row['max_ms']:.1f} | {row['forward_p50_ms']:.2f} / "
                     f"{row['queue_p50_ms']:.2f} / {row['handler_p50_ms']:.2f} | {row['mean_batch']:.2f} / {row['max_batch']} |")
    lines += ["", "Load (POST /models: load + warm-up) and the first click on each client's photo, one after "
              "another (encoder + decoder; * = first time this size is seen by the archive), total / forward ms:"]
    for name, load in results["loads"].items():
        clicks = "; ".join(f"{w}x{h}{'*' if f['first_seen'] else ''} {f['ms']:.0f} / {f['forward_ms']:.0f}"
                           for f in load["first_clicks"] for w, h in [f["size"]])
        lines.append(f"- {name}: load {load['load_and_warm_up_ms']:.0f} ms; {clicks}")
    sw = results["swap_in"]
    lines += ["", f"Swap-in (sam-b16 unloaded, a click on a {sw['size'][0]}x{sw['size'][1]} photo): "
              f"{sw['ms']:.0f} ms total, {sw['forward_ms']:.0f} ms forward, {sw['load_ms']:.0f} ms load + warm-up."]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
