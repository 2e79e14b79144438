#!/usr/bin/env python3
"""Residency at memory speed (issue 14): swap-ins from the host-memory tier against reloads from
local disk and first loads from the `.tar.gz`, on the GPU machine, full-size random weights:
SD2-inpainting fp16 (25 PNDM steps), SAM vit_h (fp32, one click on a 1024x683 photo) and LaMa
(fp32, 512x512).

One server per setting, the same sequence for each: SD2, SAM, LaMa, round after round, with a
device budget (2800 MiB) that holds one of the three at a time, so every request after the first
round finds its model evicted by the one before. Settings: the host tier on (evicted models'
weights kept in page-locked host memory) and off (`--host-memory-budget-mib 0`: a reload from the
unpacked files on local disk). Per request: the tier it came from (`x-model-tier`), the swap-in or
load time (`x-model-load-time`), HTTP total and forward; then a second request at once (the model
resident). The server log gives each move's copy time and whether the host memory was
page-locked, and the host copies made in the background after each load (so that a first eviction
copies only what was written since). Answers are compared with the first round's bytes. `--model-warm-ups off`: LaMa's
background FFT warm-up would otherwise share the GPU with the timed requests.

Also, from Python on the same machine: page-locked host -> GPU copy speed of 2.6 GB.

    python bench/residency_gpu.py --bin ./tessera --handlers <dir with sd/sam/lama.wasm> --out $OUT [--rounds 5]
"""
import base64
import io
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import server_bench_setup, b64png, request, start_server, write_results  # noqa: E402

BUDGET_MIB = 2800
MODELS = ["sd", "sam", "lama"]


