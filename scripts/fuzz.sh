#!/usr/bin/env bash
# Fuzzes every decoder and parser (tests/fuzz, RFD 0009) with libFuzzer.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]   each target (default: all) for SECONDS
#                                           (default 60), with coverage instrumentation
#   scripts/fuzz.sh --smoke [SECONDS]       CI's pass: built without instrumentation
#                                           (sharing the release build), the seed corpus
#                                           replayed and a few seconds (default 3) of
#                                           random inputs per target
#
# The instrumented build passes rustc the flags cargo-fuzz passes
# (-Cpasses=sancov-module and libFuzzer's coverage options), so it runs on the
# stable toolchain; `cargo fuzz run TARGET --fuzz-dir tests/fuzz` works too
# where cargo-fuzz and a nightly toolchain are installed. New inputs go to
# target/fuzz/corpus/TARGET (the committed seeds in tests/fuzz/corpus are only
# read); crashes go to target/fuzz/artifacts/. Each run prints libFuzzer's
# final line: executions, coverage (cov) and features (ft).
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=false
if [ "${1:-}" = "--smoke" ]; then
  smoke=true
  shift
  seconds=${1:-3}
  shift || true
else
  seconds=${1:-60}
  shift || true
fi
manifest=tests/fuzz/Cargo.toml
all=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$manifest" | grep -v '^grantline-fuzz$')
targets=${*:-$all}

if $smoke; then
  cargo build --release --locked --manifest-path "$manifest" --target-dir target --bins
  bins=target/release
else
  # An explicit --target keeps RUSTFLAGS off build scripts and proc macros,
  # which run on the host without libFuzzer (as cargo-fuzz does).
  host=$(rustc -vV | sed -n 's/^host: //p')
  export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
  cargo build --release --locked --manifest-path "$manifest" --target-dir target/fuzz --target "$host" --bins
  bins=target/fuzz/$host/release
fi

mkdir -p target/fuzz/artifacts
failed=()
for t in $targets; do
  corpus=target/fuzz/corpus/$t
  mkdir -p "$corpus"
  log=target/fuzz/$t.log
  echo "fuzz: $t for ${seconds}s" >&2
  if "$bins/$t" "$corpus" "tests/fuzz/corpus/$t" \
    -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -max_len=70000 \
    -artifact_prefix="target/fuzz/artifacts/$t-" -print_final_stats=1 >"$log" 2>&1; then
    grep -E '^(#[0-9]+.*DONE|Done [0-9]+ runs|stat::number_of_executed_units)' "$log" | tail -2 | sed "s/^/fuzz: $t: /" >&2 || true
  else
    echo "fuzz: $t FAILED; see $log and target/fuzz/artifacts/" >&2
    tail -30 "$log" >&2
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: $(echo "$targets" | wc -w) targets ran clean"
