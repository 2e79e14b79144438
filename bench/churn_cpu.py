#!/usr/bin/env python3
"""Residency churn on the CPU (issue 14): the soak's shape without its other churn. N copies of
the example's `model-large.pt` (3.6 MB resident each) under N names, a device budget that holds
3 of them, closed-loop clients picking a model per request (uniformly at random, as the issue's
soak did, or Zipf(1.1)), the host-memory tier off and on (`--host-memory-budget-mib`), one fresh
server per setting, the same seeded sequence of picks for each. Reports per setting: loads,
swap-ins from host memory, evictions, where each request's model came from (`x-model-tier`),
p50/p90/p99/max latency, and whether the resident bytes (`GET /models`, polled) stayed within the
budget.

    python bench/churn_cpu.py [--models 9] [--requests 3000] [--concurrency 4 32] [--out bench/results/churn_cpu]

Needs a release build and the test artifacts, as `bash scripts/test.sh` leaves them (see
bench/soak.py for TESSERA_BIN / TESSERA_ARTIFACTS).
"""
import argparse
import base64
import http.client
import io
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from soak import artifacts, pack, percentiles  # noqa: E402
import subprocess  # noqa: E402

import soak  # noqa: E402

BUDGET_MIB = 11
HOST_MIB = 64


def body():
    img = Image.new("RGB", (32, 24), (120, 40, 200))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return json.dumps({"image": base64.b64encode(buf.getvalue()).decode(), "gen_args": {"strength": 0.5}}).encode()


def picks(n_models, n, traffic, seed):
    rng = random.Random(seed)
    if traffic == "uniform":
        return [rng.randrange(n_models) for _ in range(n)]
    weights = [1 / (k + 1) ** 1.1 for k in range(n_models)]
    return rng.choices(range(n_models), weights=weights, k=n)


def run(store, work, host_mib, names, sequence, concurrency):
    srv = soak.Server(store, work, ["--memory-budget-mib", str(BUDGET_MIB), "--host-memory-budget-mib", str(host_mib)])
    host, port = srv.addr
    payload = body()
    lock = threading.Lock()
    nxt = [0]
    rows = []
    errors = Counter()
    most = [0]
    done = threading.Event()

    def client():
        conn = http.client.HTTPConnection(host, port, timeout=120)
        while True:
            with lock:
                if nxt[0] >= len(sequence):
                    return
                name = names[sequence[nxt[0]]]
                nxt[0] += 1
            t = time.perf_counter()
            conn.request("POST", f"/predictions/{name}", payload, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            ms = (time.perf_counter() - t) * 1e3
            with lock:
                if r.status != 200:
                    errors[r.status] += 1
                rows.append((ms, r.getheader("x-model-tier") or "none"))

    def watch():
        conn = http.client.HTTPConnection(host, port, timeout=30)
        while not done.is_set():
            conn.request("GET", "/models?max_results=1000")
            listed = json.loads(conn.getresponse().read())["models"]
            most[0] = max(most[0], sum(m.get("residentBytes") or 0 for m in listed))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    srv.stop()

    def total(family, extra=""):
        return int(sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                       if l.startswith(family + "{") and extra in l))
    return {
        "wall_s": round(wall, 1), "requests": len(rows), "errors": dict(errors),
        "loads": total("tessera_model_loads_total", 'outcome="ok"'),
        "swap_ins": total("tessera_model_swaps_total", 'direction="from-host"'),
        "evictions": total("tessera_model_evictions_total", 'cause="budget"'),
        "tiers": dict(Counter(t for _, t in rows)),
        "latency_ms": percentiles([ms for ms, _ in rows]),
        "max_resident_bytes": most[0], "budget_bytes": BUDGET_MIB << 20,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=9)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "churn_cpu"))
    args = ap.parse_args()
    work = tempfile.mkdtemp()
    store = os.path.join(work, "store")
    names = [f"m{k}" for k in range(args.models)]
    model = os.path.join(artifacts(), "example", "model-large.pt")
    for n in names:
        pack(store, n, model)
    results = {"machine": f"{os.cpu_count()} cores", "models": args.models, "budget_mib": BUDGET_MIB,
               "host_mib": HOST_MIB, "runs": []}
    lines = [f"{os.cpu_count()}-core CPU; {args.models} copies of example/model-large.pt (3.6 MB resident each); "
             f"device budget {BUDGET_MIB} MiB (3 models); {args.requests} requests per run, closed loop; "
             "one fresh server per run, the same seeded picks for each setting", "",
             "| traffic | conns | host tier | loads | swap-ins | evictions | tiers | p50 | p90 | p99 | max ms | "
             "req/s | most resident MB | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for traffic in ["uniform", "zipf"]:
        for conc in args.concurrency:
            sequence = picks(args.models, args.requests, traffic, seed=conc)
            for host_mib in [0, HOST_MIB]:
                w = os.path.join(work, f"w-{traffic}-{conc}-{host_mib}")
                os.makedirs(w)
                r = run(store, w, host_mib, names, sequence, conc)
                r.update({"traffic": traffic, "concurrency": conc, "host_mib": host_mib})
                results["runs"].append(r)
                lat = r["latency_ms"]
                row = (f"| {traffic} | {conc} | {'on' if host_mib else 'off'} | {r['loads']} | {r['swap_ins']} | "
                       f"{r['evictions']} | {r['tiers']} | {lat['p50']} | {lat['p90']} | {lat['p99']} | {lat['max']} | "
                       f"{r['requests'] / r['wall_s']:.0f} | {r['max_resident_bytes'] / 1e6:.1f} | {r['errors'] or 0} |")
                lines.append(row)
                print(row, flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
