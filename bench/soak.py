#!/usr/bin/env python3
"""Soak with churn (CPU, small models): many requests at high concurrency over three times more
models than the residency budget holds, with uploads, version switches, unloads, version deletes,
clients that leave mid-request, and a handler that exhausts its memory or time on every call
(now and then, and in a burst of concurrent calls during the warm-up and again after it)
interleaved. Checks every answer byte for byte against a reference server that sees no churn,
the statuses (only the designed 429/503/504/507 besides 2xx and 4xx answers to our own
deliberate mistakes; the failing handler's calls only their designed 500/504), the server's RSS
once idle with every model unloaded after the run against the same after warm-up, and what is
left in the store's staging and the work dir (no partial unpack, no unpacked archive whose
archive is gone). Reports latency percentiles per kind of call.

    python bench/soak.py [--requests 10000] [--concurrency 64] [--out bench/results/soak_cpu]

Needs a release build (target/release/tessera, or TESSERA_BIN) and the test artifacts
(TESSERA_ARTIFACTS: handlers/example.wasm, handlers/chaos.wasm, example/model.pt,
example/model-large.pt), as
`bash scripts/test.sh` leaves them. Writes OUT.md and OUT.json.
"""
import argparse
import base64
import http.client
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGNED = {429, 503, 504, 507}
CONFIG = "maxWorkers: 2\nresponseTimeout: 60\ntessera:\n  model: model.pt\nhandler:\n  max_pixels: 1000000\n"
# The failing handler: each mode's designed status and a word of its error.
CHAOS_CONFIG = "maxWorkers: 2\nresponseTimeout: 2\ntessera:\n  model: model.pt\n  handlerMemoryMiB: 64\n"
CHAOS = {"hog": (500, "memory limit"), "loop": (504, "time limit"), "trap": (500, "trapped"),
         "image-hog": (500, "memory limit")}
# Seconds to wait for the server to be idle: its upkeep (every 2 s) trims the heap two calls
# after the latest request is 3 s old, and the header/stall timeouts the soak sets (5 s) have
# closed abandoned connections.
SETTLE = 12
# Each call's share of the mix: (upper bound of a uniform draw, kind), in the order tried.
OPS = [(0.74, "infer-operator"), (0.87, "infer-uploaded"), (0.88, "infer-failing"), (0.92, "disconnect"),
       (0.95, "upload"), (0.97, "set-default"), (0.985, "delete-version"), (1.01, "unload")]


def artifacts():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.environ.get("TESSERA_ARTIFACTS", os.path.join(target, "artifacts"))


def binary():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.environ.get("TESSERA_BIN", os.path.join(target, "release", "tessera"))


def pack(out_dir, name, model, handler="example", config=CONFIG):
    """A `<name>.tar.gz` of handlers/`handler`.wasm with `model` (a TorchScript file)."""
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "model-config.yaml")
        open(cfg, "w").write(config)
        pt = os.path.join(tmp, "model.pt")
        shutil.copy(model, pt)
        out = os.path.join(out_dir, f"{name}.tar.gz")
        subprocess.run([binary(), "pack", "--config", cfg, "--model", pt, "--handler",
                        os.path.join(artifacts(), "handlers", f"{handler}.wasm"), "-o", out],
                       check=True, capture_output=True)
    return out


