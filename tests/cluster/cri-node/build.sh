#!/usr/bin/env bash
# Builds ums-rs/cri-node:latest, the image of one test node (containerd 2.x + runc + CRIU + CNI
# plugins from Debian sid, inside the image), and the sandbox image it pins (ums-rs/pause, a
# static pause built here with the host's gcc). Cached like images/build.sh: the image carries
# io.ums-rs.inputs, a hash of everything it is built from, and is not rebuilt when it matches.
#
#   tests/cluster/cri-node/build.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
log() { printf '[cri-node] %s\n' "$*" >&2; }
base=${BASE:-ums-rs/debian:trixie}
docker image inspect "$base" >/dev/null 2>&1 || { echo "cri-node/build.sh: no $base (run images/build.sh first)" >&2; exit 1; }
base_id=$(docker image inspect --format '{{.Id}}' "$base")

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$here"/Dockerfile "$here"/containerd.toml "$here"/entrypoint.sh "$context/"
inputs=$( (echo "$base_id"; cd "$here" && sha256sum Dockerfile containerd.toml entrypoint.sh pause.c) | sha256sum | cut -c1-32)
have=$(docker image inspect --format '{{index .Config.Labels "io.ums-rs.inputs"}}' ums-rs/cri-node:latest 2>/dev/null || true)
if [ "$have" = "$inputs" ]; then
  log "ums-rs/cri-node:latest is up to date ($inputs)"
  exit 0
fi
log "the sandbox image (static pause)"
mkdir -p "$context/pause-root"
gcc -static -Os -o "$context/pause-root/pause" "$here/pause.c"
tar -C "$context/pause-root" -c pause | docker import -c 'ENTRYPOINT ["/pause"]' - ums-rs/pause:3.10 >/dev/null
docker save ums-rs/pause:3.10 -o "$context/pause.tar"
log "ums-rs/cri-node:latest ($inputs): containerd, runc, CRIU, CNI plugins from Debian sid"
docker build --quiet --network host --build-arg "BASE=$base" --label "io.ums-rs.inputs=$inputs" \
  --tag ums-rs/cri-node:latest "$context" >/dev/null
docker run --rm --entrypoint sh ums-rs/cri-node:latest -c \
  'echo "containerd $(containerd --version | cut -d" " -f3), runc $(runc --version | head -1 | cut -d" " -f3), $(criu --version | head -1)"' >&2
