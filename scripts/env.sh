# Sourced by the other scripts: checks what a build needs, installs what it can (the Rust
# toolchain's wasm32-wasip2 target and components, a project-local Python venv with torch 2.11.0
# for tch), and points the build environment at it. Override locations with TESSERA_VENV and
# CARGO_TARGET_DIR (CI keeps both in a cache outside the checkout).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TESSERA_VENV:-$ROOT/.venv}"
PY_BOOT="${PYTHON:-python3}"
cd "$ROOT"

# One clear line per missing prerequisite, all of them at once, before anything is built.
missing=()
need() { missing+=("$1"); }

command -v cargo >/dev/null 2>&1 && command -v rustup >/dev/null 2>&1 \
  || need "Rust via rustup (https://rustup.rs): this project pins Rust 1.95 in rust-toolchain.toml"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || need "a C++17 compiler (g++ or clang++): the host builds a small C++ shim against libtorch (Debian: apt install g++)"
if ! command -v "$PY_BOOT" >/dev/null 2>&1; then
  need "Python 3.10-3.13 as '$PY_BOOT' (set PYTHON=... to use another): torch 2.11.0 wheels need it"
else
  pyver="$("$PY_BOOT" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  case "$pyver" in
    3.10|3.11|3.12|3.13) ;;
    *) need "Python 3.10-3.13 (found $pyver at $(command -v "$PY_BOOT"); set PYTHON=... to another)" ;;
  esac
  if [ ! -x "$VENV/bin/python" ] && ! "$PY_BOOT" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    need "python3 -m venv with pip (Debian: apt install python3-venv)"
  fi
fi
# Node.js builds the JavaScript handler components (componentize-js, from npm).
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Node.js and npm (JavaScript handlers are built with them)"
    (apt-get install -y -qq nodejs npm >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq nodejs npm >/dev/null; }) || true
  fi
  command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 \
    || need "Node.js 18+ with npm (Debian: apt install nodejs npm): JavaScript handlers are built with it"
fi
# The venv (~5 GiB with torch and its CUDA libraries) and a cold target dir (~12 GiB).
free_gib() { df -Pk "$1" 2>/dev/null | awk 'NR==2 {print int($4 / 1048576)}'; }
probe="$VENV"; while [ ! -d "$probe" ]; do probe="$(dirname "$probe")"; done
if [ ! -x "$VENV/bin/python" ] && [ "$(free_gib "$probe")" -lt 8 ]; then
  need "8 GiB free for the Python venv at $VENV (found $(free_gib "$probe") GiB; set TESSERA_VENV to elsewhere)"
fi
target="${CARGO_TARGET_DIR:-$ROOT/target}"
probe="$target"; while [ ! -d "$probe" ]; do probe="$(dirname "$probe")"; done
if [ ! -d "$target/debug" ] && [ ! -d "$target/release" ] && [ "$(free_gib "$probe")" -lt 15 ]; then
  need "15 GiB free for cargo's target dir at $target (found $(free_gib "$probe") GiB; set CARGO_TARGET_DIR)"
fi
if [ "${#missing[@]}" -gt 0 ]; then
  echo "tessera: cannot set up this machine; missing:" >&2
  printf '  - %s\n' "${missing[@]}" >&2
  exit 1
fi

# rustup installs the toolchain file's targets and components only when it installs the
# toolchain itself; where Rust 1.95 is already present they must be added here.
toolchain="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)"
rustup toolchain list | grep -q "^$toolchain" || rustup toolchain install "$toolchain" --profile minimal
installed_targets="$(rustup target list --installed --toolchain "$toolchain")"
grep -qx wasm32-wasip2 <<<"$installed_targets" || {
  echo "==> adding the wasm32-wasip2 target to Rust $toolchain (handlers are built for it)"
  rustup target add --toolchain "$toolchain" wasm32-wasip2
}
installed_components="$(rustup component list --installed --toolchain "$toolchain")"
for c in rustfmt clippy; do
  grep -q "^$c" <<<"$installed_components" || rustup component add --toolchain "$toolchain" "$c"
done

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

# componentize-js and its dependencies, pinned by guest-handlers/js/package-lock.json.
js="$ROOT/guest-handlers/js"
if ! cmp -s "$js/package-lock.json" "$js/node_modules/.tessera-lock" 2>/dev/null; then
  echo "==> installing componentize-js from npm (builds JavaScript handlers)"
  (cd "$js" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  cp "$js/package-lock.json" "$js/node_modules/.tessera-lock"
fi

# .cargo/config.toml points plain cargo builds (no env.sh) at this link.
torch_dir="$(ls -d "$VENV"/lib/python3.*/site-packages/torch 2>/dev/null | head -1)"
if [ -n "$torch_dir" ] && [ "$(readlink "$ROOT/.libtorch" 2>/dev/null)" != "$torch_dir" ]; then
  ln -sfn "$torch_dir" "$ROOT/.libtorch"
fi

export PATH="$VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
export CARGO_TARGET_DIR="$target"
export TESSERA_ARTIFACTS="${TESSERA_ARTIFACTS:-$CARGO_TARGET_DIR/artifacts}"
export TESSERA_PYTHON="$VENV/bin/python"

# On a machine with an NVIDIA GPU, say whether the driver can run the CUDA 13 libtorch.
if command -v nvidia-smi >/dev/null 2>&1; then
  driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)"
  major="${driver%%.*}"
  if [ -z "$driver" ]; then
    echo "==> nvidia-smi found but no GPU answered: models will run on the CPU"
  elif [ "$major" -lt 580 ] 2>/dev/null; then
    echo "==> NVIDIA driver $driver is older than CUDA 13 needs (>= 580): models will run on the CPU"
  else
    echo "==> NVIDIA driver $driver: models will run on cuda:0"
  fi
fi
