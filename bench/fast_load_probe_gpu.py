#!/usr/bin/env python3
"""Probe for issue 14 item 2 (cold loads at storage speed), on the GPU machine.

A TorchScript file with SD2's weight profile (2.6 GB fp16 in ~1300 storages of mixed sizes,
page cache warm) is written in libtorch's usual layout and in the "unified" layout torch.package
uses (every storage a record `.data/<id>.storage`, so a loader can hand libtorch the storages it
read itself through a DeserializationStorageContext and libtorch reads only the pickles and the
code). Each way of loading it onto the GPU, twice, every call printed:

  jit.load            torch.jit.load(map_location=cuda) of the usual file (today's loader)
  ctx-cpu (no copies) unified file imported onto the CPU over the mapping: only the pickles and
                      the code are read (what a load costs besides moving the weights)
  ctx-mmap            unified file mapped; storages handed over as views of the mapping; the
                      unpickler copies each to the GPU (pageable copies)
  ctx-registered      as ctx-mmap, the mapping page-locked first (cudaHostRegister, read-only)
  ctx-registered+reserved  as ctx-registered, after one allocation of the model's size is made
                      and freed (the caching allocator then carves the copies from it)
  ctx-cpu+staged      unified file imported on the CPU over the mapping, then each storage
                      copied to the GPU through small reusable page-locked buffers

    python bench/fast_load_probe_gpu.py --out $OUT [--gb 2.6] [--file model.pt]
"""
import argparse
import ctypes
import json
import mmap
import os
import sys
import time

import torch


class Big(torch.nn.Module):
    def __init__(self, sizes):
        super().__init__()
        self.ws = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.randn(n, dtype=torch.float16), requires_grad=False) for n in sizes])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x
        for w in self.ws:
            s = s + w[:1].to(s.dtype)
        return s


