#!/usr/bin/env bash
# Sets up everything a fresh machine needs and runs the whole test suite.
source "$(dirname "$0")/env.sh"
bash scripts/artifacts.sh
echo "==> python tests (export scripts, checkpoint layouts)"
python -m pytest -q models
echo "==> cargo test"
cargo test -p tessera -p tessera-sdk -p tessera-handler-sd -- --test-threads 2