def percentiles(ms):
    """count, p50, p90, p99 and max of a list of milliseconds."""
    if not ms:
        return {"count": 0}
    ms = sorted(ms)
    at = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)
    return {"count": len(ms), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": round(ms[-1], 1)}


def unpacked_orphans(work):
    """Disk-tier entries of the work dir whose archive is gone (their `.source` names a missing
    file), and entries without a `.source`."""
    root = os.path.join(work, "unpacked")
    if not os.path.isdir(root):
        return []
    orphans = []
    for name in os.listdir(root):
        if name.startswith(".") or "." in name:
            continue
        try:
            with open(os.path.join(root, name + ".source"), "rb") as f:
                source = f.read().decode()
        except FileNotFoundError:  # no source, or the folder was collected meanwhile
            if os.path.isdir(os.path.join(root, name)):
                orphans.append(name)
            continue
        if not os.path.exists(source):
            orphans.append(name)
    return orphans


class Server:
    def __init__(self, store, work, extra):
        self.proc = subprocess.Popen(
            [binary(), "serve", "--port", "0", "--device", "cpu", "--model-store", store,
             "--work-dir", work, *extra],
            stdout=subprocess.PIPE, stderr=open(os.path.join(work, "..", os.path.basename(work) + ".log"), "w"),
            text=True, env={"RUST_LOG": "warn", **os.environ})
        self.addr = None
        for line in self.proc.stdout:
            if line.startswith("tessera listening on http://"):
                host, port = line.strip().rsplit("/", 1)[-1].split(":")
                self.addr = (host, int(port))
            if line.strip() == "tessera ready":
                break
        if not self.addr:
            sys.exit("server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def call(self, method, path, body=None, headers=None, timeout=120):
        c = http.client.HTTPConnection(*self.addr, timeout=timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        finally:
            c.close()

    def rss(self):
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def rss_breakdown(self):
        """Resident MiB by kind of mapping: the handler instance pool (the largest anonymous
        reservation: wasmtime's slots), other anonymous memory (the C heap's arenas, thread
        stacks, libtorch), the main heap, and files (code, mapped model files)."""
        maps, cur = [], None
        for line in open(f"/proc/{self.proc.pid}/smaps"):
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = {"size": hi - lo, "name": head[5] if len(head) > 5 else "", "rss": 0}
                maps.append(cur)
            elif head[0] == "Rss:":
                cur["rss"] = int(head[1]) * 1024
        anon = [m for m in maps if not m["name"]]
        pool = max(anon, key=lambda m: m["size"]) if anon else {"rss": 0}
        mib = lambda b: round(b / 2**20, 1)
        threads = next((int(l.split()[1]) for l in open(f"/proc/{self.proc.pid}/status")
                        if l.startswith("Threads:")), 0)
        others = [m for m in anon if m is not pool]
        # The other anonymous mappings by their reserved size: where that memory lives (C-heap
        # arenas reserve 64 MiB, thread stacks their stack size).
        by_size = Counter()
        for m in others:
            by_size[mib(m["size"])] += m["rss"]
        return {"handler_pool": mib(pool["rss"]),
                "other_anonymous": mib(sum(m["rss"] for m in others)),
                "heap": mib(sum(m["rss"] for m in maps if m["name"] == "[heap]")),
                "files": mib(sum(m["rss"] for m in maps if m["name"].startswith("/"))),
                "threads": threads,
                "anonymous_rss_by_mapping_size": {f"{k} MiB": mib(v) for k, v in by_size.most_common(6)}}

    def stop(self):
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def bodies(n):
    rng = random.Random(7)
    out = []
    for i in range(n):
        w, h = rng.choice([(24, 16), (33, 21), (48, 32), (17, 40)])
        img = Image.frombytes("RGB", (w, h), bytes(rng.randrange(256) for _ in range(w * h * 3)))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(json.dumps({"image": base64.b64encode(buf.getvalue()).decode(),
                               "gen_args": {"strength": round(0.1 + 0.1 * (i % 8), 2)}}).encode())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--models", type=int, default=9)
    ap.add_argument("--burst", type=int, default=32, help="concurrent failing-handler calls, in the warm-up and after it")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak_cpu"))
    args = ap.parse_args()
    art = artifacts()
    variants = {"small": os.path.join(art, "example", "model.pt"),
                "large": os.path.join(art, "example", "model-large.pt")}
    tmp = tempfile.mkdtemp(prefix="tessera-soak-")
    store, work = os.path.join(tmp, "store"), os.path.join(tmp, "work")
    ref_store, ref_work = os.path.join(tmp, "ref-store"), os.path.join(tmp, "ref-work")
    for d in (store, work, ref_work):
        os.makedirs(d)
    archives = {v: pack(os.path.join(tmp, "archives"), v, p) for v, p in variants.items()}
    for v, a in archives.items():
        os.makedirs(ref_store, exist_ok=True)
        shutil.copy(a, os.path.join(ref_store, f"{v}.tar.gz"))
    # Operator archives m0..m8, large (3.5 MB of weights each): the budget holds three.
    names = [f"m{i}" for i in range(args.models)]
    for n in names:
        shutil.copy(archives["large"], os.path.join(store, f"{n}.tar.gz"))
    pack(store, "chaos", variants["small"], "chaos", CHAOS_CONFIG)
    large = os.path.getsize(variants["large"])
    budget_mib = max(1, (3 * large + large // 2) >> 20)

    reqs = bodies(16)
    ref = Server(ref_store, ref_work, [])
    reference = {}
    for v in variants:
        for i, b in enumerate(reqs):
            s, body, _ = ref.call("POST", f"/predictions/{v}", b, {"content-type": "application/json"})
            assert s == 200, (v, s, body[:200])
            reference[(v, i)] = body
    ref.stop()

    srv = Server(store, work, ["--memory-budget-mib", str(budget_mib), "--max-queue", "16",
                               "--header-timeout-seconds", "5", "--body-stall-seconds", "5"])
    # Uploaded models u0..u2 with versions whose variant we know.
    lock = threading.Lock()
    versions = {}  # (name, version) -> variant (kept after a delete: a request begun before it
    gone = set()  # may still be answered by it)
    installed = set()  # versions the server confirmed (201) and not deleted
    next_version = Counter()
    last_upload_error = [b""]
    latency = {}  # "kind status" -> [ms]

    def upload(name, variant, default):
        with lock:
            next_version[name] += 1
            v = str(next_version[name])
            # Known before the server can serve it (a request may meet it as soon as it is in).
            versions[(name, v)] = variant
        with open(archives[variant], "rb") as f:
            data = f.read()
        t = time.perf_counter()
        s, body, _ = srv.call("POST", f"/models/{name}/versions/{v}" + ("?default=true" if default else ""),
                              data, {"content-type": "application/octet-stream"})
        with lock:
            latency.setdefault(f"upload {s}", []).append(1000 * (time.perf_counter() - t))
            if s == 201:
                installed.add((name, v))
            else:
                versions.pop((name, v), None)
                last_upload_error[0] = body[:300]
        return s

    uploads = [f"u{i}" for i in range(3)]
    for u in uploads:
        assert upload(u, "small", True) == 201
    latency.clear()  # the set-up's uploads met an idle server

    stats = Counter()
    ops = Counter()
    mismatches = []
    unexpected = []
    done = [0]
    rss = {}
    samples = []
    started = time.time()

    def count(key):
        with lock:
            stats[key] += 1

    def timed(kind, *call):
        """The call's reply; its time is kept by kind of call and status (answers and refusals apart)."""
        t = time.perf_counter()
        reply = srv.call(*call)
        with lock:
            latency.setdefault(f"{kind} {reply[0]}", []).append(1000 * (time.perf_counter() - t))
        return reply

    def check(kind, status, body, headers, variant_of):
        count(status)
        if status == 200:
            variant = variant_of(headers)
            want = reference.get(variant)
            if want is None or body != want:
                mismatches.append((kind, str(variant), headers.get("x-model-version"), len(body),
                                   body[:120].decode(errors="replace")))
        elif status not in DESIGNED:
            unexpected.append((kind, status, body[:200]))

    def failing_call(kind, rng):
        """One call of the failing handler: only its designed status (or an overload's) is right."""
        mode = rng.choice(sorted(CHAOS))
        s, body, _ = timed(kind, "POST", "/predictions/chaos", json.dumps({"mode": mode}).encode(),
                           {"content-type": "application/json"})
        count(f"{kind} {mode} {s}")
        want, word = CHAOS[mode]
        # Under load any call may reach its time limit first (504) or meet an overload.
        if not ((s == want and word in body.decode(errors="replace")) or s in DESIGNED):
            unexpected.append((f"{kind} {mode}", s, body[:200]))

    def worker(seed, until):
        rng = random.Random(seed)
        while True:
            with lock:
                if done[0] >= until:
                    return
                done[0] += 1
                n = done[0]
                if n % 500 == 0:
                    samples.append((n, round(srv.rss() / 2**20, 1)))
            r = rng.random()
            i = rng.randrange(len(reqs))
            hdr = {"content-type": "application/json"}
            op = next(name for limit, name in OPS if r < limit)
            with lock:
                ops[op] += 1
            try:
                if r < 0.74:
                    s, body, h = timed("operator", "POST", f"/predictions/{rng.choice(names)}", reqs[i], hdr)
                    check("operator", s, body, h, lambda h: ("large", i))
                elif r < 0.87:
                    u = rng.choice(uploads)
                    s, body, h = timed("uploaded", "POST", f"/predictions/{u}", reqs[i], hdr)

                    def variant_of(h, u=u):
                        v = h.get("x-model-version")
                        with lock:
                            return (versions.get((u, v)), i)
                    check("uploaded", s, body, h, variant_of)
                elif r < 0.88:
                    failing_call("failing", rng)
                elif r < 0.92:
                    with socket.create_connection(srv.addr, timeout=10) as c:
                        c.sendall(f"POST /predictions/{rng.choice(names)} HTTP/1.1\r\nhost: x\r\n"
                                  f"content-type: application/json\r\ncontent-length: {len(reqs[i])}\r\n\r\n".encode())
                        if rng.random() < 0.5:
                            c.sendall(reqs[i][: len(reqs[i]) // 2])
                        else:
                            c.sendall(reqs[i])
                elif r < 0.95:
                    u = rng.choice(uploads)
                    s = upload(u, rng.choice(["small", "large"]), rng.random() < 0.5)
                    count(f"upload {s}")
                    if s not in (201, 429, 503, 507):
                        unexpected.append(("upload", s, last_upload_error[0]))
                elif r < 0.97:
                    u = rng.choice(uploads)
                    with lock:
                        vs = sorted(v for (n2, v) in installed if n2 == u)
                    if not vs:  # every version of it deleted meanwhile (not done by this soak)
                        continue
                    s, body, _ = srv.call("PUT", f"/models/{u}/{rng.choice(vs)}/set-default")
                    count(f"set-default {s}")
                    if s not in (200, 404):  # 404: deleted meanwhile
                        unexpected.append(("set-default", s, body[:200]))
                elif r < 0.985:
                    u = rng.choice(uploads)
                    # Only versions the server confirmed, and never the last ones: the model must
                    # keep existing (its default cannot be deleted while others exist).
                    with lock:
                        vs = sorted(v for (n2, v) in installed if n2 == u)
                    if len(vs) > 2:
                        v = rng.choice(vs[:-1])
                        s, body, _ = srv.call("DELETE", f"/models/{u}/versions/{v}")
                        count(f"delete-version {s}")
                        if s == 200:
                            with lock:
                                gone.add((u, v))
                                installed.discard((u, v))
                        elif s not in (404, 409):  # 409: busy, or the default
                            unexpected.append(("delete-version", s, body[:200]))
                else:
                    s, body, _ = srv.call("DELETE", f"/models/{rng.choice(names)}")
                    count(f"unload {s}")
                    if s not in (200, 404):
                        unexpected.append(("unload", s, body[:200]))
            except (OSError, http.client.HTTPException) as e:
                unexpected.append((f"connection ({op})", f"{type(e).__name__}: {e}",
                                   f"{time.time() - started:.1f} s into the run".encode()))

    def burst(seed, calls):
        """`calls` concurrent calls of the failing handler, all at once."""
        def one(k):
            try:
                failing_call("burst", random.Random(seed + k))
            except (OSError, http.client.HTTPException) as e:
                unexpected.append(("burst connection", str(e), b""))
        return [threading.Thread(target=one, args=(k,)) for k in range(calls)]

    def run(until, seed, extra=()):
        threads = [threading.Thread(target=worker, args=(seed + k, until)) for k in range(args.concurrency)]
        threads += list(extra)
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    breakdown = {}

    def settled_rss(when):
        """RSS with the server idle (see SETTLE) and no model resident (each unloaded first,
        so the two measurements hold the same models: none), and where it is."""
        for n in names + uploads + ["chaos"]:
            s, body, _ = srv.call("DELETE", f"/models/{n}")
            if s not in (200, 404):
                unexpected.append((f"unload before measuring ({when})", s, body[:200]))
        time.sleep(SETTLE)
        breakdown[when] = srv.rss_breakdown()
        return srv.rss()

    # Warm-up: every model loaded and evicted several times over at full concurrency, with a
    # burst of failing-handler calls, so that every kind of call has met its peak concurrency
    # once before RSS is first measured (the handler instance pool keeps a slot's first pages
    # mapped once used: its first peak is a bounded cache filling, not a leak).
    warm_until = min(2000, args.requests // 5)
    run(warm_until, 0, burst(4000, args.burst))
    rss["warm"] = settled_rss("warm")
    # The rest, with the same burst again at its start.
    run(args.requests, 1000, burst(5000, args.burst))
    elapsed = time.time() - started
    rss["end"] = settled_rss("end")
    alive = srv.proc.poll() is None
    try:
        s, metrics, _ = srv.call("GET", "/metrics")
        resident = [l for l in metrics.decode().splitlines() if l.startswith("tessera_resident_models ")]
    except (OSError, http.client.HTTPException) as e:
        resident = [f"/metrics failed: {e}"]
    orphans = unpacked_orphans(work)  # while the server runs: what its upkeep left
    code = srv.stop()
    staging = os.path.join(store, ".staging")
    staged = os.listdir(staging) if os.path.isdir(staging) else []
    unpacked_dir = os.path.join(work, "unpacked")
    unpacked = sorted(os.listdir(unpacked_dir)) if os.path.isdir(unpacked_dir) else []
    partials = [u for u in unpacked if u.startswith(".partial-")]
    result = {
        "machine": os.uname().nodename + f", {os.cpu_count()} CPUs",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "models": args.models,
        "budget_mib": budget_mib,
        "seconds": round(elapsed, 1),
        "ops": dict(ops),
        "statuses": {str(k): v for k, v in stats.items()},
        "mismatches": len(mismatches),
        "mismatch_examples": mismatches[:10],
        "unexpected": [(k, str(s), b.decode(errors="replace")) for k, s, b in unexpected[:20]],
        "unexpected_count": len(unexpected),
        "unexpected_kinds": {f"{k} {s}": n for (k, s), n in Counter((k, str(s)) for k, s, _ in unexpected).items()},
        "rss_after_warmup_mib": round(rss["warm"] / 2**20, 1),
        "rss_end_mib": round(rss["end"] / 2**20, 1),
        "rss_samples_mib": samples,
        "rss_breakdown_mib": breakdown,
        "rss_growth_pct": round(100 * (rss["end"] - rss["warm"]) / max(rss["warm"], 1), 1),
        "alive_at_end": alive,
        "exit_code_on_sigterm": code,
        "resident_at_end": resident,
        "staging_left": staged,
        "partials_left": partials,
        "unpacked_dirs": len([u for u in unpacked if "." not in u]),
        "unpacked_orphans": orphans,
        "archives_in_store": len(names) + 1 + len(installed),
        "latency_ms": {k: percentiles(v) for k, v in sorted(latency.items())},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    json.dump(result, open(args.out + ".json", "w"), indent=2)
    with open(args.out + ".md", "w") as f:
        f.write("# Soak with churn (CPU)\n\n")
        f.write(f"`python bench/soak.py --requests {args.requests} --concurrency {args.concurrency}` on "
                f"{result['machine']}: {args.models} operator models of 3.5 MB weights with a budget of "
                f"{budget_mib} MiB (three fit), three uploaded models whose versions are uploaded, switched "
                "and deleted while they serve, unloads, clients that leave mid-request, and calls of a "
                f"handler that exhausts its memory or time (1 % of calls, and a burst of {args.burst} at once "
                "in the warm-up and again after it). RSS measured after the warm-up's "
                f"{warm_until} requests and after the last, "
                f"each time with every model unloaded and the server idle for {SETTLE} s.\n\n")
        f.write("| figure | value |\n|---|---|\n")
        for k in ["seconds", "mismatches", "unexpected_count", "rss_after_warmup_mib", "rss_end_mib",
                  "rss_growth_pct", "alive_at_end", "exit_code_on_sigterm", "staging_left",
                  "partials_left", "unpacked_dirs", "archives_in_store", "unpacked_orphans"]:
            f.write(f"| {k} | {result[k]} |\n")
        f.write(f"| operations | {dict(ops)} |\n| statuses | {result['statuses']} |\n")
        f.write(f"| RSS every 500 requests, under load (MiB) | {samples} |\n")
        f.write(f"| idle RSS by mapping, after warm-up / at the end (MiB) | {breakdown.get('warm')} / {breakdown.get('end')} |\n")
        f.write("\n| call | count | p50 ms | p90 ms | p99 ms | max ms |\n|---|---:|---:|---:|---:|---:|\n")
        for k, p in result["latency_ms"].items():
            f.write(f"| {k} | {p['count']} | {p.get('p50', '')} | {p.get('p90', '')} | {p.get('p99', '')} | {p.get('max', '')} |\n")
    print(json.dumps(result, indent=2))
    ok = (not mismatches and not unexpected and alive and code == 0 and not staged and not partials
          and not orphans and result["rss_growth_pct"] <= 10)
    if os.environ.get("SOAK_KEEP"):
        print(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
