#!/usr/bin/env bash
# Sets up everything, packs the demo models into ./model-store and serves them on
# 127.0.0.1:8080 (override with TESSERA_PORT etc.; see `tessera serve --help`): the example
# image model, and SAM, LaMa and SD2 inpainting with tiny random weights (export real weights
# with models/sam/export.py --checkpoint, models/lama/export.py --checkpoint and
# models/sd/export.py --pretrained for real results).
source "$(dirname "$0")/env.sh"
bash scripts/artifacts.sh
echo "==> building tessera (release)"
cargo build -q --release -p tessera
BIN="$CARGO_TARGET_DIR/release/tessera"
mkdir -p model-store
"$BIN" pack --config models/example/model-config.yaml \
  --model "$TESSERA_ARTIFACTS/example/model.pt" \
  --handler "$TESSERA_ARTIFACTS/handlers/example.wasm" \
  --output model-store/example.tar.gz
"$BIN" pack --config models/sam/model-config.yaml \
  --model "$TESSERA_ARTIFACTS/sam/encoder.pt" --model "$TESSERA_ARTIFACTS/sam/decoder.pt" \
  --handler "$TESSERA_ARTIFACTS/handlers/sam.wasm" --output model-store/sam.tar.gz
"$BIN" pack --config models/lama/model-config.yaml \
  --model "$TESSERA_ARTIFACTS/lama/model.pt" \
  --handler "$TESSERA_ARTIFACTS/handlers/lama.wasm" --output model-store/lama.tar.gz
"$BIN" pack --config models/sd/model-config.yaml \
  --model "$TESSERA_ARTIFACTS/sd/sd.pt" --asset "$TESSERA_ARTIFACTS/sd/tokenizer" \
  --asset "$TESSERA_ARTIFACTS/sd/warmup.json" \
  --handler "$TESSERA_ARTIFACTS/handlers/sd.wasm" --output model-store/sd.tar.gz
cat <<TXT
==> try it:
  python3 - <<'PY'
import base64, json, urllib.request, io
png = open('some.png', 'rb').read()   # any PNG or JPEG
body = json.dumps({"image": base64.b64encode(png).decode(), "gen_args": json.dumps({"strength": 0.8})}).encode()
r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:${TESSERA_PORT:-8080}/predictions/example', body, {'content-type': 'application/json'}))
open('out.png', 'wb').write(base64.b64decode(json.load(r)['generated_image']))
PY
TXT
exec "$BIN" serve --model-store model-store
