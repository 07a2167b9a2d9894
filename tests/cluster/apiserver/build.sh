#!/usr/bin/env bash
# Builds ums-test-apiserver (and provides etcd) from Debian sid's packaged Kubernetes 1.36
# libraries and Go 1.27, without installing anything from sid on the host: the packages are
# downloaded with a private apt state and unpacked into a private root, and the server is built
# in GOPATH mode, as Debian builds Go.
#
#   tests/cluster/apiserver/build.sh        prints the directory holding ums-test-apiserver and etcd
#
# Cache: /var/cache/ums-rs/apiserver (UMS_CLUSTER_CACHE): the unpacked root (keyed by the
# package list), Go's build cache, and the binary (keyed by a hash of the sources and the root).
# A second run with nothing changed costs a hash.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${UMS_CLUSTER_CACHE:-/var/cache/ums-rs/apiserver}
log() { printf '[apiserver] %s\n' "$*" >&2; }

packages=(golang-k8s-apiserver-dev golang-k8s-apiextensions-apiserver-dev golang-k8s-api-dev
  golang-k8s-apimachinery-dev golang-k8s-client-go-dev golang-k8s-component-base-dev
  golang-k8s-kube-openapi-dev golang-1.27-go golang-1.27-src etcd-server)
root_key=$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-16)
root="$cache/root-$root_key"

if [ ! -f "$root/.complete" ]; then
  apt_dir="$cache/apt"
  mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial,debs}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
    > "$apt_dir/sources.list"
  apt=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache"
    -o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false)
  log "resolving Kubernetes 1.36's libraries in Debian sid (private apt state, host untouched)"
  apt-get "${apt[@]}" update -qq
  # The closure against an empty system, then only the Go sources, Go itself and etcd: the
  # build needs no other package (Go's toolchain and etcd are static).
  apt-get "${apt[@]}" -o Dir::State::status=/dev/null install -s "${packages[@]}" \
    | awk '/^Inst/{print $2}' | grep -E '^(golang-|etcd)' > "$apt_dir/wanted.txt"
  log "downloading $(wc -l < "$apt_dir/wanted.txt") packages"
  (cd "$apt_dir/debs" && apt-get "${apt[@]}" download $(cat "$apt_dir/wanted.txt") >/dev/null)
  rm -rf "$root.partial"; mkdir -p "$root.partial"
  log "unpacking into $root"
  for deb in "$apt_dir"/debs/*.deb; do dpkg-deb -x "$deb" "$root.partial"; done
  touch "$root.partial/.complete"
  rm -rf "$root"; mv "$root.partial" "$root"
  rm -rf "$apt_dir/debs"
fi

goroot="$root/usr/lib/go-1.27"
source_key=$( (echo "$root_key"; cd "$here" && sha256sum ./*.go build.sh) | sha256sum | cut -c1-16)
out="$cache/bin-$source_key"
if [ ! -x "$out/ums-test-apiserver" ]; then
  gopath="$cache/gopath"
  rm -rf "$gopath/src/ums-rs"; mkdir -p "$gopath/src/ums-rs/apiserver" "$out.partial"
  cp "$here"/*.go "$gopath/src/ums-rs/apiserver/"
  export GOROOT="$goroot" GOPATH="$gopath:$root/usr/share/gocode" GO111MODULE=off GOPROXY=off \
    GOFLAGS= GOCACHE="$cache/go-build" GOTOOLCHAIN=local CGO_ENABLED=0 PATH="$goroot/bin:$PATH"
  # The OpenAPI definitions of the served types, as kube-apiserver generates its own
  # (k8s.io/kubernetes' generated file is not packaged).
  log "openapi-gen (kube-openapi) for core/v1, admissionregistration/v1, policy/v1, discovery/v1 and apimachinery"
  go build -o "$cache/openapi-gen" k8s.io/kube-openapi/cmd/openapi-gen
  "$cache/openapi-gen" --output-dir "$gopath/src/ums-rs/apiserver/openapi" \
    --output-pkg ums-rs/apiserver/openapi --output-file zz_generated.openapi.go \
    --go-header-file /dev/null --report-filename "$cache/openapi-api-rule-violations.txt" \
    k8s.io/api/core/v1 k8s.io/api/admissionregistration/v1 k8s.io/api/policy/v1 k8s.io/api/discovery/v1 \
    k8s.io/apimachinery/pkg/apis/meta/v1 \
    k8s.io/apimachinery/pkg/runtime k8s.io/apimachinery/pkg/version \
    k8s.io/apimachinery/pkg/api/resource k8s.io/apimachinery/pkg/util/intstr
  log "go build (GOPATH mode; about 4-7 min cold on 2 cores, seconds with the cache)"
  (cd "$gopath/src/ums-rs/apiserver" && go build -o "$out.partial/ums-test-apiserver" .)
  cp "$root/usr/bin/etcd" "$out.partial/etcd"
  rm -rf "$out"; mv "$out.partial" "$out"
fi
echo "$out"
