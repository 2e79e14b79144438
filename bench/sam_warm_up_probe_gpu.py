#!/usr/bin/env python3
"""What SAM's warm-up requests pay at every load (issue 14, item 3), on the GPU machine: the
vit_h image encoder as exported (fp32, random weights, 1024x1024 padded photo), loaded twice in
one process (the second load is a reload: same file, same process), each load's first four
calls timed, then the steady state, under each TorchScript executor setting, one fresh process
per setting:

- `profiling`: the profiling executor with the TensorExpr fuser (the server's default, and
  what models/sam/model-config.yaml names for the encoder);
- `profiling, no fuser`: the same executor, TensorExpr fusion off;
- `simple`: graph executor optimisations off (the server's `executor: simple`);
- `legacy`: the legacy executor.

    python bench/sam_warm_up_probe_gpu.py --out $OUT/sam_warm_up
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SETTINGS = ["profiling", "profiling, no fuser", "simple", "legacy"]


def child(path, setting, out_dir):
    import torch
    if setting == "profiling, no fuser":
        torch._C._jit_set_texpr_fuser_enabled(False)
    elif setting == "simple":
        torch._C._set_graph_executor_optimize(False)
    elif setting == "legacy":
        torch._C._jit_set_profiling_executor(False)
    image = torch.randint(0, 255, (1024, 1024, 3), dtype=torch.uint8, device="cuda")
    torch.save(image.cpu(), os.path.join(out_dir, "image.pt"))
    hw = torch.tensor([683, 1024], dtype=torch.int64)
    out = {"setting": setting, "loads": []}
    with torch.no_grad():
        for _ in range(2):
            t = time.perf_counter()
            m = torch.jit.load(path, map_location="cuda")
            torch.cuda.synchronize()
            load_ms = (time.perf_counter() - t) * 1e3
            calls = []
            for _ in range(4):
                torch.cuda.synchronize()
                t = time.perf_counter()
                m(image, hw)
                torch.cuda.synchronize()
                calls.append((time.perf_counter() - t) * 1e3)
            steady = []
            for _ in range(5):
                torch.cuda.synchronize()
                t = time.perf_counter()
                emb = m(image, hw)
                torch.cuda.synchronize()
                steady.append((time.perf_counter() - t) * 1e3)
            torch.save(emb.cpu(), os.path.join(out_dir, f"emb-{setting.replace(' ', '_').replace(',', '')}.pt"))
            out["loads"].append({"load_ms": load_ms, "first_calls_ms": calls,
                                 "steady_median_ms": statistics.median(steady)})
            del m
            torch.cuda.empty_cache()
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        try:
            child(*args.child, args.scratch)
        except Exception as e:  # a setting the file does not run under: said, not fatal
            print(json.dumps({"setting": args.child[1], "error": str(e).splitlines()[-1][:300], "loads": []}))
        return
    import torch
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    with open(os.path.join(args.out, "export.log"), "w") as quiet:
        subprocess.check_call([sys.executable, os.path.join(ROOT, "models/sam/export.py"), "--variant", "vit_h",
                               "--random", "--out-dir", work, "--device", "cuda"], stdout=quiet, stderr=quiet)
    path = os.path.join(work, "encoder.pt")
    results = {"gpu": torch.cuda.get_device_name(0), "runs": []}
    for setting in SETTINGS:
        line = subprocess.check_output([sys.executable, __file__, "--out", args.out, "--child", path, setting,
                                        "--scratch", work], text=True).strip().splitlines()[-1]
        results["runs"].append(json.loads(line))
        print(line, flush=True)
    # Each setting's embeddings against eager PyTorch's (the same weights: export's seeded
    # random build, the ViT not traced; the same photo).
    sys.path.insert(0, os.path.join(ROOT, "models/sam"))
    import export as sam_export  # noqa: E402
    sam = sam_export.build("vit_h", None, False, 0).cuda().eval()
    eager = sam_export.Encoder(sam.image_encoder, sam.pixel_mean.reshape(3), sam.pixel_std.reshape(3),
                               torch.float32, torch.float32).cuda().eval()
    with torch.no_grad():
        ref = eager(torch.load(os.path.join(work, "image.pt")).cuda(), torch.tensor([683, 1024])).cpu()
    for r in results["runs"]:
        f = os.path.join(work, f"emb-{r['setting'].replace(' ', '_').replace(',', '')}.pt")
        if os.path.exists(f):
            r["max_abs_diff_vs_eager"] = (torch.load(f) - ref).abs().max().item()
    lines = [f"GPU: {results['gpu']}; SAM vit_h encoder fp32, random weights, one 1024x1024 photo; "
             "each setting in a fresh process, the file loaded twice; one run", "",
             "| setting | load | load ms | calls 1-4 ms | steady median ms |", "|---|---|---|---|---|"]
    diffs = {r["setting"]: r.get("max_abs_diff_vs_eager") for r in results["runs"]}
    for r in results["runs"]:
        if r.get("error"):
            lines.append(f"| {r['setting']} | - | - | fails: {r['error']} | - |")
        for i, l in enumerate(r["loads"]):
            calls = ", ".join(f"{c:.0f}" for c in l["first_calls_ms"])
            lines.append(f"| {r['setting']} | {i + 1} | {l['load_ms']:.0f} | {calls} | {l['steady_median_ms']:.1f} |")
    lines += ["", f"Embeddings, max |difference| from eager PyTorch's: {diffs} "
              f"(embedding magnitude: max |x| = {ref.abs().max().item():.3g})"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
