#!/usr/bin/env bash
# The main job on this machine: a live migration of a stateful service in a wrapped pod between
# two clusters, the way it runs on Kubernetes.
#
#   scripts/run-migration.sh [MIB] [--interface dind|pind|ssu|ff] [--keep]  (default 256 MiB, dind)
#
# Two clusters, "edge" and "cloud", each: etcd and an API server built from Kubernetes' own
# library (tests/cluster/apiserver), the real ums-rs/webhook image configured by deploy/base's
# webhook configurations, and a node agent (tests/cluster/node-agent) that runs pods on this
# machine's Docker engine with their own network namespaces and IPs. A user creates the service
# pod (tests/workload/workload.c: N MiB of seeded memory, a counter and a memory check every
# 10 ms, a file in its root fs) with `migration-interface` in edge; the admission chain wraps it
# (runtime container with the nested engine and CRIU, an ambassador). Each cluster gets its
# coordinator (the ums-rs/coordinator image); one UMS-style call on edge's coordinator
# (POST /migrate {name, destinationUrl}) has cloud's coordinator create the passive copy, the
# sidecars move the state over the pod network, the copy becomes active, the edge pod is
# deleted. Progress while it runs (the coordinator's phase, the bytes received), then the
# report. Everything it started is stopped at the end (or on Ctrl-C).
#
# --interface ssu: the orchestrator-level interface. Each cluster's node is a CRI node instead
# (tests/cluster/cri-node: containerd 2.x + CRIU, driven through the CRI), the service is an
# ordinary pod without annotations, and the call moves it through the kubelet's checkpoint API,
# the node part (deploy/node) and checkpoint images in cloud's registry.
#
# --interface ff: the service-level interface on the same CRI nodes: the service's image is built
# FROM ums-rs/ff (its entrypoint ums-ff), the pod runs without privilege, and the same call has
# the pod's own ums-ff dump the service with CRIU from inside its container and stream it to the
# copy's ums-ff.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (it runs privileged pod containers)" >&2; exit 1; }
./scripts/install-host.sh >/dev/null
./images/build.sh >/dev/null
./tests/cluster/apiserver/build.sh >/dev/null
./tests/cluster/cri-node/build.sh >/dev/null
cargo build --quiet --locked -p ums-tests --bin ums-demo -p ums-node-agent
target=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
exec "$target/debug/ums-demo" "$@"
