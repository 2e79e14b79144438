#!/usr/bin/env python3
"""Shared weights, churn and density (issue 14), on the GPU machine, full-size random weights.

SD2 variants: one SD2-inpainting fp16 export (`models/sd/export.py --random`), then variants of
it whose UNet parameters are all drawn again (uniform within each tensor's original range, a
seed per variant) while the text encoder and VAE stay byte-identical: "fine-tunes" that share
their text encoder and VAE. Each variant is its own archive (same config, handler and assets).

--mode churn: the variants + SAM vit_h + LaMa on one server whose device budget holds about
three of them; `--requests` requests in one closed loop, models drawn with Zipf(1.1) popularity
(a fixed seed: every setting sees the same sequence). Per request: model, tier it came from
(`x-model-tier`), swap-in/load time (`x-model-load-time`), HTTP total. Per setting: p50/p99,
the fraction of wall time spent loading or swapping in, loads and swaps per tier. Settings:
host tier on/off, weight sharing on/off (`--settings`). Answers of each model are compared
across settings (sharing must not change them).

--mode density: the variants requested one after another (each loads, warms up, answers once)
under a device budget of `--budget-mib`; then `GET /models`: how many stay resident, each one's
resident and shared bytes, the residency's used bytes and nvidia-smi's reading; with sharing
on and off (and CUDA graphs off). The machine's 64 GB disk holds ~10 variants (archive + its
unpacked copy, 2.6 GB each), so the budget is scaled down; the per-variant bytes measured give
the count for a whole H100.

    python bench/churn_gpu.py --bin ./tessera --handlers <dir with sd/sam/lama.wasm> --out $OUT --mode churn
"""
import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import pct, request, smi_used_mib, start_server, write_results  # noqa: E402
from residency_gpu import bodies  # noqa: E402

HDR = {"content-type": "application/json"}


def pack_sd(binary, handlers, sd_dir, out):
    """Packs sd_dir/sd.pt (the name the config gives) with SD2's handler and assets."""
    subprocess.check_call([binary, "pack", "--config", os.path.join(ROOT, "models/sd/model-config.yaml"),
                           "--model", os.path.join(sd_dir, "sd.pt"), "--handler", os.path.join(handlers, "sd.wasm"),
                           "--asset", os.path.join(sd_dir, "tokenizer"),
                           "--asset", os.path.join(sd_dir, "warmup.json"),
                           "--asset", os.path.join(sd_dir, "warmup-unguided.json"),
                           "--output", out, "--skip-model-check"], stdout=subprocess.DEVNULL)


def pack_variants(args, sd_dir, store, log):
    """Packs sd_dir/sd.pt as sd0, then variant k (1..n-1) as sd{k}: its UNet parameters drawn
    again, uniform within each tensor's original range (a seed per variant), written over sd.pt
    (one file on disk at a time)."""
    t = time.perf_counter()
    pack_sd(args.bin, args.handlers, sd_dir, os.path.join(store, "sd0.tar.gz"))
    path = os.path.join(sd_dir, "sd.pt")
    m = torch.jit.load(path, map_location="cuda")
    unet = [(name, p) for name, p in m.named_parameters() if name.startswith("unet.")]
    ranges = {name: float(p.detach().float().abs().max()) or 1e-3 for name, p in unet}
    for k in range(1, args.variants):
        g = torch.Generator(device="cuda").manual_seed(1000 + k)
        with torch.no_grad():
            for name, p in unet:
                r = ranges[name]
                p.copy_((torch.rand(p.shape, generator=g, device="cuda", dtype=torch.float32) * 2 - 1) * r)
        m.save(path)
        pack_sd(args.bin, args.handlers, sd_dir, os.path.join(store, f"sd{k}.tar.gz"))
    unet_bytes = sum(p.numel() * p.element_size() for _, p in unet)
    all_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    print(f"variants: {args.variants} packed in {time.perf_counter() - t:.0f} s; UNet {unet_bytes / 1e9:.2f} GB "
          f"of {all_bytes / 1e9:.2f} GB parameters", file=log, flush=True)
    del m, unet
    torch.cuda.empty_cache()
    os.remove(path)
    return [f"sd{k}" for k in range(args.variants)], unet_bytes, all_bytes


