#!/bin/bash
# Starts Podman's API service (storage on the pod's emptyDir at /var/lib/containers), then the
# sidecar, which waits for the socket. If either exits, the container exits and the kubelet
# restarts it.
#
# UMS_INSECURE_REGISTRIES: comma-separated host:port of plain-HTTP registries the nested engine
# may pull from (a registry inside the cluster without TLS; the tests' registry).
set -u
# A runtime container that restarts (the kubelet restarts it in place or anew; the pod's
# emptyDir with the engine's storage survives) starts from what the dead one left:
# - the dead engine's pid files, sockets and runtime state, on which the engine refuses to start;
# - a sidecar that died in a post-copy restore left lazy-pages lines in CRIU's configuration;
# - a sidecar that died while restoring left its netfilter lock chain in the pod's network
#   namespace, dropping the restored containers' internal connections.
for tool in iptables ip6tables; do
  while $tool -w -D OUTPUT -j UMS-RESTORE-LOCK 2>/dev/null; do :; done
  $tool -w -F UMS-RESTORE-LOCK 2>/dev/null && $tool -w -X UMS-RESTORE-LOCK 2>/dev/null
done
rm -rf /run/podman /run/libpod /run/containers /run/crun /run/runc /var/run/libpod
rm -f /etc/criu/runc.conf
if [ -n "${UMS_INSECURE_REGISTRIES:-}" ]; then
  mkdir -p /etc/containers/registries.conf.d
  for registry in ${UMS_INSECURE_REGISTRIES//,/ }; do
    printf '[[registry]]\nlocation = "%s"\ninsecure = true\n\n' "$registry"
  done > /etc/containers/registries.conf.d/50-ums-insecure.conf
fi
mkdir -p /run/podman
podman system service --time 0 unix:///run/podman/podman.sock >/var/log/podman.log 2>&1 &
engine=$!
ums-sidecar serve &
sidecar=$!
trap 'kill -TERM $sidecar $engine 2>/dev/null' TERM INT
wait -n "$engine" "$sidecar"
status=$?
kill -TERM $sidecar $engine 2>/dev/null || true
wait
exit $status
