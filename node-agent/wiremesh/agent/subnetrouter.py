"""A subnet router's forwarding rules: source NAT and TCP MSS clamping, in an nftables table of ours.

A node that advertises routes (a cluster node offering its pod CIDR, an office router offering its
LAN) forwards between the tunnel and those subnets. Two things make that work without any help
from the hosts on either side:

- **Source NAT** (on by default, as Tailscale's ``--snat-subnet-routes``): traffic from the mesh
  into a subnet leaves with this node's address on that subnet, so the subnet's hosts (pods) need
  no route back into the mesh; traffic from a subnet into the mesh leaves with this node's mesh
  address, so the peer sees a mesh identity its packet filter knows and needs no route to the
  subnet either. ``--no-snat-subnet-routes`` keeps source addresses (the subnet then needs a route
  to 100.64.0.0/10 through this node, and peers need ``--accept-routes``).
- **MSS clamping**: TCP SYNs crossing the tunnel in either direction have their MSS lowered to
  what fits the tunnel MTU, so neither end sends segments the tunnel would have to fragment.

Everything lives in one table, ``inet wiremesh_<interface>``, replaced atomically as a whole and
deleted at stop; no other table or chain on the host is touched. `ruleset()` is pure.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence

log = logging.getLogger("wiremesh.agent.subnetrouter")

MESH_V4 = "100.64.0.0/10"
MESH_V6 = "fd7a:115c:a1e0::/48"
IPV4_TCP_OVERHEAD = 40  # IPv4 + TCP headers without options
IPV6_TCP_OVERHEAD = 60
NFT_TIMEOUT = 10.0


class SubnetRouterError(RuntimeError):
    """nft is missing or refused the rules; the message says which and why."""


def table_name(tun: str) -> str:
    """nftables identifiers take letters, digits and underscores: wm-0 -> wiremesh_wm_0."""
    return "wiremesh_" + re.sub(r"[^A-Za-z0-9_]", "_", tun)


def ruleset(tun: str, mtu: int, *, snat: bool) -> str:
    """The nft script that defines our table for interface `tun` with tunnel MTU `mtu`."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,15}", tun):
        raise ValueError(f"not an interface name: {tun!r}")
    mss4, mss6 = mtu - IPV4_TCP_OVERHEAD, mtu - IPV6_TCP_OVERHEAD
    syn = "tcp flags & (syn | rst) == syn"
    clamp = []
    for direction in ("iifname", "oifname"):
        clamp.append(
            f'{direction} "{tun}" meta nfproto ipv4 {syn} tcp option maxseg size > {mss4} '
            f"tcp option maxseg size set {mss4}"
        )
        clamp.append(
            f'{direction} "{tun}" meta nfproto ipv6 {syn} tcp option maxseg size > {mss6} '
            f"tcp option maxseg size set {mss6}"
        )
    nat = []
    if snat:
        nat = [
            # mesh -> subnet: the subnet sees this node's address on it
            f'oifname != "{tun}" ip saddr {MESH_V4} masquerade',
            f'oifname != "{tun}" ip6 saddr {MESH_V6} masquerade',
            # subnet -> mesh: the peer sees this node's mesh address
            f'oifname "{tun}" ip saddr != {MESH_V4} masquerade',
            f'oifname "{tun}" ip6 saddr != {MESH_V6} masquerade',
        ]
    return nft_table(
        f"inet {table_name(tun)}",
        [
            ("forward", "type filter hook forward priority mangle", clamp),
            ("postrouting", "type nat hook postrouting priority srcnat", nat),
        ],
    )


def nft_table(table: str, chains: Sequence[tuple[str, str, Sequence[str]]]) -> str:
    """An nft script defining `table` ("FAMILY NAME") with base chains (name, "type ... hook ...
    priority ...", rules), each with policy accept."""
    lines = [f"table {table} {{"]
    for name, hook, rules in chains:
        lines += [f"  chain {name} {{", f"    {hook}; policy accept;", *(f"    {r}" for r in rules), "  }"]
    lines.append("}")
    return "\n".join(lines) + "\n"


def run_nft(script: str) -> None:
    """Run an nft script (`nft -f -`); SubnetRouterError with nft's complaint if refused."""
    # /usr/sbin may be missing from a service's PATH.
    nft = shutil.which("nft") or next(
        (p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None
    )
    if nft is None:
        raise SubnetRouterError("the nft command (Debian package nftables) is needed to route subnets")
    try:
        result = subprocess.run(
            [nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SubnetRouterError(f"nft failed: {exc}") from exc
    if result.returncode != 0:
        raise SubnetRouterError(f"nft refused the rules: {result.stderr.strip()[:500]}")


def install(tun: str, mtu: int, *, snat: bool) -> None:
    """Create or atomically replace our table (the first two lines make `delete` safe when the
    table does not exist yet)."""
    name = table_name(tun)
    run_nft(f"table inet {name}\ndelete table inet {name}\n{ruleset(tun, mtu, snat=snat)}")
    log.info("subnet_router_rules_installed table=%s snat=%s mss_v4=%d", name, snat, mtu - IPV4_TCP_OVERHEAD)


def remove(tun: str) -> None:
    name = table_name(tun)
    run_nft(f"table inet {name}\ndelete table inet {name}\n")
    log.info("subnet_router_rules_removed table=%s", name)


def forwarding_enabled() -> dict[str, bool]:
    """Whether this namespace forwards IPv4/IPv6 (the agent warns if not; it does not change it)."""
    out = {}
    for family, path in (
        ("ipv4", "/proc/sys/net/ipv4/ip_forward"),
        ("ipv6", "/proc/sys/net/ipv6/conf/all/forwarding"),
    ):
        try:
            with open(path) as f:
                out[family] = f.read().strip() == "1"
        except OSError:
            out[family] = False
    return out
