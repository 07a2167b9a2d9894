#!/usr/bin/env bash
# The benchmark (issue 10): in one run on this machine, the same stateful workload moved between
# two runtime pods (the real ums-rs/dind and ums-rs/pind images, nested engines with CRIU) by the
# engines' own staged commands, by the sidecar, and CRIU's own dump and restore, and (method
# ssu) as an ordinary pod between two test clusters on CRI nodes by the orchestrator-level
# interface and (method ff) as an ff pod by the service-level interface, at several sizes;
# prints the table (downtime, total, ratios, the agents' peak RSS) and writes docs/bench.json
# and docs/bench.svg.
#
#   scripts/bench.sh [--sizes 256,1024] [--engines podman,docker] [--out docs/bench]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (it runs privileged runtime containers)" >&2; exit 1; }
./scripts/install-host.sh >/dev/null
./images/build.sh >/dev/null
# The ssu method's test clusters: the API server and the CRI node image.
./tests/cluster/apiserver/build.sh >/dev/null
./tests/cluster/cri-node/build.sh >/dev/null
cargo build --quiet --locked -p ums-tests --bin ums-bench
target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
exec "$target/debug/ums-bench" "$@"
