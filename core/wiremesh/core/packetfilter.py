"""The agent's stateful inbound packet filter (sans-I/O: packets and `now` in, verdicts out).

Every decrypted packet a peer sends us goes through `check_inbound(packet, now)`: it passes
if it answers a flow this node opened (recorded by `note_outbound` on every packet we send)
or if a filter rule from the netmap allows it. A flow the peer opened stays the peer's: the
filter remembers flows it admitted, and our replies in them do not count as opening a flow
of ours, so when the rules stop allowing such a flow its next packet is dropped. An outbound
packet of a flow we know nothing about (a connection older than the filter) adopts it. TCP, UDP and SCTP flows are
keyed by addresses and ports, ICMP echo by its identifier; ICMP errors about one of our flows
(unreachable, time exceeded, packet too big) pass so path MTU discovery keeps working.
Non-first fragments carry no ports and pass, as in Tailscale: the first fragment was checked
and without it nothing reassembles.

Per packet the work is header slicing and integer compares against rules pre-indexed by
(IP version, protocol); rules are re-checked on every packet of a flow someone else opened,
so a policy change cuts such flows at once.

`from_netmap([])` keeps the netmap convention that an empty list means "no policy: allow all";
the policy compiler never emits an empty list for a node that may receive nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from wiremesh.core.policy.model import PORT_PROTOS, FilterRule

log = logging.getLogger(__name__)

ICMP4 = 1
ICMP6 = 58
_ECHO_REQUEST = {4: 8, 6: 128}
_ECHO_REPLY = {4: 0, 6: 129}
_ICMP4_ERRORS = frozenset({3, 11, 12})
_ICMP6_ERRORS = frozenset({1, 2, 3, 4})
_V6_EXT = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_V6_FRAGMENT = 44
_MAX_EXT_HEADERS = 8

DEFAULT_MAX_FLOWS = 65536
TIMEOUTS = {6: 3600.0, 17: 120.0, 132: 3600.0, ICMP4: 30.0, ICMP6: 30.0}
OTHER_TIMEOUT = 120.0
SWEEP_INTERVAL = 10.0

DROP_REASONS = ("not_ip", "malformed", "no_rule")

# (lo, hi) integer ranges
_Ranges = tuple[tuple[int, int], ...]
# (dst ranges, port ranges or None for any, source matches everything, exact sources, source ranges)
_Entry = tuple[_Ranges, _Ranges | None, bool, frozenset[int], _Ranges]


def _prefix_range(prefix: str) -> tuple[int, int, int]:
    """(version, first, last) of a prefix like "100.64.0.1/32" or "fd7a::/48"."""
    net = ipaddress.ip_network(prefix, strict=False)
    return net.version, int(net.network_address), int(net.broadcast_address)


def _build_index(rules: Iterable[FilterRule]) -> tuple[dict[int, list[_Entry]], dict[int, list[_Entry]]]:
    """(entries by version*256+proto, any-protocol entries by version).

    Rules with the same destinations and ports are merged into one entry (their sources
    unioned): a node's rules mostly target its own addresses on a few port sets, so a packet
    then checks a handful of entries instead of one per policy rule."""
    merged: dict[
        tuple[int, int],
        dict[tuple[_Ranges, _Ranges | None], tuple[list[bool], set[int], set[tuple[int, int]]]],
    ] = {}
    for rule in rules:
        for version in (4, 6):
            dst = tuple(sorted((lo, hi) for v, lo, hi in map(_prefix_range, rule.dst) if v == version))
            if not dst:
                continue
            exact: set[int] = set()
            ranges: set[tuple[int, int]] = set()
            src_any = False
            for v, lo, hi in map(_prefix_range, rule.src):
                if v != version:
                    continue
                if lo == hi:
                    exact.add(lo)
                elif lo == 0 and hi == (1 << (32 if v == 4 else 128)) - 1:
                    src_any = True
                else:
                    ranges.add((lo, hi))
            if not (src_any or exact or ranges):
                continue
            ports: _Ranges | None = tuple(sorted(rule.ports))
            if any(lo == 0 and hi == 65535 for lo, hi in rule.ports):
                ports = None
            for proto in rule.protos or (-1,):  # -1: any protocol
                slot = merged.setdefault((version, proto), {})
                any_flag, ex, rg = slot.setdefault((dst, ports), ([False], set(), set()))
                any_flag[0] = any_flag[0] or src_any
                ex |= exact
                rg |= ranges

    def entries(
        slot: dict[tuple[_Ranges, _Ranges | None], tuple[list[bool], set[int], set[tuple[int, int]]]],
    ) -> list[_Entry]:
        return [
            (dst, ports, flag[0], frozenset(ex), tuple(sorted(rg)))
            for (dst, ports), (flag, ex, rg) in slot.items()
        ]

    any_proto: dict[int, list[_Entry]] = {4: [], 6: []}
    by_proto: dict[int, list[_Entry]] = {}
    for (version, proto), slot in merged.items():
        if proto == -1:
            any_proto[version] = entries(slot)
    for (version, proto), slot in merged.items():
        if proto != -1:
            # Any-protocol rules apply to every protocol: append them to each specific list
            # too, so a packet consults exactly one list.
            by_proto[version * 256 + proto] = entries(slot) + any_proto[version]
    return by_proto, any_proto


class Filter:
    """Stateful inbound filter for one node. See the module docstring."""

    def __init__(
        self,
        rules: Iterable[FilterRule] = (),
        *,
        allow_all: bool = False,
        max_flows: int = DEFAULT_MAX_FLOWS,
    ) -> None:
        self.allow_all = allow_all
        self.max_flows = max_flows
        self.drops: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.accepted = 0
        self.accepted_replies = 0
        self.flows_evicted = 0
        # Flows this node opened, keyed as their inbound replies look: (proto, remote, local,
        # remote port, local port) -> expiry. Replies to these pass whatever the rules say.
        self._flows: dict[tuple[int, int, int, int, int], float] = {}
        # Flows a peer opened and the rules (or allow-all) admitted, same key. Our packets in
        # such a flow are replies: they must not turn it into "our" flow, or a policy change
        # could never cut it.
        self._admitted: dict[tuple[int, int, int, int, int], float] = {}
        # Admitted flows the current rules were checked against: later packets of such a flow
        # skip the rule scan. New rules start it empty, so every flow is judged again.
        self._passed: dict[tuple[int, int, int, int, int], float] = {}
        self._next_sweep = 0.0
        self.rules: tuple[FilterRule, ...] = ()
        self.set_rules(rules)

    @classmethod
    def from_netmap(cls, packet_filter: Iterable[Mapping[str, Any]], **kwargs: Any) -> Filter:
        """Build from the netmap's `packet_filter` dicts (ValueError if malformed)."""
        rules = [FilterRule.from_dict(dict(r)) for r in packet_filter]
        return cls(rules, allow_all=not rules, **kwargs)

    def set_rules(self, rules: Iterable[FilterRule], allow_all: bool | None = None) -> None:
        """Swap in new rules; the flow table (replies to our own flows) is kept."""
        self.rules = tuple(rules)
        self._by_proto, self._any_proto = _build_index(self.rules)
        if allow_all is not None:
            self.allow_all = allow_all
        self._passed = {}

    @property
    def flow_count(self) -> int:
        return len(self._flows)

    # ---- the hot path ----

    def check_inbound(self, packet: bytes, now: float) -> bool:
        """True if this decrypted packet from a peer may be delivered."""
        n = len(packet)
        if n == 0:
            self.drops["not_ip"] += 1
            return False
        version = packet[0] >> 4
        if version == 4:
            if n < 20:
                self.drops["malformed"] += 1
                return False
            off = (packet[0] & 15) * 4
            if off < 20 or n < off:
                self.drops["malformed"] += 1
                return False
            if (packet[6] & 0x1F) or packet[7]:  # non-first fragment: no transport header
                self.accepted += 1
                return True
            proto = packet[9]
            src = int.from_bytes(packet[12:16], "big")
            dst = int.from_bytes(packet[16:20], "big")
        elif version == 6:
            if n < 40:
                self.drops["malformed"] += 1
                return False
            proto = packet[6]
            src = int.from_bytes(packet[8:24], "big")
            dst = int.from_bytes(packet[24:40], "big")
            off = 40
            if proto in _V6_EXT or proto == _V6_FRAGMENT:
                walked = self._walk_v6(packet, proto, off)
                if walked is None:
                    self.drops["malformed"] += 1
                    return False
                proto, off = walked
                if proto < 0:  # non-first fragment
                    self.accepted += 1
                    return True
        else:
            self.drops["not_ip"] += 1
            return False

        port = 0
        key: tuple[int, int, int, int, int] | None = None
        if proto in PORT_PROTOS:
            if n < off + 4:
                self.drops["malformed"] += 1
                return False
            port = (packet[off + 2] << 8) | packet[off + 3]
            key = (proto, src, dst, (packet[off] << 8) | packet[off + 1], port)
        elif proto in (ICMP4, ICMP6):
            if n < off + 8:
                self.drops["malformed"] += 1
                return False
            icmp_type = packet[off]
            if icmp_type == _ECHO_REPLY[version]:
                key = (proto, src, dst, (packet[off + 4] << 8) | packet[off + 5], 0)
            elif icmp_type in (_ICMP4_ERRORS if version == 4 else _ICMP6_ERRORS):
                key = self._icmp_error_key(packet, off + 8, version)
        else:
            key = (proto, src, dst, 0, 0)

        if key is not None:
            flows = self._flows
            expiry = flows.get(key)
            if expiry is not None and expiry >= now:
                flows[key] = now + TIMEOUTS.get(key[0], OTHER_TIMEOUT)
                self.accepted_replies += 1
                return True
            expiry = self._passed.get(key)
            if expiry is not None and expiry >= now:
                self._admitted[key] = now + TIMEOUTS.get(proto, OTHER_TIMEOUT)
                self.accepted += 1
                return True

        # Taken before the rules are read: if new rules arrive meanwhile, this verdict lands
        # in the cache they discarded.
        passed = self._passed
        if self.allow_all or self._rules_allow(version, proto, src, dst, port):
            self.accepted += 1
            if key is not None and proto not in (ICMP4, ICMP6):
                admitted = self._admitted
                if key not in admitted and len(admitted) >= self.max_flows:
                    self._make_room(now)
                expiry = admitted[key] = now + TIMEOUTS.get(proto, OTHER_TIMEOUT)
                if len(passed) >= self.max_flows:
                    passed.clear()  # only a cache: the rules decide again
                passed[key] = expiry
            return True
        self.drops["no_rule"] += 1
        return False

    def _rules_allow(self, version: int, proto: int, src: int, dst: int, port: int) -> bool:
        entries = self._by_proto.get(version * 256 + proto)
        if entries is None:
            entries = self._any_proto[version]
        has_ports = proto in PORT_PROTOS
        for dst_ranges, ports, src_any, src_exact, src_ranges in entries:
            for lo, hi in dst_ranges:
                if lo <= dst <= hi:
                    break
            else:
                continue
            if ports is not None and has_ports:
                for lo, hi in ports:
                    if lo <= port <= hi:
                        break
                else:
                    continue
            if src_any or src in src_exact:
                return True
            for lo, hi in src_ranges:
                if lo <= src <= hi:
                    return True
        return False

    def note_outbound(self, packet: bytes, now: float) -> bool:
        """Record a packet this node sends, so that replies to it pass. Always True (it is
        also the engine's outbound hook, which must not drop)."""
        n = len(packet)
        if n == 0:
            return True
        version = packet[0] >> 4
        if version == 4:
            if n < 20:
                return True
            off = (packet[0] & 15) * 4
            if off < 20 or n < off or (packet[6] & 0x1F) or packet[7]:
                return True
            proto = packet[9]
            local = int.from_bytes(packet[12:16], "big")
            remote = int.from_bytes(packet[16:20], "big")
        elif version == 6:
            if n < 40:
                return True
            proto = packet[6]
            local = int.from_bytes(packet[8:24], "big")
            remote = int.from_bytes(packet[24:40], "big")
            off = 40
            if proto in _V6_EXT or proto == _V6_FRAGMENT:
                walked = self._walk_v6(packet, proto, off)
                if walked is None or walked[0] < 0:
                    return True
                proto, off = walked
        else:
            return True
        opener = False
        if proto in PORT_PROTOS:
            if n < off + 4:
                return True
            key = (
                proto,
                remote,
                local,
                (packet[off + 2] << 8) | packet[off + 3],
                (packet[off] << 8) | packet[off + 1],
            )
            # A TCP SYN without ACK opens a new connection of ours, whatever came before.
            opener = proto == 6 and n >= off + 14 and packet[off + 13] & 0x12 == 0x02
        elif proto in (ICMP4, ICMP6):
            if n < off + 8 or packet[off] != _ECHO_REQUEST[version]:
                return True  # only echo requests open a flow; replies and errors do not
            key = (proto, remote, local, (packet[off + 4] << 8) | packet[off + 5], 0)
        else:
            key = (proto, remote, local, 0, 0)
        if not opener:
            admitted = self._admitted.get(key)
            if admitted is not None and admitted >= now:
                return True  # a reply within a flow the peer opened: not ours to vouch for
        flows = self._flows
        if key not in flows and len(flows) >= self.max_flows:
            self._make_room(now)
        flows[key] = now + TIMEOUTS.get(proto, OTHER_TIMEOUT)
        if now >= self._next_sweep:
            self.sweep(now)
        return True

    # ---- helpers ----

    @staticmethod
    def _walk_v6(packet: bytes, proto: int, off: int) -> tuple[int, int] | None:
        """Skip IPv6 extension headers: (upper protocol, offset), (-1, off) for a non-first
        fragment, None if truncated."""
        n = len(packet)
        for _ in range(_MAX_EXT_HEADERS):
            if proto == _V6_FRAGMENT:
                if n < off + 8:
                    return None
                if ((packet[off + 2] << 8) | packet[off + 3]) & 0xFFF8:
                    return -1, off
                proto = packet[off]
                off += 8
            elif proto in _V6_EXT:
                if n < off + 2:
                    return None
                proto, off = packet[off], off + (packet[off + 1] + 1) * 8
            else:
                return proto, off
        return None

    def _icmp_error_key(self, packet: bytes, off: int, version: int) -> tuple[int, int, int, int, int] | None:
        """The flow key an ICMP error is about: its quoted packet is one we sent."""
        n = len(packet)
        if version == 4:
            if n < off + 20 or packet[off] >> 4 != 4:
                return None
            inner_off = off + (packet[off] & 15) * 4
            proto = packet[off + 9]
            local = int.from_bytes(packet[off + 12 : off + 16], "big")
            remote = int.from_bytes(packet[off + 16 : off + 20], "big")
        else:
            if n < off + 40 or packet[off] >> 4 != 6:
                return None
            inner_off = off + 40
            proto = packet[off + 6]
            local = int.from_bytes(packet[off + 8 : off + 24], "big")
            remote = int.from_bytes(packet[off + 24 : off + 40], "big")
        if proto in PORT_PROTOS:
            if n < inner_off + 4:
                return None
            return (
                proto,
                remote,
                local,
                (packet[inner_off + 2] << 8) | packet[inner_off + 3],
                (packet[inner_off] << 8) | packet[inner_off + 1],
            )
        if proto in (ICMP4, ICMP6):
            if n < inner_off + 8:
                return None
            return (proto, remote, local, (packet[inner_off + 4] << 8) | packet[inner_off + 5], 0)
        return (proto, remote, local, 0, 0)

    def sweep(self, now: float) -> int:
        """Forget expired flows; returns how many. (Called from note_outbound periodically.)"""
        self._next_sweep = now + SWEEP_INTERVAL
        count = 0
        for table in (self._flows, self._admitted, self._passed):
            # list() copies in one step under the GIL, so readers in other threads are safe.
            expired = [k for k, exp in list(table.items()) if exp < now]
            for k in expired:
                table.pop(k, None)
            count += len(expired)
        return count

    def _make_room(self, now: float) -> None:
        self.sweep(now)
        for table in (self._flows, self._admitted):
            if len(table) >= self.max_flows:
                # Full of live flows: forget the oldest one (insertion order).
                try:
                    oldest = next(iter(table))
                except (StopIteration, RuntimeError):
                    continue
                table.pop(oldest, None)
                self.flows_evicted += 1

    # ---- adapters for the engine's hooks (which pass only the packet) ----

    def hooks(
        self, clock: Callable[[], float] = time.monotonic
    ) -> tuple[Callable[[bytes], bool], Callable[[bytes], bool]]:
        """(inbound_filter, outbound_hook) callables for wiremesh.agent.engine.Engine."""
        check, note = self.check_inbound, self.note_outbound

        def inbound(packet: bytes) -> bool:
            return check(packet, clock())

        def outbound(packet: bytes) -> bool:
            return note(packet, clock())

        return inbound, outbound
