#!/usr/bin/env bash
# The main job on this machine: a live migration of a stateful container between two nested
# engines through two ums-sidecar processes, as between a source pod and a destination pod.
#
#   scripts/run-migration.sh [MIB]        (default 256; ENGINE=docker or ENGINE=podman)
#
# Starts two engines (own data root, exec root and socket under /tmp/ums-demo), builds the
# test workload (tests/workload/workload.c, static) into an image on the source and copies it
# to the destination (save/load keeps the image ID), starts a source sidecar (start mode
# active: creates and starts the workload) and a destination sidecar (passive: creates only),
# then POSTs /migrate and prints the migration report and the workload's output on both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
engine=${ENGINE:-docker}
[ "$(id -u)" = 0 ] || { echo "run as root (it starts container engines)" >&2; exit 1; }
./scripts/install-host.sh >/dev/null

cargo build --quiet --locked -p ums-sidecar
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
sidecar="$target/debug/ums-sidecar"

base=/tmp/ums-demo
export PODMAN_IGNORE_CGROUPSV1_WARNING=1
pids=()
# The engine CLI of one side.
podman_args() {
  echo --root "$base/$1/root" --runroot "$base/$1/run" --tmpdir "$base/$1/tmp" \
    --cgroup-manager cgroupfs --runtime runc --events-backend file
}
D() {
  local side=$1; shift
  if [ "$engine" = podman ]; then
    podman $(podman_args "$side") "$@"
  else
    docker -H "unix://$base/$side/engine.sock" "$@"
  fi
}
cleanup() {
  trap "" INT TERM  # a second signal must not cut the clean-up short
  # Containers first (their processes outlive the engines), then the sidecars and engines.
  for side in src dst; do
    if [ -d "$base/$side" ]; then
      ids=$(D "$side" ps -aq 2>/dev/null || true)
      [ -n "$ids" ] && D "$side" rm -f $ids >/dev/null 2>&1 || true
    fi
  done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for side in src dst; do
    [ -f "$base/$side/dockerd.pid" ] && kill "$(cat "$base/$side/dockerd.pid")" 2>/dev/null || true
  done
  sleep 2
  grep -o " $base[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}
cleanup  # whatever an earlier run left behind
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$base"; mkdir -p "$base"

for side in src dst; do
  mkdir -p "$base/$side"
  if [ "$engine" = podman ]; then
    podman $(podman_args "$side") system service --time 0 "unix://$base/$side/engine.sock" \
      >"$base/$side/engine.log" 2>&1 &
  else
    dockerd --data-root "$base/$side/root" --exec-root "$base/$side/exec" --pidfile "$base/$side/dockerd.pid" \
      --host "unix://$base/$side/engine.sock" --bridge none --iptables=false --ip-masq=false \
      >"$base/$side/engine.log" 2>&1 &
  fi
  pids+=($!)
done
for side in src dst; do
  for _ in $(seq 300); do [ -S "$base/$side/engine.sock" ] && D "$side" version >/dev/null 2>&1 && break; sleep 0.1; done
done

echo "--- building the workload image (${mib} MiB of seeded memory, a counter every 10 ms)"
mkdir -p "$base/image"
gcc -static -O2 -o "$base/image/workload" tests/workload/workload.c
tar -C "$base/image" -cf "$base/workload.tar" workload
D src import --change 'ENTRYPOINT ["/workload"]' "$base/workload.tar" ums-demo/workload:1 >/dev/null
D src save --output "$base/image.tar" ums-demo/workload:1 >/dev/null
D dst load --input "$base/image.tar" >/dev/null

containers=$(printf '[{"name":"app","image":"ums-demo/workload:1","args":["%s","42"]}]' "$mib")
for side in src dst; do
  mode=active; [ "$side" = dst ] && mode=passive
  INTERFACE=$([ "$engine" = podman ] && echo pind || echo dind) CONTAINERS="$containers" MODE="$mode" python3 - >"$base/$side/annotations" <<'PY'
import json, os
def q(s): return json.dumps(s)  # Go %q and JSON quoting agree for these ASCII values
ann = {"migration-interface": os.environ["INTERFACE"], "migration-containers": os.environ["CONTAINERS"],
       "migration-volumes": "[]", "migration-start-mode": os.environ["MODE"], "migration-bypass": "true"}
print("\n".join(f"{k}={q(v)}" for k, v in sorted(ann.items())))
PY
done
port_src=18881; port_dst=18882
"$sidecar" serve --engine "$engine" --engine-socket "$base/src/engine.sock" --engine-root "$base/src/root" \
  --podinfo "$base/src/annotations" --listen 127.0.0.1:$port_src 2>"$base/src/sidecar.log" &
pids+=($!)
"$sidecar" serve --engine "$engine" --engine-socket "$base/dst/engine.sock" --engine-root "$base/dst/root" \
  --podinfo "$base/dst/annotations" --listen 127.0.0.1:$port_dst 2>"$base/dst/sidecar.log" &
pids+=($!)
for port in $port_src $port_dst; do
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
done
echo "--- waiting for the workload to fill its memory and tick"
for _ in $(seq 600); do
  curl -fs "http://127.0.0.1:$port_src/logs/app" | grep -q 'tick=50 ' && break
  sleep 0.2
done
echo "source, last lines before the migration:"
curl -fs "http://127.0.0.1:$port_src/logs/app" | python3 -c 'import json,sys; [print("  "+json.loads(l)["data"].rstrip()) for l in sys.stdin.readlines()[-3:]]'

echo "--- POST /migrate (source -> destination)"
curl -fsS -H 'content-type: application/json' \
  --data "{\"destination\": \"http://127.0.0.1:$port_dst\"}" \
  "http://127.0.0.1:$port_src/migrate" | python3 -m json.tool | tee "$base/report.json"

sleep 1
echo "--- destination, first lines after the restore:"
curl -fs "http://127.0.0.1:$port_dst/logs/app" | python3 -c 'import json,sys; [print("  "+json.loads(l)["data"].rstrip()) for l in sys.stdin.readlines()[:3]]'
echo "--- source containers now: $(curl -fs http://127.0.0.1:$port_src/containers)"
echo "report saved to $base/report.json"
if [ "${KEEP:-0}" = 1 ]; then
  echo "--- KEEP=1: engines and sidecars stay up (source http://127.0.0.1:$port_src, destination http://127.0.0.1:$port_dst); Ctrl-C stops them"
  wait
fi
