#!/usr/bin/env bash
# Runs every test of the project, set-up included: host packages and engine configuration
# (scripts/install-host.sh, idempotent), formatting, lints, then the whole test suite
# (unit tests, the webhook over real HTTPS, deploy manifests, engine tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ]; then
  ./scripts/install-host.sh
else
  echo "[test] not root: skipping scripts/install-host.sh (engine tests need it and will fail loudly without it)" >&2
fi

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] cargo test"
cargo test --workspace --locked "$@"
