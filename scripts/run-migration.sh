#!/usr/bin/env bash
# The main job on this machine: a live migration of a stateful service between two wrapped
# pods' runtime containers, through the real images.
#
#   scripts/run-migration.sh [MIB]        (default 256; ENGINE=docker (dind) or ENGINE=podman (pind))
#
# Each "pod" is the real ums-rs/dind or ums-rs/pind runtime image run on this machine's Docker
# engine as a privileged pod container (its own network namespace and IP, the nested engine's
# storage on a host directory standing for the pod's emptyDir, the downward-API annotations at
# /etc/podinfo). Inside each, the nested engine with CRIU and ums-sidecar run as in production.
# The workload (tests/workload/workload.c: N MiB of seeded memory, a counter and a memory check
# every 10 ms, a file in its root fs) is pushed to a registry on this machine and pulled by both
# nested engines. The source pod is `active` (creates and starts it), the destination `passive`
# (creates only); then POST /migrate on the source sidecar, over the pod network, and the report.
# Everything it started is stopped at the end (KEEP=1 leaves it up until Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
engine=${ENGINE:-docker}
case $engine in
  docker) interface=dind; engine_root=/var/lib/docker ;;
  podman) interface=pind; engine_root=/var/lib/containers ;;
  *) echo "ENGINE must be docker or podman" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "run as root (it runs privileged pod containers)" >&2; exit 1; }
./scripts/install-host.sh >/dev/null
./images/build.sh >/dev/null

base=/tmp/ums-demo
registry_pid=""
cleanup() {
  trap "" INT TERM  # a second signal must not cut the clean-up short
  docker rm --force --volumes ums-demo-src ums-demo-dst >/dev/null 2>&1 || true
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null || true
}
cleanup  # whatever an earlier run left behind
trap cleanup EXIT
trap 'exit 130' INT TERM
rm -rf "$base"; mkdir -p "$base"

echo "--- registry on this machine, the workload image (${mib} MiB of seeded memory, a counter every 10 ms)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("0.0.0.0",0)); print(s.getsockname()[1])')
bridge=$(docker network inspect bridge --format '{{index .Options "com.docker.network.bridge.name"}}')
gateway=$(ip -4 -o addr show dev "$bridge" | awk '{split($4, a, "/"); print a[1]; exit}')
mkdir -p "$base/registry"
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 0.0.0.0:%s\n' \
  "$base/registry" "$port" >"$base/registry.yml"
docker-registry serve "$base/registry.yml" >"$base/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
mkdir -p "$base/image"
gcc -static -O2 -o "$base/image/workload" tests/workload/workload.c
tar -C "$base/image" -cf "$base/workload.tar" workload
docker import --change 'ENTRYPOINT ["/workload"]' "$base/workload.tar" "127.0.0.1:$port/ums-demo/workload:1" >/dev/null
docker push --quiet "127.0.0.1:$port/ums-demo/workload:1" >/dev/null
docker rmi "127.0.0.1:$port/ums-demo/workload:1" >/dev/null
image="$gateway:$port/ums-demo/workload:1"

containers=$(printf '[{"name":"app","image":"%s","args":["%s","42"]}]' "$image" "$mib")
for side in src dst; do
  mode=active; [ "$side" = dst ] && mode=passive
  mkdir -p "$base/$side/podinfo" "$base/$side/engine"
  INTERFACE=$interface CONTAINERS="$containers" MODE="$mode" python3 - >"$base/$side/podinfo/annotations" <<'PY'
import json, os
def q(s): return json.dumps(s)  # Go %q and JSON quoting agree for these ASCII values
ann = {"migration-interface": os.environ["INTERFACE"], "migration-containers": os.environ["CONTAINERS"],
       "migration-volumes": "[]", "migration-start-mode": os.environ["MODE"], "migration-bypass": "true"}
print("\n".join(f"{k}={q(v)}" for k, v in sorted(ann.items())))
PY
  # privileged: true, as this machine allows it (--privileged itself is refused here: the
  # sandbox lacks CAP_SYS_RESOURCE; see README).
  docker run --detach --name "ums-demo-$side" \
    --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined \
    --security-opt apparmor=unconfined --security-opt systempaths=unconfined \
    --device-cgroup-rule 'a *:* rwm' --volume /sys/fs/cgroup:/sys/fs/cgroup:rw \
    --volume "$base/$side/engine:$engine_root" --volume "$base/$side/podinfo:/etc/podinfo:ro" \
    --env "UMS_INSECURE_REGISTRIES=$gateway:$port" "ums-rs/$interface:latest" >/dev/null
done
ip() { docker inspect --format '{{.NetworkSettings.IPAddress}}' "ums-demo-$1"; }
src="http://$(ip src):8888"; dst="http://$(ip dst):8888"
for url in "$src" "$dst"; do
  for _ in $(seq 600); do curl -fs "$url/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
  curl -fsS "$url/healthz" >/dev/null
done
echo "source pod $src, destination pod $dst ($interface: nested $engine with CRIU in each)"
echo "--- waiting for the workload to be pulled, fill its memory and tick"
for _ in $(seq 900); do
  curl -fs "$src/logs/app" 2>/dev/null | grep -q 'tick=50 ' && break
  sleep 0.2
done
echo "source, last lines before the migration:"
curl -fs "$src/logs/app" | python3 -c 'import json,sys; [print("  "+json.loads(l)["data"].rstrip()) for l in sys.stdin.readlines()[-3:]]'

echo "--- POST $src/migrate {destination: $dst}"
curl -fsS -H 'content-type: application/json' --data "{\"destination\": \"$dst\"}" "$src/migrate" \
  | python3 -m json.tool | tee "$base/report.json"

sleep 1
echo "--- destination, first lines after the restore:"
curl -fs "$dst/logs/app" | python3 -c 'import json,sys; [print("  "+json.loads(l)["data"].rstrip()) for l in sys.stdin.readlines()[:3]]'
echo "--- source pod's nested containers now: $(curl -fs "$src/containers")"
echo "report saved to $base/report.json"
if [ "${KEEP:-0}" = 1 ]; then
  echo "--- KEEP=1: both pods stay up (source $src, destination $dst); Ctrl-C stops them"
  while true; do sleep 3600; done
fi
