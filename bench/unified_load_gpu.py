#!/usr/bin/env python3
"""Cold loads from local disk through the unified copy (issue 14, item 2), on the GPU machine,
full-size random weights: SD2-inpainting fp16, SAM vit_h (encoder + decoder), LaMa fp32.

The server writes a model file's unified copy (every storage its own record, see
`host/src/runtime/tier_shim.cpp`) on the file's first load and loads later ones from it: its
storages are mapped and page-locked in place, and libtorch reads only the pickles and the code.

In one run: the three models exported and packed; `torch.jit.load(map_location="cuda")` of each
file from Python (the baseline, twice); then servers with the host tier off and a device budget
holding one model (2800 MiB), requests SD2, SAM, LaMa round after round so every request
reloads its model from disk:

  unified          fresh work dir: round 0 loads from the .tar.gz (the copies are written in
                   the background; the run waits for them), rounds 1-2 reload through them
  parallel         same work dir, TESSERA_LOAD_PATH=parallel (the previous default)
  torch            same work dir, TESSERA_LOAD_PATH=torch (libtorch's own load)
  unified again    same work dir, the default again

Every request is listed (tier, load and HTTP times, the TorchScript phase of the load and its
effective GB/s over the model's files); answers are compared with the first server's.

    python bench/unified_load_gpu.py --bin ./tessera --handlers <dir with sd/sam/lama.wasm> --out $OUT
"""
import hashlib
import json
import os
import re
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import server_bench_setup, request, start_server, write_results  # noqa: E402
from residency_gpu import BUDGET_MIB, MODELS, bodies, export_and_pack  # noqa: E402

ROUNDS = 3


def main():
    args, work, store = server_bench_setup()
    results = {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count(), "budget_mib": BUDGET_MIB}
    results.update(export_and_pack(args.bin, args.handlers, work, store, args.out))
    files = {"sd": [os.path.join(work, "sd", "sd.pt")],
             "sam": [os.path.join(work, "sam", "encoder.pt"), os.path.join(work, "sam", "decoder.pt")],
             "lama": [os.path.join(work, "lama", "model.pt")]}
    sizes = {m: sum(os.path.getsize(f) for f in fs) for m, fs in files.items()}
    results["file_bytes"] = sizes

    baseline = {}
    for m, fs in files.items():
        runs = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loaded = [torch.jit.load(f, map_location="cuda") for f in fs]
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - t)
            del loaded
            torch.cuda.empty_cache()
        baseline[m] = runs
        print("python jit.load", m, runs, flush=True)
    results["python_jit_load_s"] = baseline

    body = bodies()
    hdr = {"content-type": "application/json"}
    srv_work = work + "-srv"
    first = {}
    results["servers"] = {}
    for setting in ["unified", "parallel", "torch", "unified again"]:
        os.environ["TESSERA_LOAD_PATH"] = setting.split()[0]
        log_path = os.path.join(args.out, f"server-{setting.replace(' ', '-')}.log")
        srv, base, log = start_server(args.bin, store, srv_work, log_path, "--device", "cuda",
                                      "--memory-budget-mib", str(BUDGET_MIB), "--model-warm-ups", "off",
                                      "--host-memory-budget-mib", "0")
        rows = []
        try:
            for rnd in range(ROUNDS):
                for m in MODELS:
                    status, data, hd, secs = request("POST", f"{base}/predictions/{m}", body[m], hdr)
                    digest = hashlib.sha256(data).hexdigest()[:16]
                    first.setdefault(m, digest)
                    row = {"round": rnd, "model": m, "status": status, "tier": hd.get("x-model-tier"),
                           "load_ms": hd.get("x-model-load-time"), "total_ms": round(secs * 1e3),
                           "forward_ms": hd.get("x-inference-time"), "same_answer": digest == first[m]}
                    rows.append(row)
                    print(setting, row, flush=True)
                if setting == "unified" and rnd == 0:
                    # The copies are written in the background after each first load: wait for the
                    # three large files' (SD2, SAM's encoder, LaMa) before the reloads.
                    t = time.perf_counter()
                    while (open(log_path).read().count("unified copy written") < 3
                           and time.perf_counter() - t < 180):
                        time.sleep(0.1)
                    results["copies_ready_after_round_0_s"] = round(time.perf_counter() - t, 2)
        finally:
            srv.terminate()
            srv.wait(timeout=60)
            log.close()
        text = open(log_path).read()
        phases = [dict(zip(["model", "torch_ms"], x.groups()))
                  for x in re.finditer(r'model loaded model=\S*/([\w.-]+)@\S*.*?torch_ms=(\d+)', text)]
        for row, ph in zip(rows, phases):
            if ph["model"] == row["model"]:
                row["torch_ms"] = int(ph["torch_ms"])
                row["gb_per_s"] = round(sizes[row["model"]] / (int(ph["torch_ms"]) / 1e3) / 1e9, 2)
        results["servers"][setting] = {
            "rows": rows,
            "copy_loads": re.findall(r'ms=(\d+) gb_per_s=(\S+) TorchScript loaded from its unified copy', text)
                          or re.findall(r'TorchScript loaded from its unified copy.*?ms=(\d+).*?gb_per_s="?([\d.]+)', text),
            "copies_written_ms": re.findall(r'unified copy written.*?ms=(\d+)', text)
                                 or re.findall(r'ms=(\d+) unified copy written', text),
            "not_page_locked": len(re.findall("unified copy not page-locked", text)),
            "errors": len(re.findall(r" ERROR ", text)),
        }
    os.environ.pop("TESSERA_LOAD_PATH", None)

    lines = [f"GPU: {results['gpu']}, {results['cpus']} CPUs; device budget {BUDGET_MIB} MiB (one model at a time), "
             f"host tier off, model warm-ups off; full-size random weights; one run", "",
             f"Copies ready {results.get('copies_ready_after_round_0_s')} s after round 0's last answer", "",
             "Model files: " + ", ".join(f"{m} {b / 1e9:.2f} GB" for m, b in sizes.items()), "",
             "Python `torch.jit.load(map_location='cuda')` (baseline, s): "
             + ", ".join(f"{m} {', '.join(f'{x:.2f}' for x in r)} ({sizes[m] / min(r) / 1e9:.2f} GB/s best)"
                         for m, r in baseline.items()), ""]
    for setting, r in results["servers"].items():
        lines += [f"## {setting} (TESSERA_LOAD_PATH={setting.split()[0]})", "",
                  "| round | model | tier | load ms | TorchScript ms | GB/s | HTTP total ms | forward ms | same answer |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['round']} | {row['model']} | {row['tier']} | {row['load_ms']} | "
                         f"{row.get('torch_ms')} | {row.get('gb_per_s')} | {row['total_ms']} | {row['forward_ms']} | "
                         f"{row['same_answer']} |")
        lines += ["", f"loads from unified copies (ms, GB/s per file): {r['copy_loads']}; copies written (ms): "
                      f"{r['copies_written_ms']}; not page-locked: {r['not_page_locked']}; ERROR lines: {r['errors']}", ""]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
