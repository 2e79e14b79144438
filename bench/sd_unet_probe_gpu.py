#!/usr/bin/env python3
"""Where SD2-inpaint's time goes per request, and what a UNet step can cost (issue 12: 50 steps
<= 0.6 s end to end). Full-size random weights, fp16, on the GPU, one process. Each part is
traced as models/sd/export.py traces it, run with the graph executor's optimisation off (the
server's `simple` executor) and replayed from a CUDA graph, as the server runs SD2's loop:

  - the UNet step under classifier-free guidance (batch 2, 9 x 64 x 64 latents, 77 tokens):
    as exported (NCHW), with weights and input in channels-last memory format, and
    channels-last with fused QKV projections; eager PyTorch alongside;
  - the text encoder (2 x 77 tokens), the VAE encoder (512² photo) and decoder (64² latents);
  - the VAE parts and the UNet step again with cuDNN's benchmark mode on;
  - with `--sdpa`, only this: the UNet step as exported now (channels-last, fused QKV) and the
    VAE decoder with each of libtorch's attention kernels forced in turn (flash, memory-
    efficient, cuDNN; libtorch's own pick first), the graphs capturing the kernel chosen.

For each: median and min of 30 replays after 5 (ms, synchronised), and the largest difference
from the exported layout's output.

    python bench/sd_unet_probe_gpu.py --out $OUT [--sdpa]
Needs diffusers and transformers importable.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "models/sd"))
import export as sd_export  # noqa: E402


def graphed(fn, inputs):
    """fn captured in a CUDA graph over static copies of `inputs`; returns (replay, output)."""
    static = [x.clone() for x in inputs]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*static)
    return g.replay, out


def times(run, n=30):
    for _ in range(5):
        run()
    ms = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run()
        torch.cuda.synchronize()
        ms.append((time.perf_counter() - t) * 1e3)
    ms.sort()
    return {"median": ms[len(ms) // 2], "min": ms[0]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--sdpa", action="store_true", help="only the attention-kernel comparison")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch._C._set_graph_executor_optimize(False)
    dt = torch.float16
    parts = sd_export.random_parts(False, 0, "PNDMScheduler", device="cuda")
    unet = parts.unet.to(dt).eval()
    res = {"gpu": torch.cuda.get_device_name(0),
           "attention": sorted({type(p).__name__ for p in unet.attn_processors.values()}), "rows": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(2, 9, 64, 64, device="cuda", dtype=dt, generator=g)
    t = torch.tensor([981.0], device="cuda")
    ctx = torch.randn(2, 77, 1024, device="cuda", dtype=dt, generator=g)

    def row(name, fn, inputs, ref=None):
        with torch.no_grad():
            replay, out = graphed(fn, inputs)
            r = {"part": name, **times(replay)}
            if ref is not None:
                r["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
        res["rows"].append(r)
        print(r, flush=True)
        return out

    if args.sdpa:
        sdpa_rows(row, unet, parts, x, t, ctx, g)
        return write(args.out, res)
    with torch.no_grad():
        eager = sd_export.UNet(unet)
        res["rows"].append({"part": "unet step, eager, no graph", **times(lambda: eager(x, t, ctx), 10)})
        print(res["rows"][-1], flush=True)
        traced = torch.jit.trace(sd_export.UNet(unet), (x, t, ctx), check_trace=False)
        ref = row("unet step, as exported (NCHW)", traced, (x, t, ctx)).clone()
        ucl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)
        tcl = torch.jit.trace(sd_export.UNet(ucl), (xcl, t, ctx), check_trace=False)
        row("unet step, channels-last", tcl, (xcl, t, ctx), ref)
        del tcl
        try:
            ucl.fuse_qkv_projections()
            tq = torch.jit.trace(sd_export.UNet(ucl), (xcl, t, ctx), check_trace=False)
            row("unet step, channels-last + fused QKV", tq, (xcl, t, ctx), ref)
            del tq
        except Exception as e:  # noqa: BLE001 (a probe: report and go on)
            res["rows"].append({"part": "fused QKV", "error": str(e)[:300]})
        del ucl, traced
        torch.cuda.empty_cache()
        text = parts.text_encoder.to(dt).eval()
        ids = torch.randint(0, 49408, (2, 77), device="cuda")
        row("text encoder (2 x 77)", torch.jit.trace(sd_export.TextEncoder(text), (ids,), check_trace=False), (ids,))
        vae = parts.vae.to(dt).eval()
        pix = torch.randn(1, 3, 512, 512, device="cuda", dtype=dt, generator=g)
        enc = torch.jit.trace(sd_export.VaeEncode(vae), (pix,), check_trace=False)
        row("VAE encode (512²)", lambda p: enc(p)[0], (pix,))
        z = torch.randn(1, 4, 64, 64, device="cuda", dtype=dt, generator=g)
        dec = torch.jit.trace(sd_export.VaeDecode(vae), (z,), check_trace=False)
        dref = row("VAE decode (64²)", dec, (z,)).clone()
        vcl = copy.deepcopy(vae).to(memory_format=torch.channels_last)
        dcl = torch.jit.trace(sd_export.VaeDecode(vcl), (z.contiguous(memory_format=torch.channels_last),),
                              check_trace=False)
        row("VAE decode, channels-last", dcl, (z.contiguous(memory_format=torch.channels_last),), dref)
        del dcl, vcl
        # cuDNN's benchmark mode: every convolution shape's algorithms timed on its first call
        # (a global libtorch setting), then kept; the graphs capture what it chose.
        torch.backends.cudnn.benchmark = True
        row("VAE encode (512²), cuDNN benchmark", lambda p: enc(p)[0], (pix,))
        row("VAE decode (64²), cuDNN benchmark", dec, (z,), dref)
        del enc, dec, vae, text
        torch.cuda.empty_cache()
        ucl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        ucl.fuse_qkv_projections()
        tq = torch.jit.trace(sd_export.UNet(ucl), (xcl, t, ctx), check_trace=False)
        row("unet step, channels-last + fused QKV, cuDNN benchmark", tq, (xcl, t, ctx), ref)
    write(args.out, res)


def sdpa_rows(row, unet, parts, x, t, ctx, g):
    """The UNet step as exported and the VAE decoder under each attention kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kernels = [("libtorch's pick", None), ("flash", SDPBackend.FLASH_ATTENTION),
               ("memory-efficient", SDPBackend.EFFICIENT_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)]
    dt = torch.float16
    with torch.no_grad():
        ucl = copy.deepcopy(unet).to(memory_format=torch.channels_last)
        ucl.fuse_qkv_projections()
        xcl = x.contiguous(memory_format=torch.channels_last)
        step = torch.jit.trace(sd_export.UNet(ucl), (xcl, t, ctx), check_trace=False)
        vae = parts.vae.to(dt).eval()
        z = torch.randn(1, 4, 64, 64, device="cuda", dtype=dt, generator=g)
        dec = torch.jit.trace(sd_export.VaeDecode(vae), (z,), check_trace=False)
        refs = {}
        for name, kernel in kernels:
            for part, fn, inputs in [("unet step (channels-last, fused QKV)", step, (xcl, t, ctx)),
                                     ("VAE decode (64²)", dec, (z,))]:
                try:
                    if kernel is None:
                        out = row(f"{part}, attention: {name}", fn, inputs, refs.get(part))
                    else:
                        with sdpa_kernel([kernel]):
                            out = row(f"{part}, attention: {name}", fn, inputs, refs.get(part))
                    refs.setdefault(part, out.clone())
                except Exception as e:  # noqa: BLE001 (a probe: report and go on)
                    print({"part": f"{part}, attention: {name}", "error": str(e)[:300]}, flush=True)
                    RES_ERRORS.append({"part": f"{part}, attention: {name}", "error": str(e)[:300]})


RES_ERRORS = []


def write(out_dir, res):
    res["rows"].extend(RES_ERRORS)
    lines = [f"GPU: {res['gpu']}; SD2-inpaint parts, fp16, random weights; attention processors: "
             f"{', '.join(res['attention'])}; CUDA-graph replays unless said, ms", "",
             "| part | median | min | max abs diff vs as exported |", "|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['part']} | failed: {r['error']} | | |")
        else:
            lines.append(f"| {r['part']} | {r['median']:.2f} | {r['min']:.2f} | {r.get('max_abs_diff', '')} |")
    with open(os.path.join(out_dir, "sd_unet_probe.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out_dir, "sd_unet_probe.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
