"""What this host's own network looks like: its addresses (endpoints peers may try), whether it
runs IPv6, and the MTU its default route allows. Read through netlink and /proc; no changes.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

ARPHRD_NONE = 0xFFFE  # a TUN device (linux/if_arp.h)
IFF_POINTOPOINT = 0x10
# WireGuard's overhead on the wire in the worst case (IPv6 outer header): 40 + 8 UDP + 32.
WIREGUARD_OVERHEAD = 80
MIN_MTU = 1280  # the smallest MTU IPv6 allows
FALLBACK_LINK_MTU = 1500


def local_endpoints(listen_port: int, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """ip:port for every global address of this namespace except loopback, `exclude` (our TUN)
    and other tunnels (point-to-point or header-less links: a peer could reach us there only
    through that tunnel, which may be gone by the time it tries), the addresses of the interface
    holding the default route first."""
    from pyroute2 import IPRoute

    skip = set(exclude) | {"lo"}
    first: set[int] = set()
    found: list[tuple[int, str]] = []
    with IPRoute() as ipr:
        links = ipr.get_links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        for link in links:
            if link["ifi_type"] == ARPHRD_NONE or link["flags"] & IFF_POINTOPOINT:
                skip.add(names[link["index"]])
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_default_routes(family=family):
                oif = route.get_attr("RTA_OIF")
                if oif is not None:
                    first.add(int(oif))
        for msg in ipr.get_addr():
            if names.get(msg["index"]) in skip:
                continue
            addr = msg.get_attr("IFA_ADDRESS")
            if addr is None:
                continue
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            text = f"[{ip}]:{listen_port}" if ip.version == 6 else f"{ip}:{listen_port}"
            rank = (0 if msg["index"] in first else 2) + (0 if ip.version == 4 else 1)
            found.append((rank, text))
    found.sort(key=lambda item: item[0])  # stable: keeps kernel order within a rank
    return tuple(dict.fromkeys(text for _, text in found))[:16]


def ipv6_enabled(ifname: str) -> bool:
    """Whether the kernel runs IPv6 on interface `ifname` (sysctl disable_ipv6, or no IPv6 at all)."""
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def default_route_mtu() -> int | None:
    """The smallest MTU among the interfaces holding a default route (IPv4 or IPv6), or None."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        mtus = {link["index"]: link.get_attr("IFLA_MTU") for link in ipr.get_links()}
        found = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_default_routes(family=family):
                oif = route.get_attr("RTA_OIF")
                if oif is not None and mtus.get(int(oif)):
                    found.append(int(mtus[int(oif)]))
    return min(found) if found else None


def mesh_mtu(link_mtu: int | None) -> int:
    """The TUN MTU for a host whose default route's link has `link_mtu`: what fits in one
    datagram on that link after WireGuard's worst-case overhead, as wg-quick and wireguard-go
    choose (1420 on a 1500-byte link), never below 1280. A path with a smaller MTU further on
    still carries the datagrams: our UDP sockets leave fragmentation to the kernel once a router
    reports the smaller path MTU."""
    return max(MIN_MTU, (link_mtu or FALLBACK_LINK_MTU) - WIREGUARD_OVERHEAD)
