#!/usr/bin/env python3
"""Where a cold load's time goes (issue 14, item 2), on the GPU machine, full-size random weights
(SD2-inpainting fp16, SAM vit_h encoder fp32).

From Python, per TorchScript file (page cache warm: the files were just written), each twice:
reading the file into memory; `torch.jit.load` onto CUDA; onto the CPU; onto the CPU and then
the tensors moved in bulk (each distinct storage copied into one page-locked buffer, then one
asynchronous host-to-device copy per storage); onto the CPU and then each storage moved with a
plain `.to("cuda")`. Also SHA-256 and zlib inflate speed on the same machine, for reference.

Then the server (`--bin`, host tier off, a budget that holds one model): the first load of
each archive from its `.tar.gz` (packed with the default, stored blocks) and reloads from the
unpacked files, with the server log's phases (unpack, check, TorchScript load, handler), with
the parallel reader (the default) and with libtorch's own (`TESSERA_LOAD_PATH=torch`).

    python bench/cold_load_probe_gpu.py --bin ./tessera --handlers <dir with sd/sam.wasm> --out $OUT
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zlib

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from common import server_bench_setup, request, start_server, write_results  # noqa: E402
from residency_gpu import bodies  # noqa: E402


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t


def storages(module):
    """The distinct storages of a scripted module's parameters and buffers (keyed by pointer)."""
    seen = {}
    for _, t in list(module.named_parameters()) + list(module.named_buffers()):
        s = t.untyped_storage()
        seen.setdefault(s.data_ptr(), (s, []))[1].append(t)
    return list(seen.values())