def scene(w, h, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x / w * 200, y / h * 180, (x + y) / (w + h) * 255], -1) + rng.normal(0, 8, (h, w, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4: h // 2, w // 3: 2 * w // 3] = 255
    return img, mask


def bodies():
    img, mask = scene(512, 512)
    photo, _ = scene(1024, 683, 1)
    return {
        "sd": json.dumps({"image": b64png(img), "mask_image": b64png(mask), "prompt": "a futuristic vase",
                          "negative_prompt": "blurry",
                          "gen_args": json.dumps({"num_inference_steps": 25, "guidance_scale": 7.5,
                                                  "seed": 1})}).encode(),
        "sam": json.dumps({"image": b64png(photo), "gen_args": json.dumps(
            {"point_coords": [512, 273], "point_labels": 1, "dilate_kernel_size": 15})}).encode(),
        "lama": json.dumps({"image": b64png(img), "mask_image": b64png(mask), "prompt": "ignored"}).encode(),
    }


def export_and_pack(binary, handlers, work, store, out):
    """Exports full-size random SD2 (fp16), SAM vit_h and LaMa under `work` and packs each into
    `store` as `<model>.tar.gz`; returns the times taken and the archives' sizes."""
    results = {}
    t = time.perf_counter()
    py = sys.executable
    quiet = open(os.path.join(out, "export.log"), "w")
    sd = os.path.join(work, "sd")
    subprocess.check_call([py, os.path.join(ROOT, "models/sd/export.py"), "--random", "--device", "cuda", "--fp16",
                           "--out-dir", sd], stdout=quiet, stderr=quiet)
    sam = os.path.join(work, "sam")
    subprocess.check_call([py, os.path.join(ROOT, "models/sam/export.py"), "--variant", "vit_h", "--random",
                           "--out-dir", sam, "--device", "cuda"], stdout=quiet, stderr=quiet)
    os.makedirs(os.path.join(work, "lama"))
    lama = os.path.join(work, "lama", "model.pt")
    subprocess.check_call([py, os.path.join(ROOT, "models/lama/export.py"), "--random", "--out", lama],
                          stdout=quiet, stderr=quiet)
    results["export_s"] = time.perf_counter() - t
    t = time.perf_counter()
    h = handlers
    pack = lambda *a: subprocess.check_call([binary, "pack", *a, "--skip-model-check"])  # noqa: E731
    pack("--config", os.path.join(ROOT, "models/sd/model-config.yaml"), "--model", os.path.join(sd, "sd.pt"),
         "--handler", os.path.join(h, "sd.wasm"), "--asset", os.path.join(sd, "tokenizer"),
         "--asset", os.path.join(sd, "warmup.json"), "--asset", os.path.join(sd, "warmup-unguided.json"),
         "--output", os.path.join(store, "sd.tar.gz"))
    pack("--config", os.path.join(ROOT, "models/sam/model-config.yaml"), "--model", os.path.join(sam, "encoder.pt"),
         "--model", os.path.join(sam, "decoder.pt"), "--asset", os.path.join(sam, "warmup.json"),
         "--handler", os.path.join(h, "sam.wasm"), "--output", os.path.join(store, "sam.tar.gz"))
    pack("--config", os.path.join(ROOT, "models/lama/model-config.yaml"), "--model", lama,
         "--handler", os.path.join(h, "lama.wasm"), "--output", os.path.join(store, "lama.tar.gz"))
    results["pack_s"] = time.perf_counter() - t
    results["archive_bytes"] = {m: os.path.getsize(os.path.join(store, f"{m}.tar.gz")) for m in MODELS}
    return results


def main():
    args, work, store = server_bench_setup([("--rounds", {"type": int, "default": 5})])
    results = {"gpu": torch.cuda.get_device_name(0), "budget_mib": BUDGET_MIB, "rounds": args.rounds,
               "settings": {}}

    # Page-locked host -> GPU copy speed, for reference.
    n = 2_600_000_000
    host = torch.empty(n, dtype=torch.uint8).pin_memory()
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    speeds = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        speeds.append(n / (time.perf_counter() - t) / 1e9)
    results["pinned_h2d_gb_s"] = speeds
    del host, dev
    torch.cuda.empty_cache()

    results.update(export_and_pack(args.bin, args.handlers, work, store, args.out))
    print(f"exported {results['export_s']:.0f} s, packed {results['pack_s']:.0f} s", flush=True)

    body = bodies()
    hdr = {"content-type": "application/json"}
    for setting, host_mib in [("host tier on", 40000), ("host tier off (reload from disk)", 0)]:
        log_path = os.path.join(args.out, f"server-{'on' if host_mib else 'off'}.log")
        srv, base, log = start_server(args.bin, store, work + f"-{host_mib}", log_path, "--device", "cuda",
                                      "--memory-budget-mib", str(BUDGET_MIB), "--model-warm-ups", "off",
                                      "--host-memory-budget-mib", str(host_mib))
        rows, first_bytes, same = [], {}, {m: [] for m in MODELS}
        try:
            for rnd in range(args.rounds + 1):
                for m in MODELS:
                    for k in range(2):
                        status, data, hd, t = request("POST", f"{base}/predictions/{m}", body[m], hdr)
                        assert status == 200, (m, status, data[:300])
                        row = {"round": rnd, "model": m, "call": k, "tier": hd.get("x-model-tier"),
                               "load_ms": float(hd["x-model-load-time"]) if "x-model-load-time" in hd else None,
                               "total_ms": t * 1e3, "forward_ms": float(hd["x-inference-time"])}
                        rows.append(row)
                        if rnd == 0 and k == 0:
                            first_bytes[m] = data
                        else:
                            same[m].append(data == first_bytes[m])
                        print(setting, row, flush=True)
            models = json.loads(request("GET", f"{base}/models")[1])["models"]
            listed = {x["modelName"]: {k: x.get(k) for k in ("tier", "residentBytes", "hostBytes")} for x in models}
            metrics = request("GET", f"{base}/metrics")[1].decode()
        finally:
            srv.terminate()
            srv.wait(timeout=60)
            log.close()
        with open(log_path) as f:
            text = f.read()
        moves = [{"model": mm.group(1), "bytes": int(mm.group(2)), "pinned": mm.group(3) == "true",
                  "ms": float(mm.group(4))}
                 for mm in re.finditer(r'model moved to host memory.*?model=\S*/([\w.-]+)@\S*.*?bytes=(\d+) pinned=(\w+) '
                                       r'ms="?([\d.]+)', text)]
        swaps = [{"model": mm.group(1), "bytes": int(mm.group(2)), "copy_ms": float(mm.group(3)),
                  "ms": int(mm.group(4))}
                 for mm in re.finditer(r'model swapped in from host memory.*?model=\S*/([\w.-]+)@\S*.*?bytes=(\d+) '
                                       r'(?:copied=\d+ )?pinned=\w+ copy_ms="?([\d.]+)"? ms=(\d+)', text)]
        results["settings"][setting] = {"rows": rows, "same_as_first": same, "models": listed,
                                        "moves_to_host": moves, "swap_ins": swaps,
                                        "recaptures": [{"model": mm.group(1), "graphs": int(mm.group(2)),
                                                        "ms": int(mm.group(3))}
                                                       for mm in re.finditer(
                                                           r'CUDA graphs captured again after the swap-in '
                                                           r'model=\S*/([\w.-]+)@\S* graphs=(\d+) ms=(\d+)', text)],
                                        "staged": [{"model": mm.group(1), "bytes": int(mm.group(2)),
                                                    "pinned": mm.group(3) == "true", "ms": float(mm.group(4))}
                                                   for mm in re.finditer(
                                                       r'host copy of a model just loaded made in the background '
                                                       r'model=\S*/([\w.-]+)@\S* bytes=(\d+) pinned=(\w+) ms="?([\d.]+)',
                                                       text)],
                                        "pin_warnings": len(re.findall("could not page-lock", text)),
                                        "swap_metrics": [l for l in metrics.splitlines()
                                                         if l.startswith(("tessera_swap_bytes_total",
                                                                          "tessera_host_tier_bytes"))]}

    lines = [f"GPU: {results['gpu']}; device budget {BUDGET_MIB} MiB (one of the three models at a time); "
             f"SD2-inpainting fp16 25 steps, SAM vit_h fp32 one click on 1024x683, LaMa fp32 512x512; "
             f"full-size random weights; {args.rounds} rounds after the first; one run", "",
             f"Page-locked host -> GPU copy from Python, 2.6 GB: {[round(s, 1) for s in speeds]} GB/s", "",
             f"Archives: { {m: round(b / 2**30, 2) for m, b in results['archive_bytes'].items()} } GiB", ""]
    for setting, r in results["settings"].items():
        lines += [f"## {setting}", "", "| round | model | call | tier | swap-in / load ms | HTTP total ms | forward ms |",
                  "|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            load = f"{row['load_ms']:.0f}" if row["load_ms"] is not None else ""
            lines.append(f"| {row['round']} | {row['model']} | {row['call'] + 1} | {row['tier']} | {load} | "
                         f"{row['total_ms']:.0f} | {row['forward_ms']:.0f} |")
        lines.append("")
        for m in MODELS:
            loads = [row["load_ms"] for row in r["rows"] if row["model"] == m and row["round"] > 0 and row["call"] == 0]
            firsts = [row["total_ms"] for row in r["rows"] if row["model"] == m and row["round"] > 0 and row["call"] == 0]
            lines.append(f"- {m}: swap-in/reload ms {[round(x or 0) for x in loads]} (median "
                         f"{np.median([x or 0 for x in loads]):.0f}); first request after it, HTTP total "
                         f"{[round(x) for x in firsts]}; answers equal the first round's: {r['same_as_first'][m]}")
        if r["moves_to_host"]:
            lines.append(f"- moves to host memory (model, MiB, page-locked, ms): "
                         f"{[(x['model'], x['bytes'] >> 20, x['pinned'], round(x['ms'])) for x in r['moves_to_host']]}")
            lines.append(f"- swap-ins (model, copy ms, whole swap-in ms): "
                         f"{[(x['model'], round(x['copy_ms']), x['ms']) for x in r['swap_ins']]}")
        if r["staged"]:
            lines.append(f"- host copies made in the background after a load (model, MiB, page-locked, ms): "
                         f"{[(x['model'], x['bytes'] >> 20, x['pinned'], round(x['ms'])) for x in r['staged']]}")
        if r["recaptures"]:
            lines.append(f"- CUDA graphs captured again before serving (model, graphs, ms): "
                         f"{[(x['model'], x['graphs'], x['ms']) for x in r['recaptures']]}")
        lines.append(f"- page-lock warnings: {r['pin_warnings']}; GET /models at the end: {r['models']}")
        lines.append("")
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
