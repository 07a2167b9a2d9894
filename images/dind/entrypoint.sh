#!/bin/bash
# Starts the nested Docker engine (its storage is the pod's emptyDir at /var/lib/docker), then
# the sidecar, which waits for the engine's socket. If either exits, the container exits and
# the kubelet restarts it.
#
# UMS_INSECURE_REGISTRIES: comma-separated host:port of plain-HTTP registries the nested engine
# may pull from (a registry inside the cluster without TLS; the tests' registry).
set -u
if [ -n "${UMS_INSECURE_REGISTRIES:-}" ] && ! grep -q insecure-registries /etc/docker/daemon.json; then
  registries=$(printf '%s' "$UMS_INSECURE_REGISTRIES" | tr ',' '\n' | sed '/^$/d; s/.*/"&"/' | paste -sd, -)
  sed -i "s/}\$/, \"insecure-registries\": [$registries]}/" /etc/docker/daemon.json
fi
dockerd --host unix:///var/run/docker.sock --data-root /var/lib/docker >/var/log/dockerd.log 2>&1 &
engine=$!
ums-sidecar serve &
sidecar=$!
trap 'kill -TERM $sidecar $engine 2>/dev/null' TERM INT
wait -n "$engine" "$sidecar"
status=$?
kill -TERM $sidecar $engine 2>/dev/null || true
wait
exit $status
