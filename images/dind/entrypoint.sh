#!/bin/bash
# Starts the nested Docker engine (its storage is the pod's emptyDir at /var/lib/docker), then
# the sidecar, which waits for the engine's socket. If either exits, the container exits and
# the kubelet restarts it.
set -u
dockerd --host unix:///var/run/docker.sock --data-root /var/lib/docker >/var/log/dockerd.log 2>&1 &
engine=$!
ums-sidecar serve &
sidecar=$!
trap 'kill -TERM $sidecar $engine 2>/dev/null' TERM INT
wait -n "$engine" "$sidecar"
status=$?
kill -TERM $sidecar $engine 2>/dev/null || true
exit $status
