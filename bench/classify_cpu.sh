#!/usr/bin/env bash
# Tessera's server CPU per request on the `tiny` classifier (issue 15's "≤ 1.0 ms" target), for
# one or more builds of the classify handler side by side: each handler packed into its own
# `tiny` archive (batchSize 1, one intra-op thread, as bench/batching_cpu.sh packs it), one
# server, wrk at each connection count, rounds alternating between the handlers. CPU per
# request = the server's utime + stime over the measured run / the requests wrk counted. The
# request is the baseline's (../shared/bench/torchserve/make_models.py: request_224.json).
#
#   bash bench/classify_cpu.sh NAME=HANDLER.wasm [NAME=HANDLER.wasm ...]
#
# Env: WORK (/tmp/tessera-classify-cpu), BIN (release tessera), ROUNDS (2), DURATION (15),
# WARMUP (3), CONCURRENCY ("1 8 32"), OUT (print only when unset: a markdown table there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"
WORK=${WORK:-/tmp/tessera-classify-cpu}
TS_HARNESS=${TS_HARNESS:-$ROOT/../shared/bench/torchserve}
BIN=${BIN:-$CARGO_TARGET_DIR/release/tessera}
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-15}
WARMUP=${WARMUP:-3}
CONCURRENCY=${CONCURRENCY:-"1 8 32"}
PORT=18181
[ $# -ge 1 ] || { echo "usage: $0 NAME=HANDLER.wasm ..." >&2; exit 2; }

mkdir -p "$WORK/store" "$WORK/models"
[ -e "$WORK/models/request_224.json" ] || python "$TS_HARNESS/make_models.py" "$WORK/models" >/dev/null
[ -e "$WORK/tiny.pt" ] || python "$ROOT/models/classify/export.py" --arch tiny --out "$WORK/tiny.pt"
sed "s/^batchSize: 8$/batchSize: 1/; s/^  batchable: true$/  batchable: true\n  intraOpThreads: 1/" \
  "$ROOT/models/classify/model-config.yaml" >"$WORK/tiny.yaml"
NAMES=()
for spec in "$@"; do
  name=${spec%%=*}; NAMES+=("$name")
  "$BIN" pack --config "$WORK/tiny.yaml" --model "$WORK/tiny.pt" --handler "${spec#*=}" \
    --output "$WORK/store/$name.tar.gz" >/dev/null
done

"$BIN" serve --model-store "$WORK/store" --port $PORT >"$WORK/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$PORT/ping" >/dev/null && break; sleep 0.5; done
req="$WORK/models/request_224.json"
for name in "${NAMES[@]}"; do
  ans=$(curl -s -H 'Content-Type: application/json' --data-binary "@$req" "http://127.0.0.1:$PORT/predictions/$name")
  echo -n "$name: "
  python "$ROOT/bench/classify_answer.py" "$WORK/models/expected.json" tiny "$ans"
done

tick=$(getconf CLK_TCK)
rows="$WORK/rows.csv"
echo "round,handler,conns,rps,p50_ms,p99_ms,requests,cpu_ms_per_req" >"$rows"
for r in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCY; do
    for name in "${NAMES[@]}"; do
      t=$((c < 2 ? 1 : 2))
      args=(-t"$t" -c"$c" --timeout 30s -s "$TS_HARNESS/post.lua" "http://127.0.0.1:$PORT/predictions/$name")
      REQ_FILE=$req wrk -d"${WARMUP}s" "${args[@]}" >/dev/null
      cpu0=$(awk '{print $14 + $15}' "/proc/$pid/stat")
      line=$(REQ_FILE=$req wrk -d"${DURATION}s" --latency "${args[@]}" | grep '^RESULT')
      cpu1=$(awk '{print $14 + $15}' "/proc/$pid/stat")
      python - "$r" "$name" "$c" "$line" "$cpu0" "$cpu1" "$tick" >>"$rows" <<'EOF'
import sys
r, name, c, line, cpu0, cpu1, tick = sys.argv[1:]
f = dict(kv.split("=") for kv in line.split()[1:])
n = max(int(f["requests"]), 1)
cpu = (float(cpu1) - float(cpu0)) * 1000 / float(tick) / n
print(f"{r},{name},{c},{f['rps']},{f['p50_ms']},{f['p99_ms']},{f['requests']},{cpu:.3f}")
EOF
      tail -1 "$rows"
    done
  done
done

python - "$rows" "${OUT:-}" "$DURATION" "$(nproc)" <<'EOF'
import csv, sys, collections
rows = list(csv.DictReader(open(sys.argv[1])))
by = collections.defaultdict(list)
for r in rows:
    by[(r["handler"], int(r["conns"]))].append(r)
lines = [f"Tessera alone, `tiny` (batchSize 1, one intra-op thread), wrk {sys.argv[3]} s per row, "
         f"{sys.argv[4]} cores shared by wrk and the server; rounds shown a / b.", "",
         "| handler | conns | req/s | p50 / p99 ms | server CPU ms per request |", "|---|---:|---|---|---|"]
for (name, c), rs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    lines.append(f"| {name} | {c} | {' / '.join(r['rps'] for r in rs)} | "
                 f"{' ; '.join(r['p50_ms'] + ' / ' + r['p99_ms'] for r in rs)} | "
                 f"{' / '.join(r['cpu_ms_per_req'] for r in rs)} |")
text = "\n".join(lines) + "\n"
print(text)
if sys.argv[2]:
    open(sys.argv[2], "w").write(text)
EOF
