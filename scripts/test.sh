#!/usr/bin/env bash
# Runs every test of the project, set-up included: host packages and the outer engine
# (scripts/install-host.sh, idempotent, Debian 12 packages only), the images (images/build.sh,
# cached by a hash of their inputs), formatting, lints, then the whole test suite (unit tests,
# the webhook over real HTTPS, deploy manifests, the engine suite inside the real runtime images).
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "scripts/test.sh runs as root: it installs packages and runs privileged runtime containers" >&2; exit 1; }
started=$(date +%s)
./scripts/install-host.sh

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] images"
./images/build.sh
echo "[test] the test API server (Kubernetes' k8s.io/apiserver, Debian sid's packages in a private root)"
./tests/cluster/apiserver/build.sh >/dev/null
echo "[test] the CRI node image (containerd 2.x, runc, CRIU, CNI plugins from Debian sid, inside the image)"
./tests/cluster/cri-node/build.sh
echo "[test] cargo test"
cargo test --workspace --locked "$@"
echo "[test] all passed in $(( $(date +%s) - started )) s"
