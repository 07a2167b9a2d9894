#!/usr/bin/env bash
# Builds the images of UMS-rs into a local Docker engine, without any registry:
#   ums-rs/debian:trixie     base, made with debootstrap (nothing can be pulled here)
#   ums-rs/dind:latest       runtime for migration-interface: dind (dockerd + CRIU + ums-sidecar)
#   ums-rs/pind:latest       runtime for migration-interface: pind (podman + runc + CRIU + ums-sidecar)
#   ums-rs/ambassador:latest the per-container stand-in (ums-sidecar ambassador)
#   ums-rs/webhook:latest    the admission webhook
#
#   images/build.sh [--engine-socket unix:///var/run/docker.sock]
#
# Push them to your registry (docker tag/push) and point the webhook's DIND_IMAGE, PIND_IMAGE,
# AMBASSADOR_IMAGE and the Deployment's image at them. Runs as root; needs debootstrap, and a
# Docker engine (one is started under /tmp/ums-image-build if none answers).
set -euo pipefail
cd "$(dirname "$0")/.."
host=${1:-}
[ "$host" = "--engine-socket" ] && host=$2
export DOCKER_HOST=${host:-${DOCKER_HOST:-unix:///var/run/docker.sock}}

started=""
if ! docker version >/dev/null 2>&1; then
  dir=/tmp/ums-image-build
  mkdir -p "$dir"
  dockerd --data-root "$dir/data" --exec-root "$dir/exec" --pidfile "$dir/dockerd.pid" \
    --host "unix://$dir/docker.sock" --bridge none --iptables=false >"$dir/dockerd.log" 2>&1 &
  started=$!
  export DOCKER_HOST="unix://$dir/docker.sock"
  for _ in $(seq 300); do docker version >/dev/null 2>&1 && break; sleep 0.1; done
  trap 'kill $started 2>/dev/null || true' EXIT
fi

if ! docker image inspect ums-rs/debian:trixie >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
  rootfs=$(mktemp -d)
  echo "[images] debootstrap trixie (minbase) into $rootfs"
  debootstrap --variant=minbase trixie "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | docker import - ums-rs/debian:trixie >/dev/null
  rm -rf "$rootfs"
fi

echo "[images] building the binaries (release)"
cargo build --release --locked -p ums-sidecar -p ums-webhook
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
context=$(mktemp -d)
trap 'rm -rf "$context"; [ -n "$started" ] && kill $started 2>/dev/null || true' EXIT
for image in dind pind ambassador webhook; do
  rm -rf "${context:?}"/*
  cp -r "images/$image/." "$context/"
  cp "$target/release/ums-sidecar" "$target/release/ums-webhook" "$context/"
  echo "[images] ums-rs/$image:latest"
  # Host network: build steps reach the Debian mirror without a bridge (none exists here).
  docker build --quiet --network host --tag "ums-rs/$image:latest" "$context" >/dev/null
done
docker image ls 'ums-rs/*'
