#!/usr/bin/env python3
"""Do a thread's cuDNN execution plans carry over to another thread? (issue 12, item 2; issue 14)
A diagnostic that prints numbers, run on the GPU machine.

PyTorch caches cuDNN's execution plans per thread (`thread_local BenchmarkCache` in
aten/src/ATen/native/cudnn/Conv_v8.cpp: plans are not thread-safe across engines). The server
starts new forward threads at every load, so a reloaded model would plan every convolution
shape again. This probe times the eager big-lama generator (random weights, fp32) at photo
sizes in order: the first and second call on the main thread, then the first and second call on
a new thread (same sizes: nothing new to the process), then the main thread again; and the
same for a 3x3 convolution alone.

    python bench/thread_plan_probe_gpu.py > $OUT/thread_plan_probe.txt
"""
import os
import sys
import threading

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "models/lama"))
from common import cuda_timed_ms  # noqa: E402
import lama  # noqa: E402
import export  # noqa: E402

SIZES = [(1000, 752), (800, 600), (1280, 960), (512, 512)]


def on_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def main():
    print(torch.cuda.get_device_name(0), torch.__version__)
    g = lama.FFCResNetGenerator()
    export.randomize(g, 0)
    g = g.eval().cuda()
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).cuda()

    def calls(label):
        def run():
            rows = []
            with torch.inference_mode():
                for w, h in SIZES:
                    x = torch.rand(1, 4, h, w, device="cuda")
                    c = torch.rand(1, 256, h // 8, w // 8, device="cuda")
                    rows.append((w, h, cuda_timed_ms(lambda: g(x)), cuda_timed_ms(lambda: g(x)),
                                 cuda_timed_ms(lambda: conv(c)), cuda_timed_ms(lambda: conv(c))))
            return rows
        return label, run

    for label, run in [calls("main thread, sizes new to the process"), calls("a new thread, same sizes")]:
        rows = run() if label.startswith("main") else on_thread(run)
        print(f"\n## {label}: generator first / second, conv3x3 first / second (ms)")
        for w, h, a, b, c, d in rows:
            print(f"{w}x{h}: {a:.1f} / {b:.1f}   {c:.2f} / {d:.2f}")
    label, run = calls("main thread again")
    print(f"\n## {label}")
    for w, h, a, b, c, d in run():
        print(f"{w}x{h}: {a:.1f} / {b:.1f}   {c:.2f} / {d:.2f}")
    label, run = calls("a second new thread")
    print(f"\n## {label}")
    for w, h, a, b, c, d in on_thread(run):
        print(f"{w}x{h}: {a:.1f} / {b:.1f}   {c:.2f} / {d:.2f}")


if __name__ == "__main__":
    main()
