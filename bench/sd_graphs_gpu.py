#!/usr/bin/env python3
"""SD2 inpainting with the server-driven loop and CUDA graphs (issue 12, items 2, 4, 5), on the
GPU machine: full-size SD2-inpainting networks, random weights, fp16, PNDM, guidance 7.5, the
seed's JSON + PNG request (512x512 photo, masked box), 25 and 50 steps. In one run:

  - baselines: diffusers' StableDiffusionInpaintPipeline on the same weights, and export.py's
    sd.pt called from Python (its `forward`: the whole loop in TorchScript, the previous way);
  - Tessera over HTTP, one fresh server per mode: CUDA graphs on with the `simple` and the
    `profiling` TorchScript executor, graphs off (`simple`), and graphs on (`simple`) with the
    archive asking the host to freeze the model at load (`tessera.optimize: freeze`). Per mode: the first request
    (load, warm-up requests and graph captures, as a user meets them), every timed request, a
    request with guidance 1.0 (no classifier-free guidance: a state shape not captured yet, then
    again once captured), a photo of another size (same 512 window), and a swap-in (the model
    unloaded, then requested again: reload-to-serving);
  - bit-identity of identical requests, the masked pixels against diffusers' on the same seed,
    what the graphs hold (server log) and the model's resident bytes; after the swap-in, whether
    the reloaded model (its graphs captured again from the earlier load's signatures, warm-up
    requests skipped) answers the same bytes.

    python bench/sd_graphs_gpu.py --bin ./tessera --handler sd.wasm --out $OUT [--n 5] [--modes "graphs, simple"]
"""
import argparse
import base64
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import yaml
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "models/sd"))
from common import b64png, request, start_server, write_results  # noqa: E402
import export  # noqa: E402
import tokenizer_files  # noqa: E402
from sd_gpu import NEGATIVE, PROMPT, scene  # noqa: E402

MODES = [
    ("graphs, simple", ["--torchscript-executor", "simple"]),
    ("graphs, profiling", ["--torchscript-executor", "profiling"]),
    ("no graphs, simple", ["--cuda-graphs", "off", "--torchscript-executor", "simple"]),
    # The same file frozen by the host at load (`tessera.optimize`), graphs on.
    ("graphs, simple, freeze", ["--torchscript-executor", "simple"]),
]
# What a mode adds under the archive's `tessera:` (each such mode gets its own store).
MODE_CONFIG = {"graphs, simple, freeze": {"optimize": "freeze"}}


def body_for(img, mask, steps, guidance=7.5, seed=1):
    return json.dumps({"image": b64png(img), "mask_image": b64png(mask), "prompt": PROMPT,
                       "negative_prompt": NEGATIVE,
                       "gen_args": json.dumps({"num_inference_steps": steps, "guidance_scale": guidance,
                                               "seed": seed})}).encode()


