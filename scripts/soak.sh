#!/usr/bin/env bash
# The soak: one service moved back and forth between two clusters N times (default 50) by
# their coordinators, each hop checked (state intact, nothing left behind) and measured
# (coordinators' resident memory and descriptors, the running pod's engine storage): the table
# is printed and kept in docs/soak.txt. The test command runs the same test with 4 hops.
set -euo pipefail
cd "$(dirname "$0")/.."
hops="${1:-50}"
[ "$(id -u)" = 0 ] || { echo "scripts/soak.sh runs as root (it runs the test clusters)" >&2; exit 1; }
./scripts/install-host.sh
./images/build.sh
./tests/cluster/apiserver/build.sh >/dev/null
started=$(date +%s)
UMS_SOAK_MIGRATIONS="$hops" cargo test --locked -p ums-tests --test soak -- --nocapture 2>&1 \
  | tee /tmp/ums-soak.log
{
  echo "# scripts/soak.sh $hops ($(date -u +%Y-%m-%d), $(( $(date +%s) - started )) s)"
  grep -E '^(hop|[0-9]+ )' /tmp/ums-soak.log
} > docs/soak.txt
echo "[soak] table in docs/soak.txt"
