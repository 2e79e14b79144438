#!/usr/bin/env bash
# Sets up everything, packs the example model into ./model-store and serves it on
# 127.0.0.1:8080 (override with TESSERA_PORT etc.; see `tessera serve --help`).
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
