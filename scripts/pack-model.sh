#!/usr/bin/env bash
# Turns a model family's official weights, downloaded elsewhere, into an archive in the model
# store (exports with models/FAMILY/export.py, packs with `tessera pack`):
#
#   scripts/pack-model.sh sam  sam_vit_h_4b8939.pth                  # Segment Anything checkpoint
#   scripts/pack-model.sh lama big-lama/models/best.ckpt             # LaMa big-lama checkpoint
#   scripts/pack-model.sh sd   stable-diffusion-2-inpainting/         # save_pretrained folder
#
# Options: --store DIR (default ./model-store, which scripts/demo.sh serves), --name NAME (default
# the family; the archive is DIR/NAME.tar.gz, served as /predictions/NAME). Any other flag goes
# to export.py after the defaults, e.g. --variant vit_b (sam; vit_h by default, or the variant the
# checkpoint's file name says), --encoder-dtype bfloat16 (sam, GPU serving), --fp16 (lama, sd),
# --device cuda (sd). Sets up and builds what is missing (scripts/env.sh, the family's handler,
# the release binary unless TESSERA_BIN names one).
set -euo pipefail
usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit "${1:-2}"
}
case "${1:-}" in -h | --help) usage 0 ;; esac
[ $# -ge 2 ] || usage
family="$1"
src="$2"
shift 2
case "$family" in
  sam | lama | sd) ;;
  *) echo "pack-model.sh: unknown family '$family' (sam, lama or sd)" >&2; usage ;;
esac
[ -e "$src" ] || { echo "pack-model.sh: $src does not exist" >&2; exit 1; }
src="$(cd "$(dirname "$src")" && pwd)/$(basename "$src")"
store=""
name="$family"
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --store) store="${2:?--store needs a directory}"; shift 2 ;;
    --name) name="${2:?--name needs a name}"; shift 2 ;;
    *) extra+=("$1"); shift ;;
  esac
done
# The server's rule for model names (store::validate_name), checked before a long export.
if ! [[ $name =~ ^[A-Za-z0-9_][A-Za-z0-9._-]*$ ]] || [ "${#name}" -gt 64 ]; then
  echo "pack-model.sh: '$name' is not a model name (letters, digits, . _ -)" >&2
  exit 2
fi
# Relative to where the command was run, before env.sh moves to the repository root.
[ -z "$store" ] || { mkdir -p "$store" && store="$(cd "$store" && pwd)"; }

source "$(dirname "$0")/env.sh"
store="${store:-$ROOT/model-store}"

echo "==> building the $family handler"
cargo build -q --profile guest --target wasm32-wasip2 -p "tessera-handler-$family"
handler="$CARGO_TARGET_DIR/wasm32-wasip2/guest/tessera_handler_$family.wasm"
BIN="${TESSERA_BIN:-}"
if [ -z "$BIN" ]; then
  echo "==> building tessera (release)"
  cargo build -q --release -p tessera
  BIN="$CARGO_TARGET_DIR/release/tessera"
fi

tmp="$(mktemp -d)"
staging=""
trap 'rm -rf "$tmp" ${staging:+"$staging"}' EXIT
echo "==> exporting $family from $src"
case "$family" in
  sam)
    variant=vit_h
    case "$(basename "$src")" in
      *vit_b*) variant=vit_b ;;
      *vit_l*) variant=vit_l ;;
    esac
    python models/sam/export.py --checkpoint "$src" --variant "$variant" --out-dir "$tmp" \
      ${extra[@]+"${extra[@]}"}
    files=(--model "$tmp/encoder.pt" --model "$tmp/decoder.pt" --asset "$tmp/warmup.json")
    ;;
  lama)
    python models/lama/export.py --checkpoint "$src" --out "$tmp/model.pt" ${extra[@]+"${extra[@]}"}
    files=(--model "$tmp/model.pt")
    ;;
  sd)
    python models/sd/export.py --pretrained "$src" --out-dir "$tmp" ${extra[@]+"${extra[@]}"}
    files=(--model "$tmp/sd.pt" --asset "$tmp/tokenizer" --asset "$tmp/warmup.json" --asset "$tmp/warmup-unguided.json")
    ;;
esac

# Packed next to its destination and renamed into place, so a running server never sees half
# an archive.
mkdir -p "$store"
staging="$(mktemp -d "$store/.pack-model.XXXXXX")"
"$BIN" pack --config "models/$family/model-config.yaml" "${files[@]}" --handler "$handler" \
  --output "$staging/$name.tar.gz"
mv -f "$staging/$name.tar.gz" "$store/$name.tar.gz"
# scripts/pack-demo.sh (demo.sh) leaves archives named here alone.
grep -qsx "$name" "$store/.real-weights" || echo "$name" >>"$store/.real-weights"
echo "==> $store/$name.tar.gz: serve with \`tessera serve --model-store $store\` (or scripts/demo.sh), call POST /predictions/$name"