def bulk_to_cuda(module):
    """Every storage copied into one page-locked buffer, then to the GPU; tensors repointed.
    Returns the phase times."""
    groups = storages(module)
    total = sum((s.nbytes() + 4095) // 4096 * 4096 for s, _ in groups)
    t0 = time.perf_counter()
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    t1 = time.perf_counter()
    off, places = 0, []
    for s, _ in groups:
        n = s.nbytes()
        pinned[off:off + n].copy_(torch.tensor([], dtype=torch.uint8).set_(s))
        places.append((off, n))
        off += (n + 4095) // 4096 * 4096
    t2 = time.perf_counter()
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    dev.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    t3 = time.perf_counter()
    with torch.no_grad():
        for (s, tensors), (o, n) in zip(groups, places):
            for t in tensors:
                view = torch.tensor([], dtype=t.dtype, device="cuda").set_(
                    dev.untyped_storage(), o // t.element_size() + t.storage_offset(), t.shape, t.stride())
                t.data = view
    t4 = time.perf_counter()
    del pinned
    return {"pin_alloc_s": t1 - t0, "memcpy_to_pinned_s": t2 - t1, "h2d_s": t3 - t2, "repoint_s": t4 - t3,
            "bytes": total, "storages": len(groups)}


def probe_file(path):
    size = os.path.getsize(path)
    out = {"file": os.path.basename(path), "bytes": size, "runs": []}
    for _ in range(2):
        r = {}
        buf = bytearray(size)
        t = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            f.readinto(memoryview(buf))
        r["read_s"] = time.perf_counter() - t
        t = time.perf_counter()
        hashlib.sha256(buf).digest()
        r["sha256_s"] = time.perf_counter() - t
        del buf
        m, r["jit_load_cuda_s"] = timed(lambda: torch.jit.load(path, map_location="cuda"))
        del m
        torch.cuda.empty_cache()
        m, r["jit_load_cpu_s"] = timed(lambda: torch.jit.load(path, map_location="cpu"))
        t = time.perf_counter()
        r["bulk"] = bulk_to_cuda(m)
        r["bulk_total_s"] = time.perf_counter() - t
        del m
        torch.cuda.empty_cache()
        m = torch.jit.load(path, map_location="cpu")

        def each():
            with torch.no_grad():
                for s, tensors in storages(m):
                    d = torch.tensor([], dtype=torch.uint8).set_(s).to("cuda")
                    for x in tensors:
                        x.data = torch.tensor([], dtype=x.dtype, device="cuda").set_(
                            d.untyped_storage(), x.storage_offset(), x.shape, x.stride())
        _, r["each_to_cuda_s"] = timed(each)
        del m
        torch.cuda.empty_cache()
        out["runs"].append(r)
        print(out["file"], r, flush=True)
    return out


def main():
    args, work, store = server_bench_setup()
    results = {"gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count()}
    py = sys.executable
    quiet = open(os.path.join(args.out, "export.log"), "w")
    t = time.perf_counter()
    sd = os.path.join(work, "sd")
    subprocess.check_call([py, os.path.join(ROOT, "models/sd/export.py"), "--random", "--device", "cuda", "--fp16",
                           "--out-dir", sd], stdout=quiet, stderr=quiet)
    sam = os.path.join(work, "sam")
    subprocess.check_call([py, os.path.join(ROOT, "models/sam/export.py"), "--variant", "vit_h", "--random",
                           "--out-dir", sam, "--device", "cuda"], stdout=quiet, stderr=quiet)
    results["export_s"] = time.perf_counter() - t
    results["files"] = [probe_file(os.path.join(sd, "sd.pt")), probe_file(os.path.join(sam, "encoder.pt"))]

    # zlib inflate speed of a gzip stream of random bytes (stored blocks, as deflate writes them).
    raw = os.urandom(256 << 20)
    comp = zlib.compress(raw, 6)
    t = time.perf_counter()
    zlib.decompress(comp)
    results["zlib_inflate_gb_s"] = len(raw) / (time.perf_counter() - t) / 1e9

    h = args.handlers
    timings = {}
    for name, cmd in [
        ("sd", ["--config", os.path.join(ROOT, "models/sd/model-config.yaml"), "--model", os.path.join(sd, "sd.pt"),
                "--handler", os.path.join(h, "sd.wasm"), "--asset", os.path.join(sd, "tokenizer"),
                "--asset", os.path.join(sd, "warmup.json"), "--asset", os.path.join(sd, "warmup-unguided.json")]),
        ("sam", ["--config", os.path.join(ROOT, "models/sam/model-config.yaml"),
                 "--model", os.path.join(sam, "encoder.pt"), "--model", os.path.join(sam, "decoder.pt"),
                 "--asset", os.path.join(sam, "warmup.json"), "--handler", os.path.join(h, "sam.wasm")]),
    ]:
        t = time.perf_counter()
        subprocess.check_call([args.bin, "pack", *cmd, "--skip-model-check", "--output",
                               os.path.join(store, f"{name}.tar.gz")])
        timings[name] = {"pack_s": time.perf_counter() - t,
                         "archive_bytes": os.path.getsize(os.path.join(store, f"{name}.tar.gz"))}
    results["pack"] = timings

    # The server: first loads from the .tar.gz, then reloads from the unpacked files, with each
    # TorchScript load path (TESSERA_LOAD_PATH), the budget holding one model at a time.
    body = bodies()
    results["servers"] = {}
    srv_work = work + "-srv"
    for path_name, order in [("parallel", ["sd", "sam", "sd", "sam", "sd", "sam"]),
                             ("torch", ["sd", "sam", "sd", "sam"]),
                             ("parallel again", ["sd", "sam", "sd", "sam"])]:
        log_path = os.path.join(args.out, f"server-{path_name.replace(' ', '-')}.log")
        os.environ["TESSERA_LOAD_PATH"] = path_name.split()[0]
        srv, base, log = start_server(args.bin, store, srv_work, log_path, "--device", "cuda",
                                      "--memory-budget-mib", "2800", "--model-warm-ups", "off",
                                      "--host-memory-budget-mib", "0")
        loads = []
        try:
            for name in order:
                status, data, hd, secs = request("POST", f"{base}/predictions/{name}", body[name],
                                                 {"content-type": "application/json"})
                row = {"model": name, "status": status, "total_ms": secs * 1e3, "tier": hd.get("x-model-tier"),
                       "load_ms": hd.get("x-model-load-time"), "forward_ms": hd.get("x-inference-time")}
                loads.append(row)
                print(path_name, row, flush=True)
        finally:
            srv.terminate()
            srv.wait(timeout=60)
            log.close()
        text = open(log_path).read()
        phases = [dict(zip(["model", "ms", "unpack", "check", "torch", "handler"], m.groups()))
                  for m in re.finditer(r'model loaded model=\S*/([\w.-]+)@\S*.*?ms=(\d+) '
                                       r'(?:unpack_ms=(\d+) )?(?:check_ms=(\d+) )?torch_ms=(\d+) '
                                       r'handler_ms=(\d+)', text)]
        results["servers"][path_name] = {"requests": loads, "phases": phases,
                                         "fallbacks": len(re.findall("fast TorchScript load failed", text))}
    os.environ.pop("TESSERA_LOAD_PATH", None)
    lines = [f"GPU: {results['gpu']}, {results['cpus']} CPUs; one run", ""]
    for f in results["files"]:
        lines += [f"## {f['file']} ({f['bytes'] / 1e9:.2f} GB)", ""]
        for r in f["runs"]:
            gb = f["bytes"] / 1e9
            lines.append(f"- read {r['read_s']:.2f} s ({gb / r['read_s']:.1f} GB/s), sha256 {r['sha256_s']:.2f} s; "
                         f"jit.load cuda {r['jit_load_cuda_s']:.2f} s ({gb / r['jit_load_cuda_s']:.2f} GB/s), "
                         f"cpu {r['jit_load_cpu_s']:.2f} s; bulk after cpu {r['bulk_total_s']:.2f} s {r['bulk']}; "
                         f"each .to(cuda) after cpu {r['each_to_cuda_s']:.2f} s")
        lines.append("")
    lines += [f"zlib inflate (random data): {results['zlib_inflate_gb_s']:.2f} GB/s", "",
              f"pack: {results['pack']}", ""]
    for path_name, r in results["servers"].items():
        lines += [f"## server, TESSERA_LOAD_PATH={path_name.split()[0]} ({path_name})", "",
                  "| model | tier | load ms | unpack | check | TorchScript | handler | HTTP total ms | forward ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row, ph in zip(r["requests"], r["phases"] + [{}] * len(r["requests"])):
            lines.append(f"| {row['model']} | {row['tier']} | {row['load_ms']} | {ph.get('unpack')} | "
                         f"{ph.get('check')} | {ph.get('torch')} | {ph.get('handler')} | {row['total_ms']:.0f} | "
                         f"{row['forward_ms']} |")
        lines += ["", f"fast-load fallbacks: {r['fallbacks']}", ""]
    write_results(args.out, results, lines)


if __name__ == "__main__":
    main()
