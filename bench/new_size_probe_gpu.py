#!/usr/bin/env python3
"""Where does a first-seen photo size cost its extra time? (issue 12, item 1) Full-size big-lama
(random weights, fp32) on the GPU, TorchScript run as exported (graph-executor optimisation off,
what the server's `simple` executor does) and eager PyTorch, each variant in a fresh process:

  - base: libtorch defaults (cuDNN on, benchmark off, caching allocator);
  - expandable: PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (new sizes need no new
    cudaMalloc blocks);
  - nocudnn: cuDNN off (ATen's own convolutions: no per-shape cuDNN plan);
  - eager: the eager module, libtorch defaults;
  - a tag ending in `_v7` (`expandable_v7`, `eager_v7`): as its stem, with expandable segments
    and TORCH_CUDNN_V8_API_DISABLED=1 (cuDNN's v7 API: an algorithm picked by a cheap heuristic
    call instead of an execution plan built per new convolution shape). `eager` variants other
    than `eager` itself also use expandable segments.

For every variant: the sweep's sizes in order (first-seen marked; forward only, inputs already
on the GPU, synchronised), then one more new size under torch.profiler, first call and a repeat,
with the ops whose CPU time grows most on the first call.

    python bench/new_size_probe_gpu.py --out $OUT
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import cuda_timed_ms  # noqa: E402
from sweep_gpu import SIZES, export, lama, padded  # noqa: E402 (the sweep's sizes, LaMa's code)

PROFILED = (904, 600)


def inputs(w, h):
    w, h = padded(w, h)
    g = torch.Generator().manual_seed(w * 7 + h)
    img = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).cuda()
    mask = (torch.rand(h, w, generator=g) > 0.7).to(torch.uint8).mul(255).cuda()
    return img, mask


def variant(tag, pt):
    if tag == "nocudnn":
        torch.backends.cudnn.enabled = False
    if tag.startswith("eager"):
        g = lama.FFCResNetGenerator()
        export.randomize(g, 0)
        m = lama.LamaInpaint(g.eval().cuda(), torch.float32)
    else:
        torch._C._set_graph_executor_optimize(False)
        m = torch.jit.load(pt, map_location="cuda")
    rows, seen = [], set()
    with torch.inference_mode():
        for s in SIZES:
            img, mask = inputs(*s)
            rows.append({"size": s, "first_seen": s not in seen, "ms": cuda_timed_ms(lambda: m(img, mask))})
            seen.add(s)
        img, mask = inputs(*PROFILED)
        prof = {}
        for call in ["first", "repeat"]:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as p:
                ms = cuda_timed_ms(lambda: m(img, mask))
            ops = {}
            for e in p.key_averages():
                ops[e.key] = {"cpu_self_us": e.self_cpu_time_total, "count": e.count,
                              "device_self_us": getattr(e, "self_device_time_total", 0)}
            prof[call] = {"ms": ms, "ops": ops}
    growth = []
    for k, v in prof["first"]["ops"].items():
        r = prof["repeat"]["ops"].get(k, {"cpu_self_us": 0, "device_self_us": 0})
        growth.append((v["cpu_self_us"] - r["cpu_self_us"], k, v["cpu_self_us"], r["cpu_self_us"],
                       v["device_self_us"], r["device_self_us"], v["count"]))
    growth.sort(reverse=True)
    print(json.dumps({"rows": rows, "profiled": {"size": PROFILED, "first_ms": prof["first"]["ms"],
                                                 "repeat_ms": prof["repeat"]["ms"], "top_growth": growth[:15]}}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant")
    ap.add_argument("--model")
    ap.add_argument("--variants", default="base,expandable,nocudnn,eager")
    args = ap.parse_args()
    if args.variant:
        return variant(args.variant, args.model)
    os.makedirs(args.out, exist_ok=True)
    pt = os.path.join(tempfile.mkdtemp(), "model.pt")
    subprocess.check_call([sys.executable, os.path.join(ROOT, "models/lama/export.py"), "--random", "--out", pt,
                           "--device", "cuda"])
    results = {"gpu": torch.cuda.get_device_name(0), "variants": {}}
    for tag in args.variants.split(","):
        env = dict(os.environ)
        if tag not in ("base", "nocudnn", "eager"):
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        if tag.endswith("_v7"):
            env["TORCH_CUDNN_V8_API_DISABLED"] = "1"
        out = subprocess.check_output([sys.executable, __file__, "--out", args.out, "--variant", tag, "--model", pt],
                                      env=env)
        results["variants"][tag] = json.loads(out.decode().strip().splitlines()[-1])
        print(tag, "done", flush=True)
    lines = [f"GPU: {results['gpu']}; big-lama fp32, random weights; forward only (inputs on the GPU), ms", "",
             "| # | size | first seen | " + " | ".join(results["variants"]) + " |",
             "|---|---|---|" + "---|" * len(results["variants"])]
    for i, s in enumerate(SIZES):
        first = next(iter(results["variants"].values()))["rows"][i]["first_seen"]
        lines.append(f"| {i + 1} | {s[0]}x{s[1]} | {'yes' if first else ''} | " + " | ".join(
            f"{v['rows'][i]['ms']:.1f}" for v in results["variants"].values()) + " |")
    for tag, v in results["variants"].items():
        p = v["profiled"]
        lines += ["", f"## {tag}: {p['size'][0]}x{p['size'][1]} under the profiler, first {p['first_ms']:.1f} ms, "
                      f"repeat {p['repeat_ms']:.1f} ms", "",
                  "| op | CPU self first / repeat us | device self first / repeat us | calls |", "|---|---|---|---|"]
        for _, k, c1, c2, d1, d2, n in p["top_growth"]:
            lines.append(f"| {k} | {c1:.0f} / {c2:.0f} | {d1:.0f} / {d2:.0f} | {n} |")
    with open(os.path.join(args.out, "new_size_probe.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "new_size_probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
