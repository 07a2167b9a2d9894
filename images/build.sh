#!/usr/bin/env bash
# Builds the images of UMS-rs into the local Docker engine:
#   ums-rs/debian:trixie     base, made with debootstrap when no BASE is given (no registry here)
#   ums-rs/dind:latest       runtime for migration-interface: dind (dockerd + CRIU + ums-sidecar)
#   ums-rs/pind:latest       runtime for migration-interface: pind (podman + runc + CRIU + ums-sidecar)
#   ums-rs/ambassador:latest the per-container stand-in (ums-sidecar ambassador)
#   ums-rs/webhook:latest    the admission webhook
#   ums-rs/coordinator:latest the migration coordinator of a cluster
#   ums-rs/node:latest       the node-level part (orchestrator-level migrations' archives)
#   ums-rs/ff:latest         the service-level base (migration-interface: ff): CRIU + ums-ff as
#                            the entrypoint; services are built FROM it
#
#   images/build.sh                      # debootstrap base (once), release binaries, images
#   BASE=debian:trixie images/build.sh   # where a registry is reachable: the public base image
#
# Each image carries the label io.ums-rs.inputs, a hash of everything it is built from (its
# folder, the binaries, the base image's ID); an image whose label matches is not rebuilt, so a
# second run costs only the cargo build's check. Docker's layer cache keeps the apt layers when
# only the binaries changed.
#
# Push them to your registry (docker tag/push) and point the webhook's DIND_IMAGE, PIND_IMAGE,
# AMBASSADOR_IMAGE and the Deployment's image at them. Runs as root with a Docker engine
# (scripts/install-host.sh starts one) and, without BASE, debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[images] %s\n' "$*"; }

docker version >/dev/null 2>&1 || { echo "images/build.sh: no Docker engine answers (run scripts/install-host.sh)" >&2; exit 1; }

base=${BASE:-ums-rs/debian:trixie}
if [ -z "${BASE:-}" ] && ! docker image inspect "$base" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { echo "images/build.sh: debootstrap is missing (run scripts/install-host.sh)" >&2; exit 1; }
  rootfs=$(mktemp -d)
  log "debootstrap trixie (minbase) into $rootfs"
  debootstrap --variant=minbase trixie "$rootfs" http://deb.debian.org/debian >/dev/null
  tar -C "$rootfs" -c . | docker import - "$base" >/dev/null
  rm -rf "$rootfs"
fi
base_id=$(docker image inspect --format '{{.Id}}' "$base")

log "building the binaries (release)"
cargo build --release --locked -p ums-sidecar -p ums-webhook -p ums-coordinator -p ums-node -p ums-ff
target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
for image in dind pind ambassador webhook coordinator node ff; do
  rm -rf "${context:?}"/*
  cp -r "images/$image/." "$context/"
  case $image in
    webhook) cp "$target/release/ums-webhook" "$context/" ;;
    coordinator) cp "$target/release/ums-coordinator" "$context/" ;;
    node) cp "$target/release/ums-node" "$context/" ;;
    ff) cp "$target/release/ums-ff" "$context/" ;;
    *) cp "$target/release/ums-sidecar" "$context/" ;;
  esac
  inputs=$( (echo "$base_id"; cd "$context" && find . -type f | LC_ALL=C sort | xargs sha256sum) | sha256sum | cut -c1-32)
  have=$(docker image inspect --format '{{index .Config.Labels "io.ums-rs.inputs"}}' "ums-rs/$image:latest" 2>/dev/null || true)
  if [ "$have" = "$inputs" ]; then
    log "ums-rs/$image:latest is up to date ($inputs)"
    continue
  fi
  log "ums-rs/$image:latest ($inputs)"
  # Host network: build steps reach the Debian mirror without the engine's bridge.
  docker build --quiet --network host --build-arg "BASE=$base" --label "io.ums-rs.inputs=$inputs" \
    --tag "ums-rs/$image:latest" "$context" >/dev/null
done
docker image ls 'ums-rs/*'
