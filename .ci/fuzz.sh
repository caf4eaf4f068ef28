#!/usr/bin/env bash
# CI fuzz pass: builds the cargo-fuzz targets of fuzz/ (libFuzzer) and runs each for a bounded
# time from its checked-in seed corpus; any crash (a panic, a failed property) fails the pass and
# leaves the input in fuzz/artifacts/TARGET/. Installs cargo-fuzz if it is missing.
#
#   bash .ci/fuzz.sh                  every target, FUZZ_SECS (20) each
#   FUZZ_SECS=600 FUZZ_TARGETS=sse bash .ci/fuzz.sh   a longer session of one (see fuzz/README.md)
#
# Time (2 shared cores, load ~9): 5 x ~22 s of fuzzing; the build is what costs: ~3 min when
# only tollgate changed, ~40 min cold (cargo-fuzz instruments every dependency: cache fuzz/target).
#
# The stable toolchain runs it: cargo-fuzz passes nightly-only flags, which RUSTC_BOOTSTRAP=1
# allows. No sanitizer (`-s none`): the crate forbids unsafe code, so what is hunted is panics,
# overflows (debug assertions and overflow checks are on, `-a`) and the targets' properties;
# AddressSanitizer would only slow the build and each run.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECS=${FUZZ_SECS:-20}
TARGETS=${FUZZ_TARGETS:-sse usage_json keys path_normalize config}
export RUSTC_BOOTSTRAP=1
# Its own target directory (instrumented builds never share artifacts with the normal ones).
export CARGO_TARGET_DIR="$PWD/target"

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo ".ci/fuzz.sh: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi

start=$SECONDS
cargo fuzz build -s none -a
echo ".ci/fuzz.sh: built the targets in $((SECONDS - start)) s"

failed=()
for t in $TARGETS; do
  # New inputs go to a scratch directory under target/; the checked-in seeds are only read.
  scratch="$CARGO_TARGET_DIR/corpus/$t"
  mkdir -p "$scratch"
  t0=$SECONDS
  if cargo fuzz run -s none -a "$t" "$scratch" "corpus/$t" -- \
    -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$CARGO_TARGET_DIR/fuzz-$t.log" 2>&1; then
    echo ".ci/fuzz.sh: $t: no crash in $((SECONDS - t0)) s ($(grep -o 'stat::number_of_executed_units: *[0-9]*' "$CARGO_TARGET_DIR/fuzz-$t.log" | grep -o '[0-9]*$' || echo '?') runs)"
  else
    echo ".ci/fuzz.sh: $t FAILED; the end of its log:" >&2
    # (cut: cargo-fuzz prints the failing input as one line of bytes)
    grep -a -A3 'panicked at' "$CARGO_TARGET_DIR/fuzz-$t.log" | cut -c1-400 >&2 || true
    grep -a -E '^(Failing input|Reproduce with)' -A2 "$CARGO_TARGET_DIR/fuzz-$t.log" | cut -c1-400 >&2 || true
    failed+=("$t")
  fi
done
echo ".ci/fuzz.sh: $((SECONDS - start)) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo ".ci/fuzz.sh: crashes in: ${failed[*]} (inputs in fuzz/artifacts/; reproduce with RUSTC_BOOTSTRAP=1 cargo fuzz run -s none -a TARGET fuzz/artifacts/TARGET/crash-...)" >&2
  exit 1
fi
