#!/usr/bin/env bash
# Fuzzes the sidecar's archive reader (what POST /restore reads) and the podinfo parser (what
# the sidecar reads on every request) with cargo fuzz (libFuzzer, AddressSanitizer), for a
# bounded time each, starting from the seeds in sidecar/fuzz/seeds and the corpus kept in
# /var/cache/ums-rs/fuzz. Exits non-zero on the first crash, leaving the input in
# sidecar/fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
set -euo pipefail
seconds="${1:-60}"
cd "$(dirname "$0")/.."
cache="${UMS_FUZZ_CACHE:-/var/cache/ums-rs/fuzz}"

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "[fuzz] cargo fuzz needs a nightly toolchain (sanitizers): rustup toolchain install nightly" >&2
  exit 1
fi
if ! command -v g++ >/dev/null; then
  echo "[fuzz] installing g++ (libFuzzer is C++)"
  apt-get install -y --no-install-recommends g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "[fuzz] installing cargo-fuzz from crates.io"
  cargo +stable install cargo-fuzz --locked
fi

export CARGO_TARGET_DIR="$cache/target"
for target in archive_reader podinfo_parser; do
  corpus="$cache/corpus/$target"
  mkdir -p "$corpus"
  echo "[fuzz] $target for ${seconds}s (corpus $corpus)"
  log="$cache/$target.log"
  status=0
  cargo +nightly fuzz run --fuzz-dir sidecar/fuzz "$target" "$corpus" "sidecar/fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|==[0-9]+==ERROR|thread .* panicked)' "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -40 "$log" >&2
    echo "[fuzz] $target FAILED (exit $status): log $log, input in sidecar/fuzz/artifacts/$target/" >&2
    exit "$status"
  fi
done
echo "[fuzz] no crash in ${seconds}s per target"
