#!/usr/bin/env bash
# Proves that scripts/env.sh installs what a fresh machine lacks: runs it against a scratch
# rustup home holding this machine's Rust toolchain without the wasm32-wasip2 target (files
# hard-linked, metadata copied, so the real toolchain is never touched) and checks that the
# target is there afterwards. Run by scripts/test.sh, so CI turns red if env.sh stops
# installing the target.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
real_home="${RUSTUP_HOME:-$HOME/.rustup}"
toolchain="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")"
host="$(rustc -vV | sed -n 's/^host: //p')"
src="$(readlink -f "$real_home/toolchains/$toolchain-$host")"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

mkdir -p "$scratch/toolchains"
cp "$real_home/settings.toml" "$scratch/" 2>/dev/null || true
dst="$scratch/toolchains/$toolchain-$host"
cp -al "$src" "$dst"
meta="$dst/lib/rustlib"
# rustup rewrites these when it adds a target: give the copy files of its own.
for f in "$meta"/components "$meta"/manifest-* "$meta"/multirust-* "$meta"/rust-installer-version; do
  [ -f "$f" ] && { cp "$f" "$f.own"; mv "$f.own" "$f"; }
done
rm -rf "$meta/wasm32-wasip2" "$meta/manifest-rust-std-wasm32-wasip2"
grep -v '^rust-std-wasm32-wasip2$' "$meta/components" > "$meta/components.own" || true
mv "$meta/components.own" "$meta/components"
# rustup's own record of installed components: drop the target's [[components]] entry.
awk 'BEGIN { RS = "\n\n"; ORS = "\n\n" } !/target = "wasm32-wasip2"/' \
  "$meta/multirust-config.toml" > "$meta/multirust-config.toml.own"
mv "$meta/multirust-config.toml.own" "$meta/multirust-config.toml"

export RUSTUP_HOME="$scratch"
if rustup target list --installed --toolchain "$toolchain" | grep -qx wasm32-wasip2; then
  echo "check-setup: could not remove the target from the scratch toolchain" >&2
  exit 1
fi
(source "$ROOT/scripts/env.sh" >/dev/null)
if ! rustup target list --installed --toolchain "$toolchain" | grep -qx wasm32-wasip2; then
  echo "check-setup: FAILED: scripts/env.sh did not install the wasm32-wasip2 target on a toolchain without it" >&2
  exit 1
fi
echo "check-setup: env.sh installed wasm32-wasip2 on a toolchain that lacked it"

# A plain `cargo build` without libtorch stops before torch-sys's build script, saying what to
# run: the rustc wrapper's check, as cargo would call it for that build script.
out="$(env -u LIBTORCH_USE_PYTORCH LIBTORCH=/nonexistent "$ROOT/scripts/cargo-rustc" rustc \
  --crate-name build_script_build --edition=2021 /x/torch-sys-0.24.0/build.rs 2>&1)" && {
  echo "check-setup: FAILED: the rustc wrapper let a build without libtorch through" >&2
  exit 1
}
grep -q "scripts/setup.sh" <<<"$out" || {
  echo "check-setup: FAILED: the rustc wrapper's message does not say what to run: $out" >&2
  exit 1
}
echo "check-setup: a cargo build without libtorch stops at once: ${out%%$'\n'*}"
