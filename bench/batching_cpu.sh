#!/usr/bin/env bash
# Throughput side by side with TorchServe on this machine's CPU (issue 15): the baseline harness
# (../shared/bench/torchserve/run.sh: JSON + base64 224x224 PNG -> normalise -> TorchScript
# classifier -> {"top1","score"}, wrk at 1/8/32 connections) and Tessera serving the same
# networks (models/classify, the baseline's seeded weights) to the same request with the same
# wrk commands, back to back, ROUNDS times alternating (TorchServe first).
#
#   bash bench/batching_cpu.sh            # full: 2 rounds, 20 s per row (~20 min)
#   ROUNDS=1 DURATION=3 WARMUP=1 bash bench/batching_cpu.sh   # smoke
#
# Tessera models: tiny and resnet18 with batchSize 1 (as the baseline's), tiny_b8 and
# resnet18_b8 with batchSize 8, maxBatchDelay 5 (the baseline's resnet18_b8); the tiny ones
# with intraOpThreads 1; resnet18_opt and resnet18_b8_opt are the resnet18 ones with
# `tessera.optimize: inference` (the same file, frozen and optimised by the host at load).
# TESSERA_MODELS picks a subset. Per row: req/s,
# p50/p99, and Tessera's server CPU time per request (utime + stime of the server process over
# the measured run, divided by the requests wrk counted). wrk, the servers and their workers
# share the cores. One request size only: the baseline's workload is a fixed 224x224 photo (other
# sizes are a 400 on both sides). The first request after each Tessera model's load is timed
# (the answer check), and a swap-in per model after each round (unload, the request again). Writes
# $WORK/results.{csv,md} and first.csv; copy them to bench/results/.
# Env: WORK (/tmp/tessera-batching), TS_HARNESS (../shared/bench/torchserve), BIN (release
# tessera), ROUNDS (2), DURATION (20), WARMUP (5), CONCURRENCY ("1 8 32").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
WORK=${WORK:-/tmp/tessera-batching}
TS_HARNESS=${TS_HARNESS:-$ROOT/../shared/bench/torchserve}
BIN=${BIN:-$CARGO_TARGET_DIR/release/tessera}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-5}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
A="$TESSERA_ARTIFACTS"
PORT=18180
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

mkdir -p "$WORK"/{store,results,ts}
[ -x "$BIN" ] || cargo build --release -p tessera
[ -e "$A/handlers/classify.wasm" ] || bash "$ROOT/scripts/artifacts.sh"

# TorchServe's venv: this project's (torch 2.11 already there) seen through a .pth file, with
# TorchServe's own packages installed beside it, so the project's venv stays as it is.
TSVENV="$WORK/ts/venv"
if [ ! -x "$TSVENV/bin/python" ]; then
  python -m venv "$TSVENV"
  python -c "import site; print(site.getsitepackages()[0])" \
    >"$("$TSVENV/bin/python" -c "import site; print(site.getsitepackages()[0])")/tessera-venv.pth"
fi

# The networks, exported once, and one archive per Tessera model.
for arch in tiny resnet18; do
  [ -e "$WORK/$arch.pt" ] || python "$ROOT/models/classify/export.py" --arch "$arch" --out "$WORK/$arch.pt"
done
pack() { # name arch batchSize [intraOpThreads] [optimize]
  local cfg="$WORK/$1.yaml" extra=""
  [ -n "${4:-}" ] && extra="\\n  intraOpThreads: $4"
  [ -n "${5:-}" ] && extra="$extra\\n  optimize: $5"
  sed "s/^batchSize: 8$/batchSize: $3/; s/^  batchable: true$/  batchable: true$extra/" \
    "$ROOT/models/classify/model-config.yaml" >"$cfg"
  "$BIN" pack --config "$cfg" --model "$WORK/$2.pt" --handler "$A/handlers/classify.wasm" \
    --output "$WORK/store/$1.tar.gz" >/dev/null
}
# tiny's forward is ~0.1 ms: one OpenMP thread (no team to wake per op, no worker spinning on
# the core wrk and the handlers need); resnet18 keeps libtorch's default (2 here).
pack tiny tiny 1 1
pack tiny_b8 tiny 8 1
pack resnet18 resnet18 1
pack resnet18_b8 resnet18 8
# The same file, frozen and optimised for inference by the host at load (tessera.optimize).
pack resnet18_opt resnet18 1 "" inference
pack resnet18_b8_opt resnet18 8 "" inference
MODELS=${TESSERA_MODELS:-"tiny tiny_b8 resnet18 resnet18_b8 resnet18_opt resnet18_b8_opt"}

