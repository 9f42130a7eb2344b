"""Cryptokey routing table: longest-prefix match from an IP address to its owner (a WireGuard peer).

One dict per prefix length and address family, probed from the longest length present to the
shortest. A mesh has only a handful of distinct lengths (/32, /128, a pod CIDR, maybe /0), so a
lookup is a few integer shifts and dict probes, which beats a bit-by-bit trie walk in Python.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, TypeVar

__all__ = ["AllowedIPs"]

T = TypeVar("T")


class _Family(Generic[T]):
    __slots__ = ("bits", "lengths", "tables")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.tables: dict[int, dict[int, T]] = {}
        self.lengths: list[tuple[int, int, dict[int, T]]] = []  # (length, shift, table), longest first

    def reindex(self) -> None:
        for length in [n for n, table in self.tables.items() if not table]:
            del self.tables[length]
        self.lengths = [(n, self.bits - n, self.tables[n]) for n in sorted(self.tables, reverse=True)]


class AllowedIPs(Generic[T]):
    """Longest-prefix match for IPv4 and IPv6. Not thread-safe (the Device's lock covers it)."""

    __slots__ = ("_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)

    def insert(self, prefix: str, value: T) -> None:
        """Route `prefix` ("10.0.0.0/24", "fd00::/64", or a bare address) to `value`.

        Host bits are masked off, as `wg` does. A prefix already owned by another value moves to
        `value`. ValueError on text that is not an IP prefix.
        """
        network = ipaddress.ip_network(prefix.strip(), strict=False)
        family = self._v4 if network.version == 4 else self._v6
        length = network.prefixlen
        key = int(network.network_address) >> (family.bits - length)
        table = family.tables.get(length)
        if table is None:
            table = family.tables[length] = {}
        table[key] = value
        family.reindex()

    def remove_value(self, value: T) -> None:
        """Forget every prefix owned by `value`."""
        for family in (self._v4, self._v6):
            for table in family.tables.values():
                for key in [k for k, v in table.items() if v is value or v == value]:
                    del table[key]
            family.reindex()

    def lookup(self, address: bytes) -> T | None:
        """The owner of the longest prefix containing `address` (4 or 16 raw bytes), or None."""
        n = len(address)
        if n == 4:
            lengths = self._v4.lengths
        elif n == 16:
            lengths = self._v6.lengths
        else:
            return None
        a = int.from_bytes(address, "big")
        for _length, shift, table in lengths:
            value = table.get(a >> shift)
            if value is not None:
                return value
        return None

    def prefixes(self, value: T) -> list[str]:
        """The prefixes owned by `value`, as text, IPv4 first, longest first."""
        out: list[str] = []
        for family, cls in ((self._v4, ipaddress.IPv4Network), (self._v6, ipaddress.IPv6Network)):
            for length, shift, table in family.lengths:
                for key, owner in table.items():
                    if owner is value or owner == value:
                        out.append(str(cls((key << shift, length))))
        return out

    def clear(self) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
