#!/usr/bin/env bash
# Installs the Debian packages a local node needs (container runtime, CNI plugins,
# iptables and ipset, a plain-HTTP registry, daemonless image tools), and the web
# server that puts git http-backend on the network for the git tests. Must run as
# root. A policy-rc.d that exits 101 keeps the packages' maintainer scripts from
# starting services (containerd, docker-registry) during the install: up.sh starts
# its own.
# A fast no-op when everything is already installed.
set -euo pipefail

packages=(
  containerd runc containernetworking-plugins # runtime and bridge/host-local/portmap/loopback
  iptables conntrack ebtables ethtool iproute2 socat # kubelet/kube-proxy host tools
  ipset                                    # kube-router's NetworkPolicy firewall
  docker-registry                          # CNCF distribution, the local registry
  skopeo umoci                             # daemonless image building and pushing
  busybox-static                           # the minimal sandbox image's userland
  mmdebstrap                               # the fuller sandbox image's Debian root
  openssl gcc libc6-dev                    # certificates; the static pause binary
  lighttpd                                 # the git server of the git workspace tests
)

if [ "$(id -u)" != 0 ]; then
  echo "install-packages.sh: must run as root (it runs apt-get install)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
  [[ "$status" == ii* ]] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}" >&2

# Keep services from starting while they are installed; restore whatever was there.
policy=/usr/sbin/policy-rc.d
backup=
if [ -e "$policy" ]; then
  backup=$(mktemp)
  cp -p "$policy" "$backup"
fi
restore() {
  if [ -n "$backup" ]; then mv "$backup" "$policy"; else rm -f "$policy"; fi
}
trap restore EXIT
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 755 "$policy"

export DEBIAN_FRONTEND=noninteractive
# The package lists can be missing (fresh machine) or stale; refresh once on failure.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for p in "${missing[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
  if [[ "$status" != ii* ]]; then
    echo "install-packages.sh: $p did not install" >&2
    exit 1
  fi
done
