# Sourced by the other scripts: a project-local Python venv with torch 2.11.0 (libtorch for tch)
# and the build environment pointing at it. Override locations with TESSERA_VENV and
# CARGO_TARGET_DIR (CI keeps both in a cache outside the checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TESSERA_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"

stamp="$VENV/.tessera-requirements"
wanted="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt")"
if [ ! -x "$VENV/bin/python" ] || [ "$wanted" != "$(cat "$stamp" 2>/dev/null)" ]; then
  echo "==> setting up Python venv at $VENV (torch 2.11.0; first time takes a while)"
  "$PY_BOOT" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements-nodeps.txt"
  printf '%s' "$wanted" > "$stamp"
fi

export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
export TESSERA_ARTIFACTS="${TESSERA_ARTIFACTS:-$CARGO_TARGET_DIR/artifacts}"
export TESSERA_PYTHON="$VENV/bin/python"
# rustup reads rust-toolchain.toml and installs Rust 1.95 + wasm32-wasip2 on first use.
cd "$ROOT"
