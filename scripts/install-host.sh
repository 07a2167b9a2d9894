#!/usr/bin/env bash
# Makes a fresh Debian 12 machine of the project's kind ready for the tests, idempotently, as root.
#
# The host only runs the runtime images, as a Kubernetes node would: everything CRIU, Podman and
# the nested Docker need lives in those images (images/, Debian trixie + CRIU 4.2 from sid).
# Nothing is installed on the host from another Debian release and no apt source is added:
# an earlier version added trixie and sid here, which upgraded /usr/bin/python3 and libc6 under
# the machine's other users.
#
# What the host gets, all from Debian 12's own archive:
# - docker.io (20.10): the outer engine that runs the runtime images (the node's engine);
# - debootstrap: the local Debian base image (no container registry is reachable here);
# - docker-registry (distribution 2.8): a real registry on this machine, from which the nested
#   engines pull workload images, as they pull from a registry in a cluster;
# - iproute2, zstd, jq, curl, gcc (the static test workload and the test nodes' pause);
# - protobuf-compiler: the CRI client of the test node agent is generated from the CRI proto.
# Then it registers the CRI node containers' runtime wrapper with the outer dockerd and starts
# dockerd if none answers (there is no systemd on these machines).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-host.sh must run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log() { printf '[install-host] %s\n' "$*"; }

# An earlier version of this script added trixie and sid sources; they are ours to take back.
for file in /etc/apt/sources.list.d/ums-trixie.sources /etc/apt/sources.list.d/ums-sid.sources \
  /etc/apt/preferences.d/ums-trixie-pin /etc/apt/preferences.d/ums-sid-pin; do
  if [ -f "$file" ]; then
    log "removing $file (added by an earlier version of this script; the host needs nothing from trixie or sid)"
    rm -f "$file"
  fi
done

have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for pkg in docker.io debootstrap docker-registry iproute2 iptables zstd jq curl ca-certificates gcc libc6-dev protobuf-compiler; do
  have "$pkg" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get update"
  # The mirrors reachable from these machines serve snapshots whose Release files are past
  # their Valid-Until date (the machine's own apt config says the same).
  apt-get -o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false update -qq
  log "installing (Debian 12): ${missing[*]}"
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# kubectl (the client) drives the test clusters and renders deploy/ with its kustomize. Debian 12
# does not package it; the machines of this project's kind come with it.
command -v kubectl >/dev/null || {
  echo "install-host.sh: kubectl is missing (the client only; any release since 1.28)" >&2
  exit 1
}

# The CRI node containers' OCI runtime: runc with the capabilities Docker 20.10 does not know
# (CHECKPOINT_RESTORE among them) added to the node's bounding set (tests/cluster/cri-node/node-runc
# says why). Registered in the outer engine as the runtime `ums-node`.
here="$(cd "$(dirname "$0")/.." && pwd)"
install -D -m 0755 "$here/tests/cluster/cri-node/node-runc" /usr/local/libexec/ums-rs/node-runc
daemon_json=/etc/docker/daemon.json
mkdir -p /etc/docker
[ -s "$daemon_json" ] || echo '{}' > "$daemon_json"
jq '.runtimes["ums-node"] = {"path": "/usr/local/libexec/ums-rs/node-runc"}' "$daemon_json" > "$daemon_json.new"
mv "$daemon_json.new" "$daemon_json"

# The outer engine. The registry package's own service is not used: tests start their
# registries on ports of their own.
if docker version >/dev/null 2>&1 && ! docker info --format '{{json .Runtimes}}' | jq -e 'has("ums-node")' >/dev/null; then
  log "reloading dockerd's configuration (runtime ums-node)"
  pkill -HUP -x dockerd
  for _ in $(seq 50); do
    docker info --format '{{json .Runtimes}}' | jq -e 'has("ums-node")' >/dev/null && break
    sleep 0.1
  done
fi
if ! docker version >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/ums-outer-dockerd.log)"
  setsid dockerd >>/var/log/ums-outer-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 300); do docker version >/dev/null 2>&1 && break; sleep 0.1; done
  docker version >/dev/null 2>&1 || { echo "dockerd did not start:" >&2; tail -20 /var/log/ums-outer-dockerd.log >&2; exit 1; }
fi
# Pod networks are routed between bridges by the host (two clusters on one machine).
sysctl -qw net.ipv4.ip_forward=1
# Post-copy: CRIU's page server makes a 4 MiB pipe. A privileged pod on a real node has
# CAP_SYS_RESOURCE for it; this machine's runtime containers cannot (the sandbox's bounding
# set lacks it), so the node-wide limit is raised instead (docs/state-paths.md).
if [ "$(cat /proc/sys/fs/pipe-max-size)" -lt 4194304 ]; then
  sysctl -qw fs.pipe-max-size=4194304
fi

docker info --format '{{json .Runtimes}}' | jq -e 'has("ums-node")' >/dev/null || {
  echo "install-host.sh: dockerd does not know the runtime ums-node ($daemon_json)" >&2
  exit 1
}
log "dockerd: $(docker version --format '{{.Server.Version}}')"
log "registry: $(docker-registry --version 2>/dev/null | head -n1)"
log "kubectl: $(kubectl version --client 2>/dev/null | head -n1)"
log "ready"
