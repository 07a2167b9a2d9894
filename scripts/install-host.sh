#!/usr/bin/env bash
# Makes a fresh Debian 12 machine of the project's kind ready for the tests, idempotently, as root.
#
# Why each piece (measured facts: ../shared/ENGINES.md in the workplace, summarised here):
# - CRIU: Debian 12's CRIU 3.17 fails `criu check` on this kernel ("vdso: Unexpected rt vDSO
#   area bounds"), and Debian 13's 4.1.1 cannot dump any TCP socket on Linux 6.16+ (the kernel
#   now refuses SO_PASSCRED/SO_PASSSEC on non-unix sockets: "sockets: Can't get 1:16 opt:
#   Operation not supported"). CRIU 4.2.1 from Debian unstable (sid) handles both. trixie and
#   sid are added as extra sources pinned low (100 and 50), so only what we ask for with
#   `-t trixie` / `-t sid` comes from them.
# - Docker (for dind): Debian 12's docker.io 20.10, started as a plain dockerd with
#   experimental features (checkpoints need them). Tests start their own dockerd instances.
# - Podman 5 (for pind) from trixie, with runc (crun refuses this machine's hybrid cgroups) and
#   nftables (netavark calls nft).
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "install-host.sh must run as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log() { printf '[install-host] %s\n' "$*"; }

trixie_source=/etc/apt/sources.list.d/ums-trixie.sources
trixie_pin=/etc/apt/preferences.d/ums-trixie-pin
need_update=0
if [ ! -f "$trixie_source" ]; then
  log "adding Debian trixie as a low-priority apt source"
  cat > "$trixie_source" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  need_update=1
fi
sid_source=/etc/apt/sources.list.d/ums-sid.sources
sid_pin=/etc/apt/preferences.d/ums-sid-pin
if [ ! -f "$sid_source" ]; then
  log "adding Debian sid as a low-priority apt source (CRIU 4.2)"
  cat > "$sid_source" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  cat > "$sid_pin" <<'PIN'
Package: *
Pin: release n=sid
Pin-Priority: 50
PIN
  need_update=1
fi
if [ ! -f "$trixie_pin" ]; then
  cat > "$trixie_pin" <<'PIN'
Package: *
Pin: release n=trixie
Pin-Priority: 100
PIN
  need_update=1
fi

have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for pkg in criu podman runc nftables docker.io iptables zstd jq curl ca-certificates uidmap; do
  have "$pkg" || missing+=("$pkg")
done
if [ "$need_update" = 1 ] || [ "${#missing[@]}" -gt 0 ]; then
  log "apt-get update"
  # The mirrors reachable from these machines serve snapshots whose Release files are past
  # their Valid-Until date (the machine's own apt config says the same).
  apt-get -o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false update -qq
fi
criu_major_minor() { criu --version 2>/dev/null | sed -n 's/^Version: \([0-9]*\)\.\([0-9]*\).*/\1 \2/p'; }
criu_too_old() {
  read -r major minor <<<"$(criu_major_minor)"
  [ -z "${major:-}" ] || [ "$major" -lt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -lt 2 ]; }
}
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  # podman and runc from trixie (Podman 5); the rest from bookworm.
  apt-get install -y -qq -t trixie podman runc nftables >/dev/null
  apt-get install -y -qq docker.io iptables zstd jq curl ca-certificates uidmap >/dev/null
fi
if criu_too_old; then
  [ "$need_update" = 1 ] || apt-get -o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false update -qq
  log "installing CRIU 4.2 from sid"
  apt-get install -y -qq -t sid criu >/dev/null
fi

# Docker: experimental features on (checkpoint/restore). Tests pass their own --data-root etc.
mkdir -p /etc/docker
if ! grep -q '"experimental": *true' /etc/docker/daemon.json 2>/dev/null; then
  log "enabling Docker experimental features"
  echo '{"experimental": true}' > /etc/docker/daemon.json
fi

# Podman: runc as the OCI runtime, no cgroup v1 nag.
mkdir -p /etc/containers/containers.conf.d
conf=/etc/containers/containers.conf.d/50-ums.conf
if [ ! -f "$conf" ]; then
  log "configuring Podman to use runc"
  cat > "$conf" <<'CONF'
[engine]
runtime = "runc"
CONF
fi

log "criu: $(criu --version | head -n1)"
criu check >/dev/null 2>&1 && log "criu check: looks good" || { echo "criu check failed:" >&2; criu check >&2 || true; exit 1; }
log "dockerd: $(dockerd --version)"
log "podman: $(podman --version)"
log "runc: $(runc --version | head -n1)"
log "ready"