def post(base, body):
    status, data, h, t = request("POST", f"{base}/predictions/sd", body, {"content-type": "application/json"})
    assert status == 200, data[:500]
    return {"total_ms": t * 1e3, "forward_ms": float(h["x-inference-time"]),
            "image": json.loads(data)["generated_image"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--handler", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=5)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--modes", nargs="+", default=[m for m, _ in MODES], help="server modes to run (names above)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    os.makedirs(store)
    results = {"gpu": torch.cuda.get_device_name(0), "n": args.n, "baselines": [], "modes": {}}

    t = time.perf_counter()
    parts = export.random_parts(False, 0, "PNDMScheduler", "cuda")
    out_dir = os.path.join(work, "sd")
    tokenizer_files.write(__import__("pathlib").Path(out_dir) / "tokenizer")
    export.export(parts, out_dir, "cuda", True, 100)
    export.write_warmup(out_dir)
    results["export_s"] = time.perf_counter() - t
    # The shipped config, without its executor: each mode names one on the command line.
    with open(os.path.join(ROOT, "models/sd/model-config.yaml")) as f:
        config = yaml.safe_load(f)
    config["tessera"].pop("executor", None)
    results["config"] = config
    cfg_path = os.path.join(work, "model-config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config, f)
    def pack(cfg, into):
        os.makedirs(into, exist_ok=True)
        subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", os.path.join(out_dir, "sd.pt"),
                               "--handler", args.handler, "--asset", os.path.join(out_dir, "tokenizer"),
                               *[a for f in export.WARMUP_FILES for a in ("--asset", os.path.join(out_dir, f))],
                               "--output", os.path.join(into, "sd.tar.gz"), "--skip-model-check"])

    t = time.perf_counter()
    pack(cfg_path, store)
    results["pack_s"] = time.perf_counter() - t
    stores = {}
    for mode, extra in MODE_CONFIG.items():
        if mode not in args.modes:
            continue
        tweaked = dict(config, tessera={**config["tessera"], **extra})
        path = os.path.join(work, f"model-config-{len(stores)}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(tweaked, f)
        stores[mode] = os.path.join(work, f"store-{len(stores)}")
        pack(path, stores[mode])
    print(f"exported {results['export_s']:.1f} s, packed {results['pack_s']:.1f} s", flush=True)

    img, mask = scene()
    # Baseline 1: diffusers on the same modules.
    from diffusers import PNDMScheduler, StableDiffusionInpaintPipeline
    from transformers import CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out_dir, "tokenizer"))
    pipe = StableDiffusionInpaintPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, unet=parts.unet, tokenizer=tokenizer,
        scheduler=PNDMScheduler.from_config(parts.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    reference = {}
    for steps in args.steps:
        xs = []
        for k in range(args.n + 1):  # the first is a warm-up, reported apart
            t = time.perf_counter()
            reference[steps] = np.asarray(pipe(
                prompt=PROMPT, negative_prompt=NEGATIVE, image=Image.fromarray(img),
                mask_image=Image.fromarray(mask), num_inference_steps=steps, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(1)).images[0])
            xs.append((time.perf_counter() - t) * 1e3)
        results["baselines"].append({"what": "diffusers pipeline", "steps": steps, "first_ms": xs[0],
                                     "ms": xs[1:]})
        print("diffusers", steps, [round(x) for x in xs], flush=True)
    del pipe, parts
    torch.cuda.empty_cache()

    # Baseline 2: the exported file's forward from Python (the whole loop in TorchScript).
    t = time.perf_counter()
    model = torch.jit.load(os.path.join(out_dir, "sd.pt"), map_location="cuda")
    load_ms = (time.perf_counter() - t) * 1e3
    ids = tokenizer([NEGATIVE, PROMPT], padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    with torch.inference_mode():
        for steps in args.steps:
            xs = []
            for k in range(args.n + 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                model(ids, torch.from_numpy(img), torch.from_numpy(mask), torch.tensor(steps),
                      torch.tensor(7.5), torch.tensor(1))
                torch.cuda.synchronize()
                xs.append((time.perf_counter() - t) * 1e3)
            results["baselines"].append({"what": "sd.pt forward from Python (profiling executor)", "steps": steps,
                                         "load_ms": load_ms, "first_ms": xs[:2], "ms": xs[2:]})
            print("torchscript", steps, [round(x) for x in xs], flush=True)
    del model
    torch.cuda.empty_cache()

    other_img, other_mask = scene(size=640, seed=3)
    for mode, server_args in [m for m in MODES if m[0] in args.modes]:
        log_path = os.path.join(args.out, f"server-{mode.replace(', ', '-').replace(' ', '_')}.log")
        srv, base, log = start_server(args.bin, stores.get(mode, store), work, log_path, "--device", "cuda",
                                      *server_args)
        r = {"rows": []}
        try:
            first_steps = args.steps[0]
            row = post(base, body_for(img, mask, first_steps))
            r["first_request_ms"] = row["total_ms"]
            r["rows"].append({"what": f"first request ({first_steps} steps): load, warm-up, captures",
                              **{k: v for k, v in row.items() if k != "image"}})
            for steps in args.steps:
                images = set()
                times = []
                for k in range(args.n):
                    row = post(base, body_for(img, mask, steps))
                    images.add(row["image"])
                    times.append(row)
                    r["rows"].append({"what": f"{steps} steps", **{k2: v for k2, v in row.items() if k2 != "image"}})
                served = np.array(Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB"))
                hole = mask == 255
                diff = np.abs(served[hole].astype(int) - reference[steps][hole].astype(int))
                r[f"image_{steps}"] = row["image"]
                r[f"steps_{steps}"] = {"total_ms": [x["total_ms"] for x in times],
                                       "forward_ms": [x["forward_ms"] for x in times],
                                       "distinct_images": len(images), "vs_diffusers_max": int(diff.max()),
                                       "vs_diffusers_mean": float(diff.mean())}
                print(mode, steps, [round(x["total_ms"]) for x in times], "distinct", len(images),
                      "diff", int(diff.max()), flush=True)
            for k in range(2):
                row = post(base, body_for(img, mask, args.steps[0], guidance=1.0))
                r["rows"].append({"what": f"guidance 1.0 (no CFG), {'first' if k == 0 else 'second'}",
                                  **{k2: v for k2, v in row.items() if k2 != "image"}})
            for k in range(2):
                row = post(base, body_for(other_img, other_mask, args.steps[0]))
                r["rows"].append({"what": f"640x640 photo, {'first-seen size' if k == 0 else 'again'}",
                                  **{k2: v for k2, v in row.items() if k2 != "image"}})
            models = json.loads(request("GET", f"{base}/models")[1])["models"]
            r["resident_bytes"] = [m for m in models if m["modelName"] == "sd"][0].get("residentBytes")
            status, data, _, _ = request("DELETE", f"{base}/models/sd")
            assert status == 200, data
            for k in range(2):
                row = post(base, body_for(img, mask, args.steps[0]))
                r["rows"].append({"what": f"after swap-out, {'first (reload to serving)' if k == 0 else 'second'}",
                                  **{k2: v for k2, v in row.items() if k2 != "image"}})
                # The reloaded model (its graphs captured again) answers the bytes it did before.
                r.setdefault("reload_same_image", []).append(row["image"] == r[f"image_{args.steps[0]}"])
        finally:
            srv.terminate()
            srv.wait(timeout=60)
            log.close()
        with open(log_path) as f:
            text = f.read()
        r["captures"] = [{"signature": m.group(1)[:80], "bytes": int(m.group(2)), "ms": int(m.group(3))}
                         for m in re.finditer(r"captured a CUDA graph.*?signature=(\S+).*?bytes=(\d+).*?ms=(\d+)", text)]
        r["capture_failures"] = len(re.findall("cannot be captured", text))
        r["warmups_ms"] = [int(m.group(1)) for m in re.finditer(r"warm-up request done.*?ms=(\d+)", text)]
        r["recaptured"] = [line.split("INFO", 1)[-1].strip() for line in text.splitlines()
                           if "of an earlier load" in line]
        results["modes"][mode] = r
        print(mode, "captures", r["captures"], "failures", r["capture_failures"], flush=True)

    lines = [f"GPU: {results['gpu']}; SD2-inpainting networks, random weights, fp16; PNDM; guidance 7.5; "
             f"512x512 PNG photo + box mask; n = {args.n} per step count; one run", "",
             "Baselines (ms; first calls apart):", ""]
    for b in results["baselines"]:
        lines.append(f"- {b['what']}, {b['steps']} steps: first {[round(x) for x in np.atleast_1d(b['first_ms'])]}, "
                     f"then {[round(x) for x in b['ms']]}")
    for mode, r in results["modes"].items():
        lines += ["", f"## Tessera: {mode}", "", "| request | HTTP total ms | server forward ms |", "|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['what']} | {row['total_ms']:.0f} | {row['forward_ms']:.0f} |")
        for steps in args.steps:
            s = r[f"steps_{steps}"]
            lines.append(f"\n{steps} steps: identical requests gave {s['distinct_images']} distinct image(s); "
                         f"masked pixels vs diffusers max {s['vs_diffusers_max']} / mean {s['vs_diffusers_mean']:.2f}")
        lines.append(f"\ngraphs captured: {[(c['signature'].split('|')[0], c['bytes'] >> 20, c['ms']) for c in r['captures']]} "
                     f"(method, MiB, capture ms); capture failures {r['capture_failures']}; warm-up requests ms "
                     f"{r['warmups_ms']}; resident bytes {r.get('resident_bytes')}")
        lines.append(f"\nafter the swap-in: answers equal the first load's bytes: {r.get('reload_same_image')}; "
                     f"graphs of the earlier load: {r.get('recaptured')}")
    modes = list(results["modes"])
    for steps in args.steps:
        same = [m for m in modes if results["modes"][m][f"image_{steps}"] == results["modes"][modes[-1]][f"image_{steps}"]]
        lines.append(f"\n{steps} steps: modes whose image equals '{modes[-1]}' bit for bit: {same}")
    for r in results["modes"].values():
        for steps in args.steps:
            r.pop(f"image_{steps}")
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
