#!/usr/bin/env python3
"""Where the server's LaMa forward loses time against the same TorchScript from Python (issue 12,
items 1, 3 and 6): a diagnostic that prints numbers, run on the GPU machine.

For every call it reads the Linux scheduler's per-thread accounting
(`/proc/<pid>/task/<tid>/schedstat`: nanoseconds on a CPU, nanoseconds runnable but waiting for
one, and `status`: voluntary / involuntary context switches), so a slower call can be told apart
as more CPU work on the calling thread (a slower code path), waiting for a CPU (contention), or
sleeping (waiting on the GPU or a lock); and how much CPU the process's other threads burnt
meanwhile (spinning pools).

  - Tessera over HTTP (the big-lama archive as shipped: `simple` executor; then with the
    forward thread's OpenMP team at 16 threads, and with libtorch's CUDA allocator defaults),
    photos of the sweep's sizes in sequence, then 10 requests at 512x512: per request the forward
    (`x-inference-time`), its phases from the server's trace log (inputs / launch / outputs), and
    the forward thread's and the other threads' scheduler numbers.
  - The same TorchScript file from Python with graph-executor optimisation off (what `simple`
    sets), in fresh processes: called from the main thread under `no_grad` (libtorch's allocator
    defaults, then expandable segments as the server has them), and from a second thread under
    `inference_mode` (as the server's forward threads run).

    python bench/forward_gap_gpu.py --bin ./tessera --handler lama.wasm --out $OUT [--modes "a;b;a"]
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import bench_args, make_store, request, start_server, write_results  # noqa: E402
from sweep_gpu import CONFIG, SIZES, padded, scene, b64png  # noqa: E402

# Server modes: label -> (extra `tessera serve` arguments, lines added under the archive's
# `tessera:`). Before 2026-11-27 a GPU model's forward thread used the server's default intra-op
# threads (libtorch's: the cores); since then 1 unless its config names a number.
SERVER_MODES = {
    "as shipped": ([], ""),
    "16 intra-op threads": ([], "  intraOpThreads: 16\n"),
    "allocator defaults": (["--cuda-alloc-conf", ""], ""),
}
# Python modes: label -> PYTORCH_CUDA_ALLOC_CONF.
PYTHON_MODES = {
    "main_no_grad": "",
    "main_no_grad_expandable": "expandable_segments:True",
    "thread_inference_mode": "",
}

SEQUENCE = [(s, "sweep") for s in SIZES] + [((512, 512), "steady")] * 10


def tasks(pid):
    """{tid: (name, on-CPU ns, run-queue wait ns, voluntary, involuntary switches)}."""
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                run, wait, _ = (int(x) for x in f.read().split())
            with open(f"{base}/{tid}/comm") as f:
                name = f.read().strip()
            vol = invol = 0
            with open(f"{base}/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        vol = int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        invol = int(line.split()[1])
            out[int(tid)] = (name, run, wait, vol, invol)
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
    return out


def delta(before, after, me):
    """The calling thread's numbers (ms, ms, switches) and the rest of the process by name."""
    def d(tid):
        a, b = after[tid], before.get(tid, (after[tid][0], 0, 0, 0, 0))
        return {"cpu_ms": (a[1] - b[1]) / 1e6, "wait_ms": (a[2] - b[2]) / 1e6,
                "vol": a[3] - b[3], "invol": a[4] - b[4]}
    mine = d(me) if me in after else None
    others = {}
    for tid, v in after.items():
        if tid == me:
            continue
        x = d(tid)
        if x["cpu_ms"] > 0.05:
            o = others.setdefault(v[0], {"cpu_ms": 0.0, "threads": 0})
            o["cpu_ms"] += x["cpu_ms"]
            o["threads"] += 1
    return mine, dict(sorted(others.items(), key=lambda kv: -kv[1]["cpu_ms"]))


def python_mode(tag, pt):
    """One Python mode over the sequence in this fresh process; prints the rows as JSON."""
    m = torch.jit.load(pt, map_location="cuda")
    rows = []

    def run():
        # Per thread in libtorch, as in the server.
        torch._C._set_graph_executor_optimize(False)
        me = threading.get_native_id()
        seen = set()
        for s, phase in SEQUENCE:
            img, mask = (torch.from_numpy(a) for a in scene(*padded(*s)))
            torch.cuda.synchronize()
            before = tasks(os.getpid())
            t0 = time.perf_counter()
            a, b = img.cuda(), mask.cuda()
            t1 = time.perf_counter()
            y = m(a, b)
            t2 = time.perf_counter()
            y = y.cpu()
            t3 = time.perf_counter()
            after = tasks(os.getpid())
            mine, others = delta(before, after, me)
            rows.append({"size": s, "phase": phase, "first_seen": s not in seen, "ms": (t3 - t0) * 1e3,
                         "inputs_ms": (t1 - t0) * 1e3, "launch_ms": (t2 - t1) * 1e3, "outputs_ms": (t3 - t2) * 1e3,
                         "thread": mine, "others": others})
            seen.add(s)

    if tag.startswith("main_no_grad"):
        with torch.no_grad():
            run()
    else:
        def in_thread():
            with torch.inference_mode():
                run()
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
    print(json.dumps(rows))


