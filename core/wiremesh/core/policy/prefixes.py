"""Compress a set of addresses and prefixes into the fewest CIDR prefixes covering exactly it.

A node that everyone may reach gets an inbound filter rule whose sources are every node's
address; coord allocates those sequentially from 100.64.0.0/10 and fd7a:115c:a1e0::/48, so the
set is mostly a few long runs, and a run of N addresses is at most about 2*log2(N) prefixes.
The result covers exactly the same addresses as the input (no more, no less), so a packet
filter built from it accepts exactly the same sources.

Works on integers: `ipaddress.collapse_addresses` gives the same answer but costs several
times more on the thousands of addresses a large tailnet's rule holds.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Span = tuple[int, int, int]  # (IP version, first address, last address) as integers
BITS = {4: 32, 6: 128}


def span_of(prefix: str) -> Span:
    """(version, first, last) of "100.64.0.1", "100.64.0.0/30" or "fd7a::/48" (host bits ignored)."""
    net = ipaddress.ip_network(prefix, strict=False)
    return net.version, int(net.network_address), int(net.broadcast_address)


def merge_spans(spans: Iterable[Span]) -> list[Span]:
    """Sorted, with overlapping and adjacent spans of one version joined."""
    out: list[Span] = []
    for version, lo, hi in sorted(spans):
        if out:
            v, plo, phi = out[-1]
            if v == version and lo <= phi + 1:
                if hi > phi:
                    out[-1] = (v, plo, hi)
                continue
        out.append((version, lo, hi))
    return out


def span_cidrs(version: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """The fewest (network address, prefix length) blocks covering exactly lo..hi."""
    bits = BITS[version]
    out = []
    while lo <= hi:
        # The largest block starting at lo is limited by lo's alignment and by what is left.
        size = lo & -lo if lo else 1 << bits
        room = hi - lo + 1
        while size > room:
            size >>= 1
        out.append((lo, bits - size.bit_length() + 1))
        lo += size
    return out


@functools.lru_cache(maxsize=1 << 16)
def _format(version: int, network: int, prefixlen: int) -> str:
    # Cached: the same node addresses are formatted for many rules, and an IPv6 address's
    # text costs microseconds (more than the whole compression of it).
    address = ipaddress.IPv4Address(network) if version == 4 else ipaddress.IPv6Address(network)
    return f"{address}/{prefixlen}"


def compress_spans(spans: Iterable[Span]) -> tuple[str, ...]:
    """Minimal CIDR prefixes (IPv4 first, then IPv6, ascending) covering exactly the spans."""
    out: list[str] = []
    for version, lo, hi in merge_spans(spans):
        out.extend(_format(version, net, plen) for net, plen in span_cidrs(version, lo, hi))
    return tuple(out)


def compress_hosts(v4: Iterable[int], v6: Iterable[int]) -> tuple[str, ...]:
    """compress_spans for single addresses (a rule's identity sources), the common case: a
    sort of plain integers and one pass over the runs, each lone address's text cached."""
    out: list[str] = []
    for version, values in ((4, v4), (6, v6)):
        ordered = sorted(set(values))
        if not ordered:
            continue
        bits = BITS[version]
        start = prev = ordered[0]
        for value in ordered[1:]:
            if value != prev + 1:
                if start == prev:
                    out.append(_format(version, start, bits))
                else:
                    out.extend(_format(version, n, p) for n, p in span_cidrs(version, start, prev))
                start = value
            prev = value
        if start == prev:
            out.append(_format(version, start, bits))
        else:
            out.extend(_format(version, n, p) for n, p in span_cidrs(version, start, prev))
    return tuple(out)


def compress_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    """Minimal CIDR prefixes covering exactly the union of `prefixes` (addresses or CIDRs)."""
    return compress_spans(span_of(p) for p in prefixes)
