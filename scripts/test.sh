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

# The run needs room: the build cache grows by a few GB, each test cluster's node keeps its
# containerd state under /tmp, the images and workload archives under /var/lib/docker. A full
# disk fails somewhere in the middle ("No space left on device" from cargo or containerd); the
# free space is said here first so such a failure's cause is in the log.
target_dir=$(cargo metadata --format-version 1 --no-deps 2>/dev/null | jq -r .target_directory)
for dir in "$target_dir" /tmp /var/lib/docker; do
  mkdir -p "$dir"
  free_gib=$(( $(df --output=avail -k "$dir" | tail -1) / 1048576 ))
  echo "[test] disk: ${free_gib} GiB free for $dir"
  if [ "$free_gib" -lt 10 ]; then
    echo "[test] WARNING: less than 10 GiB free for $dir; the run may fail on a full disk (a cargo target dir's debug/incremental and old /tmp/ums-cluster-* directories can go)" >&2
  fi
done

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
