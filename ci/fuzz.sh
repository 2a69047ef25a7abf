#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 60), starting from
# the saved inputs in fuzz/regressions/<target>/. A crash leaves its input in
# fuzz/artifacts/<target>/: copy it into fuzz/regressions/<target>/ once
# fixed, and the stable test crates/kiln-cli/tests/fuzz_regressions.rs keeps
# replaying it.
#
#   ci/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
shift || true

if ! rustup toolchain list | grep -q '^nightly'; then
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx model_spec model_file model_header checkpoint layout)

cd fuzz
cargo +nightly fuzz build -O -a
for t in "${targets[@]}"; do
  printf '\n== fuzz %s for %ss\n' "$t" "$seconds"
  # Fuzz into a scratch corpus so the committed inputs stay small.
  corpus="$(mktemp -d)"
  log="$(mktemp)"
  status=0
  cargo +nightly fuzz run -O -a "$t" "$corpus" regressions/"$t" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E 'stat::number_of_executed_units|stat::peak_rss_mb|ERROR|panicked|SUMMARY' "$log" || true
  rm -rf "$corpus"
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz target $t failed (exit $status); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  rm -f "$log"
done
