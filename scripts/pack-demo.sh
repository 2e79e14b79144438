#!/usr/bin/env bash
# Packs the demo models into STORE_DIR: the example image model, and SAM, LaMa and SD2
# inpainting as their real architectures at CI size with random weights (pictures are noise),
# from the handler components and exported models that scripts/artifacts.sh leaves in
# $TESSERA_ARTIFACTS.
#
#   scripts/pack-demo.sh STORE_DIR
#
# Packs with $TESSERA_BIN (default $CARGO_TARGET_DIR/release/tessera); builds nothing itself
# (scripts/demo.sh builds first, then calls this). Archives of real weights that
# scripts/pack-model.sh put in STORE_DIR (it lists their names in STORE_DIR/.real-weights) are
# kept; every other demo archive is packed afresh.
set -euo pipefail
if [ $# -ne 1 ] || [[ $1 == -* ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
STORE="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
A="${TESSERA_ARTIFACTS:-$TARGET/artifacts}"
BIN="${TESSERA_BIN:-$TARGET/release/tessera}"

missing=()
for f in "$BIN" "$A"/handlers/{example,sam,lama,sd}.wasm "$A/example/model.pt" \
  "$A"/sam/{encoder,decoder}.pt "$A/sam/warmup.json" "$A/lama/model.pt" "$A"/sd/{sd.pt,tokenizer,warmup.json,warmup-unguided.json}; do
  [ -e "$f" ] || missing+=("$f")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "pack-demo.sh: missing (scripts/artifacts.sh builds the artifacts, cargo build --release -p tessera the binary):" >&2
  printf '  %s\n' "${missing[@]}" >&2
  exit 1
fi

mkdir -p "$STORE"

# pack NAME [tessera pack flags...]: STORE/NAME.tar.gz, unless it holds real weights.
pack() {
  local name="$1"
  shift
  if [ -e "$STORE/$name.tar.gz" ] && grep -qsx "$name" "$STORE/.real-weights"; then
    echo "==> keeping $STORE/$name.tar.gz (real weights from scripts/pack-model.sh; delete it for the demo one)"
    return
  fi
  "$BIN" pack --config "$ROOT/models/$name/model-config.yaml" "$@" \
    --handler "$A/handlers/$name.wasm" --output "$STORE/$name.tar.gz"
}

pack example --model "$A/example/model.pt"
pack sam --model "$A/sam/encoder.pt" --model "$A/sam/decoder.pt" --asset "$A/sam/warmup.json"
pack lama --model "$A/lama/model.pt"
pack sd --model "$A/sd/sd.pt" --asset "$A/sd/tokenizer" --asset "$A/sd/warmup.json" --asset "$A/sd/warmup-unguided.json"
