#!/usr/bin/env python3
"""Which LaMa op pays for a photo size the machine has not run before (issue 12, item 1): a
diagnostic that prints numbers, run on the GPU machine.

`bench/forward_gap_gpu.py` showed that the first process on a fresh machine pays 120-400 ms at
every new photo size while later processes, server or Python, pay 40-85 ms at the same sizes, and
that with `CUDA_CACHE_DISABLE=1` every process pays it again: kernels compiled from PTX by the
driver at first use, kept in its compute cache (~/.nv/ComputeCache). This probe, in processes
with the cache disabled (each one as cold as a fresh machine), times the first call at each size
of the eager big-lama generator (random weights, fp32), the profiler's top operators by CPU time in
it, and the two kinds of op alone at the sizes they see there: the FFTs of the spectral blocks
(rfftn / irfftn at 1/8 of the photo) and a 3x3 convolution.

    CUDA_CACHE_DISABLE=1 python bench/jit_cache_probe_gpu.py > $OUT/probe.txt
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "models/lama"))
from common import cuda_timed_ms  # noqa: E402
import lama  # noqa: E402
import export  # noqa: E402

# Padded photo sizes (multiples of 8) in order; the spectral blocks run at an eighth of each side.
SIZES = [(1000, 752), (1008, 752), (800, 600), (1280, 960), (768, 1024), (1024, 768), (1536, 1024), (1000, 752)]


def main():
    print(f"CUDA_CACHE_DISABLE={os.environ.get('CUDA_CACHE_DISABLE')}, {torch.cuda.get_device_name(0)}")
    g = lama.FFCResNetGenerator()
    export.randomize(g, 0)
    g = g.eval().cuda()
    with torch.no_grad():
        print("\n## Bare ops, first call then second at each size (ms)")
        for w, h in SIZES:
            x = torch.randn(1, 256, h // 8, w // 8, device="cuda")
            spec = lambda: torch.fft.irfftn(torch.fft.rfftn(x, dim=(-2, -1), norm="ortho"), s=[h // 8, w // 8],
                                            dim=(-2, -1), norm="ortho")
            conv = torch.nn.Conv2d(256, 256, 3, padding=1).cuda()
            c = lambda: conv(x)
            print(f"{w}x{h}: fft {cuda_timed_ms(spec):.1f} / {cuda_timed_ms(spec):.1f}   conv3x3 {cuda_timed_ms(c):.1f} / {cuda_timed_ms(c):.1f}")
        print("\n## Generator, first call then second at each size (ms); profiler top ops for first calls")
        for i, (w, h) in enumerate(SIZES):
            x = torch.rand(1, 4, h, w, device="cuda")
            if i in (1, 3):
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    first = cuda_timed_ms(lambda: g(x))
                print(f"{w}x{h}: first {first:.1f} (profiled), second {cuda_timed_ms(lambda: g(x)):.1f}")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
            else:
                print(f"{w}x{h}: first {cuda_timed_ms(lambda: g(x)):.1f}, second {cuda_timed_ms(lambda: g(x)):.1f}")


if __name__ == "__main__":
    main()
