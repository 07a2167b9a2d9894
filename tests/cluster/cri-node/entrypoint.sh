#!/bin/sh
# Starts one node's container runtime: the pod network's CNI configuration (UMS_POD_SUBNET),
# plain-HTTP access to the registries in UMS_INSECURE_REGISTRIES (host:port, space separated),
# the CAs in UMS_CA_DIR (*.crt) in the system trust store, containerd, and the pinned sandbox
# image.
set -eu
subnet=${UMS_POD_SUBNET:?UMS_POD_SUBNET must name the pod subnet of this node}
mkdir -p /etc/cni/net.d /var/lib/kubelet/checkpoints
cat > /etc/cni/net.d/10-pods.conflist <<CNI
{"cniVersion": "1.0.0", "name": "pods", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$subnet"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
CNI
for registry in ${UMS_INSECURE_REGISTRIES:-}; do
  mkdir -p "/etc/containerd/certs.d/$registry"
  printf 'server = "http://%s"\n[host."http://%s"]\n  capabilities = ["pull", "resolve", "push"]\n  skip_verify = true\n' \
    "$registry" "$registry" > "/etc/containerd/certs.d/$registry/hosts.toml"
done
# CAs of registries with certificates of their own CA: containerd's default resolver (which
# the restore's base-image pull uses) trusts the system store.
if [ -n "${UMS_CA_DIR:-}" ] && ls "$UMS_CA_DIR"/*.crt >/dev/null 2>&1; then
  cp "$UMS_CA_DIR"/*.crt /usr/local/share/ca-certificates/
  update-ca-certificates >/dev/null
fi
sysctl -qw net.ipv4.ip_forward=1 || true
containerd --config /etc/containerd/config.toml &
pid=$!
trap 'kill -TERM $pid; wait $pid' TERM INT
i=0
until ctr --address /run/containerd/containerd.sock version >/dev/null 2>&1; do
  i=$((i + 1))
  [ "$i" -lt 300 ] || { echo "ums-node: containerd did not answer within 30 s" >&2; exit 1; }
  kill -0 $pid || { echo "ums-node: containerd exited" >&2; exit 1; }
  sleep 0.1
done
ctr --address /run/containerd/containerd.sock -n k8s.io images import /usr/share/ums-node/pause.tar >/dev/null
containerd_version=$(containerd --version)
runc_version=$(runc --version | head -n 1)
criu_version=$(criu --version | head -n 1)
echo "ums-node: ready: $containerd_version; $runc_version; CRIU $criu_version"
wait "$pid"
