#!/usr/bin/env bash
# Sets up everything a fresh machine needs and runs the whole test suite.
source "$(dirname "$0")/env.sh"
bash scripts/artifacts.sh
echo "==> cargo test"
cargo test --workspace --exclude tessera-sdk --exclude tessera-handler-example --exclude tessera-handler-chaos -- --test-threads 2