def prepare(args, work, with_sam_lama):
    py = sys.executable
    log = open(os.path.join(args.out, "export.log"), "w")
    store = os.path.join(work, "store")
    os.makedirs(store)
    t = time.perf_counter()
    sd = os.path.join(work, "sd")
    subprocess.check_call([py, os.path.join(ROOT, "models/sd/export.py"), "--random", "--device", "cuda", "--fp16",
                           "--out-dir", sd], stdout=log, stderr=log)
    names, unet_bytes, all_bytes = pack_variants(args, sd, store, log)
    if with_sam_lama:
        sam = os.path.join(work, "sam")
        subprocess.check_call([py, os.path.join(ROOT, "models/sam/export.py"), "--variant", "vit_h", "--random",
                               "--out-dir", sam, "--device", "cuda"], stdout=log, stderr=log)
        subprocess.check_call([args.bin, "pack", "--config", os.path.join(ROOT, "models/sam/model-config.yaml"),
                               "--model", os.path.join(sam, "encoder.pt"), "--model", os.path.join(sam, "decoder.pt"),
                               "--asset", os.path.join(sam, "warmup.json"),
                               "--handler", os.path.join(args.handlers, "sam.wasm"),
                               "--output", os.path.join(store, "sam.tar.gz"), "--skip-model-check"],
                              stdout=subprocess.DEVNULL)
        shutil.rmtree(sam)
        os.makedirs(os.path.join(work, "lama"))
        lama = os.path.join(work, "lama", "model.pt")
        subprocess.check_call([py, os.path.join(ROOT, "models/lama/export.py"), "--random", "--out", lama],
                              stdout=log, stderr=log)
        subprocess.check_call([args.bin, "pack", "--config", os.path.join(ROOT, "models/lama/model-config.yaml"),
                               "--model", lama, "--handler", os.path.join(args.handlers, "lama.wasm"),
                               "--output", os.path.join(store, "lama.tar.gz"), "--skip-model-check"],
                              stdout=subprocess.DEVNULL)
        names += ["sam", "lama"]
    prep_s = time.perf_counter() - t
    print(f"prepared {len(names)} archives in {prep_s:.0f} s", flush=True)
    return store, names, {"prepare_s": prep_s, "unet_bytes": unet_bytes, "sd_param_bytes": all_bytes}


def metric(text, name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + " ")
               or l.startswith(name + "{"))


def zipf_sequence(names, n, s=1.1, seed=7):
    rng = random.Random(seed)
    order = names[:]
    rng.shuffle(order)
    weights = [1 / (k + 1) ** s for k in range(len(order))]
    return [rng.choices(order, weights)[0] for _ in range(n)], order


def churn(args, work, store, names, results, save):
    body = bodies()
    seq, ranking = zipf_sequence(names, args.requests)
    results["popularity_order"] = ranking
    answers = {}
    for setting in args.settings.split(","):
        host_mib = 0 if "host-off" in setting else 40000
        share = "off" if "share-off" in setting else "on"
        log_path = os.path.join(args.out, f"server-{setting}.log")
        srv, base, log = start_server(args.bin, store, work + f"-{setting}", log_path, "--device", "cuda",
                                      "--memory-budget-mib", str(args.budget_mib), "--model-warm-ups", "off",
                                      "--host-memory-budget-mib", str(host_mib), "--share-weights", share)
        rows = []
        started = time.perf_counter()
        try:
            for i, m in enumerate(seq):
                kind = "sd" if m.startswith("sd") else m
                status, data, hd, t = request("POST", f"{base}/predictions/{m}", body[kind], HDR)
                assert status == 200, (m, status, data[:300])
                rows.append({"i": i, "model": m, "tier": hd.get("x-model-tier"),
                             "load_ms": float(hd["x-model-load-time"]) if "x-model-load-time" in hd else 0.0,
                             "total_ms": t * 1e3})
                answers.setdefault(m, {})[setting] = answers.get(m, {}).get(setting, data)
                if answers[m][setting] != data:
                    rows[-1]["changed"] = True
                if time.perf_counter() - started > args.deadline_s:
                    print(f"{setting}: stopped after {i + 1} requests (deadline)", flush=True)
                    break
            wall = time.perf_counter() - started
            metrics = request("GET", f"{base}/metrics")[1].decode()
            listed = json.loads(request("GET", f"{base}/models")[1])["models"]
        finally:
            srv.terminate()
            srv.wait(timeout=60)
            log.close()
            shutil.rmtree(work + f"-{setting}", ignore_errors=True)
        totals = [r["total_ms"] for r in rows]
        loading = sum(r["load_ms"] for r in rows)
        tiers = {}
        for r in rows:
            tiers[r["tier"]] = tiers.get(r["tier"], 0) + 1
        results["churn"][setting] = {
            "rows": rows, "wall_s": wall, "p50_ms": pct(totals, 50), "p99_ms": pct(totals, 99),
            "max_ms": max(totals), "loading_fraction": loading / 1e3 / wall, "tiers": tiers,
            "swap_bytes": [l for l in metrics.splitlines() if l.startswith("tessera_swap_bytes_total")],
            "resident_end": {x["modelName"]: {k: x.get(k) for k in ("tier", "residentBytes", "sharedBytes")}
                             for x in listed if x.get("tier")},
        }
        print(setting, {k: v for k, v in results["churn"][setting].items() if k not in ("rows",)}, flush=True)
        results["answers_equal_across_settings"] = {
            m: len(set(v.values())) == 1 for m, v in answers.items()}
        save()  # after each setting: a run cut short keeps what it measured


