#!/usr/bin/env bash
# Sets up everything a fresh machine needs and runs the whole test suite.
source "$(dirname "$0")/env.sh"
# The README's shell clients (run by tests/readme.rs) use curl and jq.
for tool in curl jq; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "==> installing $tool (the README's shell clients use it)"
      (apt-get install -y -qq "$tool" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$tool"; }) >/dev/null
    else
      echo "tessera: the test suite needs '$tool' (the README's shell clients use it): install it" >&2
      exit 1
    fi
  fi
done
echo "==> set-up check: env.sh installs the wasm32-wasip2 target where it is missing"
bash scripts/check-setup.sh
bash scripts/artifacts.sh
echo "==> python tests (export scripts, checkpoint layouts)"
python -m pytest -q models
echo "==> cargo test"
cargo test -p tessera -p tessera-sdk -p tessera-imaging -p tessera-handler-sd -- --test-threads 2
echo "==> fuzz targets (fuzz/README.md), ${FUZZ_SECONDS:-10} s each from their committed seeds"
bash fuzz/run.sh "${FUZZ_SECONDS:-10}"
