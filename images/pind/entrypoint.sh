#!/bin/bash
# Starts Podman's API service (storage on the pod's emptyDir at /var/lib/containers), then the
# sidecar, which waits for the socket.
set -u
mkdir -p /run/podman
podman system service --time 0 unix:///run/podman/podman.sock >/var/log/podman.log 2>&1 &
engine=$!
ums-sidecar serve &
sidecar=$!
trap 'kill -TERM $sidecar $engine 2>/dev/null' TERM INT
wait -n "$engine" "$sidecar"
status=$?
kill -TERM $sidecar $engine 2>/dev/null || true
exit $status
