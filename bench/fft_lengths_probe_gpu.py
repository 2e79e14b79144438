#!/usr/bin/env python3
"""What the kernels cuFFT has the driver compile at first use are keyed by (issue 12, item 1): a
diagnostic that prints first-call times of float32 FFTs on the GPU — new lengths, batches,
first/last dimensions, 1D before 2D, square sizes, a prime. Run it three times in one call on a
fresh machine: `CUDA_CACHE_DISABLE=1 python bench/fft_lengths_probe_gpu.py`, then twice without
(the driver's cache fills, then hits). Recorded in results/jit_cache_probe_gpu_h100.md.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cuda_timed_ms  # noqa: E402


def r2c(h, w, c=64):
    a = torch.randn(1, c, h, w, device="cuda")
    return cuda_timed_ms(lambda: torch.fft.rfftn(a, dim=(-2, -1), norm="ortho"))


def c2r(h, w, c=64):
    a = torch.randn(1, c, h, w // 2 + 1, dtype=torch.complex64, device="cuda")
    return cuda_timed_ms(lambda: torch.fft.irfftn(a, s=[h, w], dim=(-2, -1), norm="ortho"))


def r2c_1d(n, batch=64):
    a = torch.randn(batch, n, device="cuda")
    return cuda_timed_ms(lambda: torch.fft.rfft(a))


def c2c_1d(n, batch=64):
    a = torch.randn(batch, n, dtype=torch.complex64, device="cuda")
    return cuda_timed_ms(lambda: torch.fft.fft(a))


def main():
    x = torch.randn(64, 64, device="cuda")
    print("init", cuda_timed_ms(lambda: torch.fft.rfftn(x, dim=(-2, -1))))
    print("2D r2c (94,125) first", r2c(94, 125), "again", r2c(94, 125))
    print("2D r2c (94,125) other batch c=256", r2c(94, 125, 256))
    print("2D r2c (94,126) same h", r2c(94, 126))
    print("2D r2c (95,126) same w", r2c(95, 126))
    print("2D c2r (94,125) after r2c", c2r(94, 125))
    print("1D r2c 200", r2c_1d(200), "1D c2c 150", c2c_1d(150))
    print("2D r2c (150,200) after 1D r2c 200 + c2c 150", r2c(150, 200))
    print("1D r2c 300", r2c_1d(300), "1D r2c 300 batch 7", r2c_1d(300, 7))
    print("2D r2c (300,300)", r2c(300, 300))
    print("2D r2c (300,301)", r2c(300, 301))
    for n in [64, 96, 128, 256, 512, 97, 131, 250]:
        print("2D r2c (n,n)", n, r2c(n, n), "c2r", c2r(n, n))


if __name__ == "__main__":
    main()
