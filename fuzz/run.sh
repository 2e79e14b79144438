#!/usr/bin/env bash
# Builds the fuzz targets (cargo fuzz: libFuzzer with AddressSanitizer, on the project's pinned
# toolchain) and runs each for SECONDS (default 10) from its committed seeds (fuzz/seeds/) and a
# scratch corpus; a crash fails the run and leaves its input under
# <crate>/fuzz/artifacts/<target>/ with the run's log beside it (replay it from <crate> with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run -O --target-dir "$CARGO_TARGET_DIR/fuzz-<sdk|host>" TARGET FILE`).
#
#   bash fuzz/run.sh [SECONDS] [TARGET ...]      # after `source scripts/env.sh`
#
# FUZZ_CORPUS=DIR keeps the corpora there (default: a temporary folder, removed after),
# FUZZ_JOBS=N runs N processes per target (libFuzzer -fork), FUZZ_BUILD_ONLY=1 builds only.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
seconds="${1:-10}"
shift || true
case "$seconds" in
  '' | *[!0-9]*) echo "fuzz/run.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2 ;;
esac
sdk_targets=(request_json base64 image_decode clip_tokenizer)
host_targets=(archive_unpack model_config tenants_file guest_tensors)
wanted=("$@")
[ ${#wanted[@]} -gt 0 ] || wanted=("${sdk_targets[@]}" "${host_targets[@]}")

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz (from crates.io)"
  cargo install -q --locked cargo-fuzz@0.13.2
fi
# cargo fuzz passes nightly-only flags (-Zsanitizer); the pinned stable toolchain takes them
# with RUSTC_BOOTSTRAP, so no second toolchain is needed.
export RUSTC_BOOTSTRAP=1
mkdir -p "${CARGO_TARGET_DIR:-target}"
target_root="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)"

crate_of() {
  case " ${sdk_targets[*]} " in *" $1 "*) echo guest-handlers/sdk ;; *) echo host ;; esac
}
# The host's fuzz binaries link libtorch (through the tessera crate) without its rpath.
for t in "${wanted[@]}"; do
  if [ "$(crate_of "$t")" = host ]; then
    torch_lib="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    break
  fi
done
built=""
scratch=""
if [ -n "${FUZZ_CORPUS:-}" ]; then
  mkdir -p "$FUZZ_CORPUS"
  corpus_root="$(cd "$FUZZ_CORPUS" && pwd)"
else
  scratch="$(mktemp -d)"
  corpus_root="$scratch"
fi
trap '[ -z "$scratch" ] || rm -rf "$scratch"' EXIT
for t in "${wanted[@]}"; do
  crate="$(crate_of "$t")"
  case " ${sdk_targets[*]} ${host_targets[*]} " in *" $t "*) ;; *) echo "fuzz/run.sh: no target '$t'" >&2; exit 2 ;; esac
  dir="$target_root/fuzz-$(basename "$crate")"
  if [[ " $built " != *" $crate "* ]]; then
    echo "==> building the fuzz targets of $crate"
    log="$corpus_root/build-$(basename "$crate").log"
    if ! (cd "$crate" && cargo fuzz build -O --target-dir "$dir") >"$log" 2>&1; then
      tail -30 "$log" >&2
      echo "fuzz/run.sh: building $crate's fuzz targets failed" >&2
      exit 1
    fi
    built="$built $crate"
  fi
  [ -n "${FUZZ_BUILD_ONLY:-}" ] && continue
  mkdir -p "$corpus_root/$t"
  echo "==> fuzzing $t for ${seconds}s"
  log="$corpus_root/$t.log"
  if ! (cd "$crate" && cargo fuzz run -O --target-dir "$dir" "$t" "$corpus_root/$t" "$root/fuzz/seeds/$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=20 ${FUZZ_JOBS:+-fork=$FUZZ_JOBS -ignore_crashes=0 -ignore_timeouts=0 -ignore_ooms=0} \
    -print_final_stats=1) >"$log" 2>&1; then
    mkdir -p "$crate/fuzz/artifacts"
    cp "$log" "$crate/fuzz/artifacts/$t.log"
    grep -E -A12 'panicked|==[0-9]+== ?ERROR|fuzz target exited' "$log" | head -30 >&2 || tail -30 "$log" >&2
    grep -E 'Test unit written|^Base64:' "$log" >&2 || true
    echo "fuzz/run.sh: $t failed; its input and log are under $crate/fuzz/artifacts/" >&2
    exit 1
  fi
  grep -E '^Done|stat::number_of_executed_units|stat::peak_rss_mb' "$log" || true
done
