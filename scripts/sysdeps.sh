#!/usr/bin/env bash
# Installs the Debian packages wiremesh's demo, tests and benchmarks use, only those missing.
# wireguard-tools goes in without recommends: its recommends pull a kernel package.
set -euo pipefail
# gcc, libc6-dev: the OIDC tests build Ory Hydra with cgo (its in-memory SQLite), see lab/idp.py.
pkgs=(nftables iproute2 iperf3 iputils-ping conntrack wireguard-go postgresql stun-client miniupnpd procps psmisc
      buildah mmdebstrap containerd runc containernetworking-plugins prometheus iptables dnsutils gcc libc6-dev dnsmasq-base)
norec=(wireguard-tools)
missing() { for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done; }
need=$(missing "${pkgs[@]}")
need_norec=$(missing "${norec[@]}")
[ -z "$need$need_norec" ] && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086
[ -z "$need" ] || $SUDO apt-get install -y -qq $need
# shellcheck disable=SC2086
[ -z "$need_norec" ] || $SUDO apt-get install -y -qq --no-install-recommends $need_norec
