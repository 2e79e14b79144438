#!/usr/bin/env bash
# Sets up this machine for building Tessera and nothing else: checks prerequisites, adds the
# Rust target and components, creates the project venv with torch 2.11.0 and links .libtorch
# to it (so that a plain `cargo build -p tessera` works from any shell afterwards).
source "$(dirname "$0")/env.sh"
echo "==> set up: cargo build -p tessera (or bash scripts/demo.sh, bash scripts/test.sh)"