def density(args, work, store, names, results):
    body = bodies()["sd"]
    first = {}
    for setting in args.settings.split(","):
        share = "off" if "share-off" in setting else "on"
        graphs = "off" if "graphs-off" in setting else "on"
        log_path = os.path.join(args.out, f"server-{setting}.log")
        srv, base, log = start_server(args.bin, store, work + f"-{setting}", log_path, "--device", "cuda",
                                      "--memory-budget-mib", str(args.budget_mib), "--model-warm-ups", "off",
                                      "--host-memory-budget-mib", "0", "--share-weights", share,
                                      "--cuda-graphs", graphs)
        rows = []
        try:
            for m in names:
                status, data, hd, t = request("POST", f"{base}/predictions/{m}", body, HDR)
                assert status == 200, (m, status, data[:300])
                first.setdefault(m, {})[setting] = data
                metrics = request("GET", f"{base}/metrics")[1].decode()
                listed = json.loads(request("GET", f"{base}/models")[1])["models"]
                resident = [x for x in listed if x.get("tier") == "gpu"]
                rows.append({"model": m, "load_ms": float(hd.get("x-model-load-time", 0)), "total_ms": t * 1e3,
                             "resident": len(resident),
                             "used_bytes": metric(metrics, "tessera_residency_used_bytes"),
                             "smi_mib": smi_used_mib(),
                             "this": next(({k: x.get(k) for k in ("residentBytes", "sharedBytes")}
                                           for x in listed if x["modelName"] == m), None)})
                print(setting, rows[-1], flush=True)
        finally:
            srv.terminate()
            srv.wait(timeout=60)
            log.close()
            shutil.rmtree(work + f"-{setting}", ignore_errors=True)
        results["density"][setting] = {"rows": rows, "resident_end": rows[-1]["resident"],
                                       "evictions": len(re.findall("evicting to make room", open(log_path).read()))}
    results["answers_equal_across_settings"] = {m: len(set(v.values())) == 1 for m, v in first.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--handlers", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["churn", "density"], required=True)
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--budget-mib", type=int, default=8000)
    ap.add_argument("--settings", default="host-on,host-off")
    ap.add_argument("--deadline-s", type=float, default=170)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(dir=os.environ.get("BENCH_WORK"))
    results = {"gpu": torch.cuda.get_device_name(0), "mode": args.mode, "budget_mib": args.budget_mib,
               "variants": args.variants, "churn": {}, "density": {}}
    store, names, prep = prepare(args, work, args.mode == "churn")
    results.update(prep)

    def save():
        render(args, results, prep)

    if args.mode == "churn":
        churn(args, work, store, names, results, save)
    else:
        density(args, work, store, names, results)
    save()


def render(args, results, prep):
    lines = [f"GPU: {results['gpu']}; mode {args.mode}; device budget {args.budget_mib} MiB; "
             f"{args.variants} SD2 variants (UNet {prep['unet_bytes'] / 1e9:.2f} GB of "
             f"{prep['sd_param_bytes'] / 1e9:.2f} GB parameters each, text encoder + VAE shared); one run", ""]
    if args.mode == "churn":
        lines += ["| setting | requests | p50 ms | p99 ms | max ms | wall s | loading share of wall | tiers |",
                  "|---|---|---|---|---|---|---|---|"]
        for s, r in results["churn"].items():
            lines.append(f"| {s} | {len(r['rows'])} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} | "
                         f"{r['wall_s']:.0f} | {r['loading_fraction']:.2f} | {r['tiers']} |")
        lines += ["", f"popularity order: {results['popularity_order']}", ""]
        for s, r in results["churn"].items():
            lines += [f"### {s}: every request", "", "| # | model | tier | load/swap ms | total ms |", "|---|---|---|---|---|"]
            lines += [f"| {x['i']} | {x['model']} | {x['tier']} | {x['load_ms']:.0f} | {x['total_ms']:.0f} |"
                      for x in r["rows"]]
            lines += ["", f"swap bytes: {r['swap_bytes']}", f"resident at the end: {r['resident_end']}", ""]
    else:
        lines += ["| setting | resident at the end | evictions |", "|---|---|---|"]
        for s, r in results["density"].items():
            lines.append(f"| {s} | {r['resident_end']} of {args.variants} | {r['evictions']} |")
        lines.append("")
        for s, r in results["density"].items():
            lines += [f"### {s}", "", "| model | load ms | total ms | resident | residency used GB | nvidia-smi MiB | "
                      "this model resident / shared bytes |", "|---|---|---|---|---|---|---|"]
            lines += [f"| {x['model']} | {x['load_ms']:.0f} | {x['total_ms']:.0f} | {x['resident']} | "
                      f"{x['used_bytes'] / 1e9:.2f} | {x['smi_mib']} | {x['this']} |" for x in r["rows"]]
            lines.append("")
    lines.append(f"answers equal across settings: {results['answers_equal_across_settings']}")
    write_results(args.out, results, lines)



if __name__ == "__main__":
    main()