PHASES = re.compile(r"inputs_ms=([\d.]+) launch_ms=([\d.]+) outputs_ms=([\d.]+)")


def main():
    args = bench_args("--python-mode", "--model", "--modes")
    if args.python_mode:
        return python_mode(args.python_mode, args.model)
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp()
    pt = os.path.join(work, "model.pt")
    subprocess.check_call([sys.executable, os.path.join(ROOT, "models/lama/export.py"), "--random", "--out", pt,
                           "--device", "cuda"])
    stores = {}
    # Server modes in order, `;`-separated; a mode may come more than once (the first process on
    # a fresh machine runs slower: see the results).
    order = args.modes.split(";") if args.modes else list(SERVER_MODES)
    for extra in sorted({SERVER_MODES[m][1] for m in order}):
        stores[extra], cfg = make_store(os.path.join(work, f"archive-{len(stores)}"),
                                        CONFIG.replace("tessera:\n", "tessera:\n" + extra))
        subprocess.check_call([args.bin, "pack", "--config", cfg, "--model", pt, "--handler", args.handler,
                               "--output", os.path.join(stores[extra], "lama.tar.gz"), "--skip-model-check"])
    results = {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count(), "server": {}, "python": {}}
    hdr = {"content-type": "application/json"}
    bodies = {s: json.dumps({"image": b64png(scene(*s)[0]), "mask_image": b64png(scene(*s)[1])}).encode()
              for s, _ in SEQUENCE}
    os.environ["RUST_LOG"] = "info,tessera::runtime=trace"
    for n, mode in enumerate(order):
        extra, config = SERVER_MODES[mode]
        log_path = os.path.join(args.out, f"server-{n}.log")
        srv, base, log = start_server(args.bin, stores[config], os.path.join(work, f"s{n}"), log_path, "--device", "cuda",
                                      "--torchscript-executor", "simple", *extra)
        rows, seen = [], set()
        for s, phase in SEQUENCE:
            before = tasks(srv.pid)
            status, data, h, sec = request("POST", f"{base}/predictions/lama", bodies[s], hdr)
            after = tasks(srv.pid)
            assert status == 200, data[:300]
            fwd = [tid for tid, v in after.items() if v[0].startswith("f") and v[0].endswith("lama")]
            mine, others = delta(before, after, min(fwd) if fwd else -1)
            rows.append({"size": s, "phase": phase, "first_seen": s not in seen, "total_ms": sec * 1e3,
                         "forward_ms": float(h["x-inference-time"]),
                         "load_ms": float(h.get("x-model-load-time", 0)),
                         "forward_threads": len(fwd), "thread": mine, "others": others})
            seen.add(s)
        srv.terminate()
        srv.wait(timeout=30)
        log.close()
        with open(log_path) as f:
            phases = [tuple(float(x) for x in m.groups()) for m in map(PHASES.search, f) if m]
        for row, p in zip(rows, phases[-len(rows):]):
            row["inputs_ms"], row["launch_ms"], row["outputs_ms"] = p
        results["server"][f"{n + 1}. {mode}"] = rows

    for tag, conf in PYTHON_MODES.items():
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf)
        out = subprocess.check_output([sys.executable, __file__, "--python-mode", tag, "--model", pt], env=env)
        results["python"][tag] = json.loads(out.decode().strip().splitlines()[-1])

    def cells(r, wall):
        t = r["thread"] or {}
        top = ", ".join(f"{k} {v['cpu_ms']:.0f}" for k, v in list(r["others"].items())[:3])
        return (f"{wall:.0f} | {r.get('launch_ms', 0):.0f} | {t.get('cpu_ms', 0):.0f} | {t.get('wait_ms', 0):.1f} | "
                f"{t.get('vol', 0)}/{t.get('invol', 0)} | {sum(v['cpu_ms'] for v in r['others'].values()):.0f} ({top})")

    lines = [f"GPU: {results['gpu']}; {results['cpus']} CPUs; big-lama fp32, random weights", "",
             "Per call: forward ms | launch ms (the TorchScript call returning) | calling thread on a CPU ms | "
             "its run-queue wait ms | voluntary/involuntary switches | other threads' CPU ms (top 3 by name)", ""]
    for label, rows, wall in [(f"Tessera, {m} (forward: x-inference-time)", r, "forward_ms")
                              for m, r in results["server"].items()] + [
            (f"Python, {t}", results["python"][t], "ms") for t in results["python"]]:
        lines += [f"### {label}", "", "| # | size | seen | forward | launch | thread CPU | wait | vol/invol | others |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(rows):
            lines.append(f"| {i + 1} | {r['size'][0]}x{r['size'][1]} | {'' if r['first_seen'] else 'seen'} | "
                         + cells(r, r[wall]) + " |")
        lines.append("")
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
