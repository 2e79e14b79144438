#!/usr/bin/env bash
# Sets up everything, packs the demo models into ./model-store and serves them on
# 127.0.0.1:8080 (override with TESSERA_PORT etc.; see `tessera serve --help`): the example
# image model, and SAM, LaMa and SD2 inpainting with tiny random weights (scripts/pack-model.sh
# packs the official weights into ./model-store instead; demo.sh then leaves those alone).
source "$(dirname "$0")/env.sh"
bash scripts/artifacts.sh
echo "==> building tessera (release)"
cargo build -q --release -p tessera
BIN="$CARGO_TARGET_DIR/release/tessera"
TESSERA_BIN="$BIN" bash scripts/pack-demo.sh model-store
port="${TESSERA_PORT:-8080}"
echo "==> serving ./model-store on 127.0.0.1:$port: try the clients in README.md, section Clients" \
  "(TESSERA_URL=http://127.0.0.1:$port, a photo.png)"
exec "$BIN" serve --model-store model-store