CSV="$WORK/results.csv"
echo "round,model,first_request_ms" >"$WORK/first.csv"
echo "round,model,swap_in_ms,load_ms" >"$WORK/swap.csv"
echo "round,server,model,conns,rps,p50_ms,p90_ms,p99_ms,max_ms,requests,non2xx,sock_err,cpu_ms_per_req" >"$CSV"

tessera_round() { # round
  local r=$1 preload=()
  for m in $MODELS; do preload+=(--preload "$m"); done
  "$BIN" serve --model-store "$WORK/store" --port $PORT "${preload[@]}" >"$WORK/tessera-$r.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$PORT/ping" >/dev/null && break; sleep 0.5; done
  local req="$WORK/ts/models/request_224.json"
  for m in $MODELS; do
    local out ans base=${m%_opt}
    # The first request after the load (--preload), timed: it also checks the answer.
    out=$(curl -s -w '\n%{time_total}' -H 'Content-Type: application/json' --data-binary "@$req" \
      "http://127.0.0.1:$PORT/predictions/$m")
    ans=$(echo "$out" | head -1)
    echo "$r,$m,$(echo "$out" | tail -1 | awk '{printf "%.1f", $1 * 1000}')" >>"$WORK/first.csv"
    local check
    check=$(python "$ROOT/bench/classify_answer.py" "$WORK/ts/models/expected.json" "${base%_b8}" "$ans")
    log "tessera $check"
  done
  local tick; tick=$(getconf CLK_TCK)
  for m in $MODELS; do
    for c in $CONCURRENCY; do
      local t=$((c < 2 ? 1 : 2)) out="$WORK/results/tessera-r$r-${m}_c$c.txt"
      local args=(-t"$t" -c"$c" --timeout 30s -s "$TS_HARNESS/post.lua" "http://127.0.0.1:$PORT/predictions/$m")
      REQ_FILE=$req wrk -d"${WARMUP}s" "${args[@]}" >/dev/null
      local cpu0; cpu0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
      REQ_FILE=$req wrk -d"${DURATION}s" --latency "${args[@]}" >"$out"
      local cpu1; cpu1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
      local line n; line=$(grep '^RESULT' "$out"); n=$(echo "$line" | sed -E 's/.*requests=([0-9]+).*/\1/')
      local cpu; cpu=$(python -c "print(f'{($cpu1 - $cpu0) * 1000 / $tick / max($n, 1):.2f}')")
      log "tessera r$r $m c=$c $line cpu_ms_per_req=$cpu"
      echo "$line" | sed -E 's/RESULT //; s/[a-z0-9_]+=//g; s/ /,/g; s/^/'"$r,tessera,$m,$c,"'/; s/$/,'"$cpu"'/' >>"$CSV"
    done
  done
  # A swap-in per model: unloaded, then the same request again (reload from the unpacked copy,
  # timed by curl, and the server's own x-model-load-time).
  for m in $MODELS; do
    curl -s -o /dev/null -X DELETE "http://127.0.0.1:$PORT/models/$m"
    local t
    t=$(curl -s -o /dev/null -D "$WORK/swap-headers" -w '%{time_total}' -H 'Content-Type: application/json' \
      --data-binary "@$req" "http://127.0.0.1:$PORT/predictions/$m")
    local load; load=$(grep -i '^x-model-load-time:' "$WORK/swap-headers" | tr -d '\r' | awk '{print $2}')
    echo "$r,$m,$(awk -v t="$t" 'BEGIN {printf "%.1f", t * 1000}'),${load:-}" >>"$WORK/swap.csv"
    log "tessera $m swap-in: $t s (load ${load:-?} ms)"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

torchserve_round() { # round
  local r=$1
  VENV="$TSVENV" WORK="$WORK/ts" DURATION=$DURATION WARMUP=$WARMUP CONCURRENCY="$CONCURRENCY" \
    bash "$TS_HARNESS/run.sh" >"$WORK/torchserve-$r.log" 2>&1 || { tail -20 "$WORK/torchserve-$r.log"; exit 1; }
  tail -n +2 "$WORK/ts/results/results.csv" | sed "s/^/$r,torchserve,/; s/$/,/" >>"$CSV"
  log "torchserve round $r done"
}

for r in $(seq 1 "$ROUNDS"); do
  torchserve_round "$r"
  tessera_round "$r"
done

python - "$CSV" "$WORK/results.md" "$DURATION" "$WARMUP" "$WORK/first.csv" "$WORK/swap.csv" <<'EOF'
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
by = collections.defaultdict(list)
for r in rows:
    by[(r["server"], r["model"], r["conns"])].append(r)
rounds = sorted({r["round"] for r in rows})
def cell(rs, k):
    return " / ".join(f"{float(r[k]):.1f}" for r in sorted(rs, key=lambda r: r["round"]))
out = [f"wrk {sys.argv[3]} s per row after {sys.argv[4]} s of warm-up, rounds {', '.join(rounds)} shown as a / b; "
       "TorchServe first in each round.", "",
       "| model | conns | TorchServe req/s | Tessera req/s | Tessera / TorchServe (mean) | TorchServe p50 / p99 ms "
       "| Tessera p50 / p99 ms | Tessera CPU ms per request | non-2xx (TS / Tessera) |",
       "|---|---:|---:|---:|---:|---|---|---:|---|"]
pairs = [("tiny", "tiny"), ("tiny", "tiny_b8"), ("resnet18", "resnet18"), ("resnet18_b8", "resnet18_b8"),
         ("resnet18_b8", "resnet18"), ("resnet18", "resnet18_opt"), ("resnet18_b8", "resnet18_b8_opt")]
for ts_model, model in pairs:
    for c in ["1", "8", "32"]:
        t, s = by.get(("torchserve", ts_model, c)), by.get(("tessera", model, c))
        if not t or not s:
            continue
        mean = lambda rs: sum(float(r["rps"]) for r in rs) / len(rs)
        # A very short smoke run can finish no TorchServe request at all.
        ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "n/a"
        label = model if ts_model == model else f"{model} (vs TorchServe {ts_model})"
        p = lambda rs: " ; ".join(f"{float(r['p50_ms']):.1f} / {float(r['p99_ms']):.1f}" for r in rs)
        out.append(f"| {label} | {c} | {cell(t, 'rps')} | {cell(s, 'rps')} | {ratio(mean(s), mean(t))} | {p(t)} | {p(s)} "
                   f"| {cell(s, 'cpu_ms_per_req')} | {sum(int(r['non2xx']) for r in t)} / {sum(int(r['non2xx']) for r in s)} |")
first = list(csv.DictReader(open(sys.argv[5])))
out += ["", "Tessera's first request after each model's load (the answer check, curl, ms): " + "; ".join(
    f"{r['model']} {r['first_request_ms']}" + (f" (round {r['round']})" if len(rounds) > 1 else "") for r in first)]
swaps = list(csv.DictReader(open(sys.argv[6])))
out += ["", "Tessera's swap-in per model (unloaded after the round, then the same request; curl ms, server load ms): "
        + "; ".join(f"{r['model']} {r['swap_in_ms']} ({r['load_ms'] or '?'})" + (f" (round {r['round']})" if len(rounds) > 1 else "")
                    for r in swaps)]
open(sys.argv[2], "w").write("\n".join(out) + "\n")
print("\n".join(out))
EOF