def sizes_like_sd2(total_bytes, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    # log-uniform sizes from 640 B to ~30 MB, scaled to the total
    logs = torch.rand(count, generator=g) * 10.8 + 6.0
    raw = torch.exp(logs)
    elems = (raw / raw.sum() * (total_bytes / 2)).long().clamp(min=320)
    return elems.tolist()


def to_unified(module, path):
    w = torch._C.PyTorchFileWriter(path)
    s = torch._C.ScriptModuleSerializer(w)
    s.serialize(module._c, 0)
    s.write_files()
    del s, w


def records(path):
    r = torch._C.PyTorchFileReader(path)
    out = []
    for rec in r.get_all_records():
        if rec.startswith(".data/") and rec.endswith(".storage"):
            out.append((rec[len(".data/"):], r.get_record_offset(rec)))
    return r, out


def sizes_of(path, recs):
    import zipfile
    z = zipfile.ZipFile(path)
    by = {i.filename.split("/", 1)[-1] if not i.filename.startswith(".data/") else i.filename: i.file_size
          for i in z.infolist()}
    return {k: by[".data/" + k] for k, _ in recs}


def load_ctx(path, recs, sizes, device, register):
    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size
    t0 = time.perf_counter()
    if register:
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    else:
        mm = mmap.mmap(fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    reg_s = 0.0
    base = None
    if register:
        buf = (ctypes.c_char * size).from_buffer_copy if False else None
        base = ctypes.c_void_p.from_buffer(mm) if False else None
        # the mapping's address: numpy's view of it
        import numpy as np
        arr = np.frombuffer(mm, dtype=np.uint8)
        addr = arr.ctypes.data
        t = time.perf_counter()
        rc = torch.cuda.cudart().cudaHostRegister(addr, size, 0x08)
        reg_s = time.perf_counter() - t
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister failed: {rc}")
    r = torch._C.PyTorchFileReader(path)
    ctx = torch._C.DeserializationStorageContext()
    if register:
        import numpy as np
        for k, off in recs:
            n = sizes[k]
            t = torch.from_numpy(arr[off:off + n]) if n else torch.empty(0, dtype=torch.uint8)
            ctx.add_storage(k, t)
    else:
        for k, off in recs:
            n = sizes[k]
            t = torch.frombuffer(mm, dtype=torch.uint8, count=n, offset=off) if n else torch.empty(0, dtype=torch.uint8)
            ctx.add_storage(k, t)
    t1 = time.perf_counter()
    cu = torch._C.CompilationUnit()
    m = torch._C._import_ir_module_from_package(cu, r, ctx, torch.device(device), "0")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return m, {"map_and_context_s": t1 - t0 - reg_s, "register_s": reg_s, "import_s": t2 - t1}, (mm, fd, register, arr if register else None)


def release(keep):
    mm, fd, register, arr = keep
    if register:
        torch.cuda.cudart().cudaHostUnregister(arr.ctypes.data)
    del arr
    try:
        mm.close()
    except BufferError:
        pass
    os.close(fd)


def staged_to_cuda(m):
    """Every distinct storage of the CPU module copied to the GPU through two reusable
    page-locked 64 MiB buffers (Python loop; a C++ loop with several threads would do better)."""
    groups = {}
    for _, t in list(m.named_parameters()) + list(m.named_buffers()):
        s = t.untyped_storage()
        groups.setdefault(s.data_ptr(), (s, []))[1].append(t)
    chunk = 64 << 20
    stage = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    events = [None, None]
    stream = torch.cuda.Stream()
    k = 0
    moved = []
    with torch.cuda.stream(stream):
        for s, ts in groups.values():
            n = s.nbytes()
            dev = torch.empty(n, dtype=torch.uint8, device="cuda")
            src = torch.empty(0, dtype=torch.uint8).set_(s) if n else None
            for at in range(0, n, chunk):
                m_ = min(chunk, n - at)
                if events[k] is not None:
                    events[k].synchronize()
                stage[k][:m_].copy_(src[at:at + m_])
                dev[at:at + m_].copy_(stage[k][:m_], non_blocking=True)
                events[k] = torch.cuda.Event()
                events[k].record(stream)
                k ^= 1
            moved.append((dev, ts))
    stream.synchronize()
    for dev, ts in moved:
        for t in ts:
            v = torch.empty(0, dtype=t.dtype, device="cuda").set_(
                dev.untyped_storage(), t.storage_offset(), t.size(), t.stride())
            t.data = v
    torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gb", type=float, default=2.58)
    ap.add_argument("--count", type=int, default=1266)
    ap.add_argument("--file", help="probe this TorchScript file instead of the synthetic one")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = os.environ.get("TMPDIR", "/tmp")
    plain, uni = os.path.join(work, "big.pt"), os.path.join(work, "big.unified.pt")
    t = time.perf_counter()
    if a.file:
        plain = a.file
        mod = torch.jit.load(plain, map_location="cpu")
        a.count = len({p.untyped_storage().data_ptr() for p in mod.state_dict().values()})
    else:
        mod = torch.jit.script(Big(sizes_like_sd2(a.gb * 1e9, a.count)))
        torch.jit.save(mod, plain)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    to_unified(mod, uni)
    conv_s = time.perf_counter() - t
    del mod
    nbytes = os.path.getsize(plain)
    lines = [f"GPU: {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPUs; file {nbytes/1e9:.2f} GB, "
             f"{a.count} storages; torch.jit.save {save_s:.2f} s, unified copy written in {conv_s:.2f} s"]
    _, recs = records(uni)
    rsizes = sizes_of(uni, recs)
    x = torch.zeros(4, device="cuda", dtype=torch.float16)
    ref = None
    # A real model's forward needs real inputs: only the synthetic one is called.
    call = (lambda m: m(x)) if not a.file else (lambda m: torch.zeros(1, device="cuda"))
    rows = []
    for rnd in range(2):
        for mode in ["jit.load", "ctx-cpu (no copies)", "ctx-mmap", "ctx-registered", "ctx-registered+reserved",
                     "ctx-cpu+staged"]:
            torch.cuda.synchronize()
            t = time.perf_counter()
            phases = {}
            keep = None
            if mode == "jit.load":
                m = torch.jit.load(plain, map_location="cuda")
            elif mode == "ctx-cpu (no copies)":
                m, phases, keep = load_ctx(uni, recs, rsizes, "cpu", False)
            elif mode == "ctx-mmap":
                m, phases, keep = load_ctx(uni, recs, rsizes, "cuda", False)
            elif mode == "ctx-registered":
                m, phases, keep = load_ctx(uni, recs, rsizes, "cuda", True)
            elif mode == "ctx-registered+reserved":
                tr = time.perf_counter()
                # one allocation of the whole model, freed at once: the caching allocator keeps
                # the segment and carves every storage's copy out of it (no cudaMalloc each)
                torch.empty(sum(rsizes.values()) + 512 * len(rsizes), dtype=torch.uint8, device="cuda")
                reserve_s = time.perf_counter() - tr
                m, phases, keep = load_ctx(uni, recs, rsizes, "cuda", True)
                phases["reserve_s"] = reserve_s
            else:
                m, phases, keep = load_ctx(uni, recs, rsizes, "cpu", False)
                m = torch.jit._recursive.wrap_cpp_module(m)
                ts = time.perf_counter()
                staged_to_cuda(m)
                phases["staged_s"] = time.perf_counter() - ts
            torch.cuda.synchronize()
            total = time.perf_counter() - t
            if not isinstance(m, torch.jit.ScriptModule):
                m = torch.jit._recursive.wrap_cpp_module(m)
            y = call(m)
            torch.cuda.synchronize()
            if ref is None:
                ref = y.clone()
            same = bool(torch.equal(ref, y))
            on_gpu = all(p.is_cuda for p in m.state_dict().values())
            del m, y
            if keep is not None:
                release(keep)
            torch.cuda.empty_cache()
            row = {"round": rnd + 1, "mode": mode, "total_s": round(total, 3),
                   "gb_per_s": round(nbytes / total / 1e9, 2), "same_answer": same, "all_on_gpu": on_gpu,
                   **{k: round(v, 3) for k, v in phases.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines.append("")
    lines.append("| round | mode | total s | GB/s | phases | same answer | all on GPU |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        ph = ", ".join(f"{k} {v}" for k, v in r.items() if k.endswith("_s") and k != "total_s")
        lines.append(f"| {r['round']} | {r['mode']} | {r['total_s']} | {r['gb_per_s']} | {ph} | {r['same_answer']} | {r['all_on_gpu']} |")
    with open(os.path.join(a.out, "fast_load_probe_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "fast_load_probe_gpu.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
