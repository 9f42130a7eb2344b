"""The small grammars inside a policy file: port lists, protocols, `target:ports`, address
ranges, a grant's `ip` capabilities, and ipset arithmetic. Pure functions; each raises
ValueError with a message fit to show the policy's author."""

from __future__ import annotations

import ipaddress
from typing import Any

from wiremesh.core.policy.model import (
    ALL_PORTS,
    ANY_PROTO,
    DEFAULT_PROTOS,
    PORT_PROTOS,
    PROTO_NAMES,
    IPNetwork,
    ProtoPorts,
)

MAX_ITEMS = 100_000  # entries in any one list; policies are written by people


def parse_ports(text: str) -> tuple[tuple[int, int], ...]:
    """`*`, `22`, `22,80,443`, `1000-2000` or a comma list mixing them; raises ValueError."""
    if text == "*":
        return ALL_PORTS
    out: list[tuple[int, int]] = []
    for part in text.split(","):
        part = part.strip()
        lo_s, sep, hi_s = part.partition("-")
        if not lo_s.isdigit() or (sep and not hi_s.isdigit()) or len(lo_s) > 5 or len(hi_s) > 5:
            raise ValueError(f"bad port {part!r}: expected a number, a range like 1000-2000, or '*'")
        lo = int(lo_s)
        hi = int(hi_s) if sep else lo
        if hi > 65535 or lo > 65535:
            raise ValueError(f"bad port {part!r}: ports are 1-65535")
        if lo == 0:
            # As in Tailscale: port 0 names no port a packet can carry; '*' means every port.
            raise ValueError(f"bad port {part!r}: port 0 is not a port (use '*' for every port)")
        if lo > hi:
            raise ValueError(f"bad port range {part!r}: first port is above last")
        out.append((lo, hi))
    return tuple(out)


def parse_proto(value: Any) -> frozenset[int]:
    """A protocol name (`tcp`, `icmp`, ...) or IANA number; raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("proto must be a protocol name or number")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        n = int(value)
        if not 0 < n < 256:
            raise ValueError(f"bad protocol number {value}: expected 1-255")
        return frozenset({n})
    if isinstance(value, str) and value.lower() in PROTO_NAMES:
        return PROTO_NAMES[value.lower()]
    raise ValueError(f"unknown protocol {value!r}: use a name ({', '.join(sorted(PROTO_NAMES))}) or a number")


def split_target_ports(text: str) -> tuple[str, str]:
    """Split `target:ports` at the last colon (`[v6]:22` also accepted)."""
    if text.startswith("["):
        end = text.find("]:")
        if end > 0:
            return text[1:end], text[end + 2 :]
    target, sep, ports = text.rpartition(":")
    if not sep or not target:
        raise ValueError(f"destination {text!r} must be target:ports (for example 'tag:web:443' or '*:*')")
    return target, ports


def parse_ip_range(text: str) -> tuple[IPNetwork, ...]:
    if "-" in text and "/" not in text:
        a, _, b = text.partition("-")
        first, last = ipaddress.ip_address(a.strip()), ipaddress.ip_address(b.strip())
        if first.version != last.version or int(first) > int(last):
            raise ValueError(f"bad address range {text!r}")
        return tuple(ipaddress.summarize_address_range(first, last))
    return (ipaddress.ip_network(text, strict=False),)


def parse_ip_capability(text: str) -> ProtoPorts:
    """A grant's `ip` entry: `*`, `22`, `tcp:22`, `udp:1000-2000`, `icmp:*`, `6:443`."""
    if text == "*":
        return ProtoPorts(ANY_PROTO, ALL_PORTS)
    proto_text, sep, ports_text = text.partition(":")
    if not sep:
        return ProtoPorts(DEFAULT_PROTOS, parse_ports(text))
    protos = parse_proto(proto_text)
    ports = parse_ports(ports_text)
    if not (protos & PORT_PROTOS) and ports != ALL_PORTS:
        raise ValueError(f"ip {text!r}: ports must be '*' for a protocol without ports")
    return ProtoPorts(protos, ports)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def subtract_prefixes(add: list[IPNetwork], remove: list[IPNetwork]) -> tuple[IPNetwork, ...]:
    """add minus remove, as few CIDRs as possible. Works on integer ranges, so the cost is
    linear in the entries; raises ValueError if the result needs more than MAX_ITEMS CIDRs."""
    out: list[IPNetwork] = []
    for version, cls in ((4, ipaddress.IPv4Address), (6, ipaddress.IPv6Address)):
        keep = _merge(
            [(int(n.network_address), int(n.broadcast_address)) for n in add if n.version == version]
        )
        cut = _merge(
            [(int(n.network_address), int(n.broadcast_address)) for n in remove if n.version == version]
        )
        result: list[tuple[int, int]] = []
        j = 0
        for lo, hi in keep:
            while j < len(cut) and cut[j][1] < lo:
                j += 1
            cur, k = lo, j
            while k < len(cut) and cut[k][0] <= hi:
                if cut[k][0] > cur:
                    result.append((cur, cut[k][0] - 1))
                cur = max(cur, cut[k][1] + 1)
                k += 1
            if cur <= hi:
                result.append((cur, hi))
        for lo, hi in result:
            out.extend(ipaddress.summarize_address_range(cls(lo), cls(hi)))
            if len(out) > MAX_ITEMS:
                raise ValueError(f"its removals split it into more than {MAX_ITEMS} CIDRs")
    return tuple(out)
