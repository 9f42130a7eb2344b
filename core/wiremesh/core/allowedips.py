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

_CACHE_SIZE = 4096


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
    """Longest-prefix match for IPv4 and IPv6. Not thread-safe (the Device's lock covers it).

    Values must be hashable (peers hash by identity); each value's prefixes are indexed so that
    reconfiguring one peer costs only its own prefixes, not the whole table.
    """

    __slots__ = ("_cache", "_owned", "_v4", "_v6")

    def __init__(self) -> None:
        self._v4: _Family[T] = _Family(32)
        self._v6: _Family[T] = _Family(128)
        # value -> {(bits, length, key)}: what each owner holds, for remove_value and prefixes.
        self._owned: dict[T, set[tuple[int, int, int]]] = {}
        self._cache: dict[bytes, T | None] = {}

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
        entry = (family.bits, length, key)
        previous = table.get(key)
        if previous is not None:
            owned = self._owned.get(previous)
            if owned is not None:
                owned.discard(entry)
                if not owned:
                    del self._owned[previous]
        table[key] = value
        self._owned.setdefault(value, set()).add(entry)
        family.reindex()
        self._cache.clear()

    def remove_value(self, value: T) -> None:
        """Forget every prefix owned by `value`."""
        owned = self._owned.pop(value, None)
        if not owned:
            return
        for bits, length, key in owned:
            family = self._v4 if bits == 32 else self._v6
            family.tables[length].pop(key, None)
        self._v4.reindex()
        self._v6.reindex()
        self._cache.clear()

    def lookup(self, address: bytes) -> T | None:
        """The owner of the longest prefix containing `address` (4 or 16 raw bytes), or None.

        Answers are cached per address (a tunnel talks to few addresses, and a dict probe is far
        cheaper than the prefix walk); any change to the table empties the cache.
        """
        try:
            return self._cache[address]
        except KeyError:
            pass
        except (TypeError, ValueError):  # unhashable buffer (bytearray, writable memoryview): no cache
            return self._walk(bytes(address))
        value = self._walk(address)
        cache = self._cache
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[bytes(address)] = value
        return value

    def _walk(self, address: bytes) -> T | None:
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
        entries = sorted(self._owned.get(value, ()), key=lambda e: (e[0], -e[1], e[2]))
        out: list[str] = []
        for bits, length, key in entries:
            cls = ipaddress.IPv4Network if bits == 32 else ipaddress.IPv6Network
            out.append(str(cls((key << (bits - length), length))))
        return out

    def clear(self) -> None:
        self._v4 = _Family(32)
        self._v6 = _Family(128)
        self._owned = {}
        self._cache.clear()
