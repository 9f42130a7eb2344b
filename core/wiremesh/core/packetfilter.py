"""The agent's stateful inbound packet filter (sans-I/O: packets and `now` in, verdicts out).

One Filter lives as long as the agent's interface and sees every packet, also while no policy is
set (allow-all): a flow is remembered from its first packet with who opened it. Decrypted packets
a peer sends go through `check_inbound` (or `filter_inbound` for a batch); what we send goes
through `note_outbound`. An inbound packet passes if it belongs to a flow this node opened, or if
the rules in force (or allow-all) admit its flow. A flow a peer opened stays the peer's: our
replies in it never make it ours, so whenever rules are installed (the first policy too) every
such flow is judged again at its next packet and cut if the new rules do not admit it, including
flows opened while no policy was set. Only a TCP SYN without ACK, or the first packet of a flow we
know nothing about (one evicted or expired), makes a flow ours.

TCP, UDP and SCTP flows are keyed by addresses and ports, ICMP echo by its identifier; other
protocols by addresses. ICMP errors (unreachable, time exceeded, packet too big) pass only when
they quote a live flow and come from that flow's far end (the address the quoted packet went to),
so path MTU discovery keeps working while a peer cannot forge errors about our other flows.
Non-first fragments carry no ports and pass, as in Tailscale: the first fragment was checked and
without it nothing reassembles.

Fast path: a flow's key is a slice of the packet's own header bytes, and a packet of a known flow
whose verdict is current (ours, or admitted under the rules' present generation) costs one slice,
one dict lookup and one compare. `set_rules` starts a new generation, so no cached verdict
survives a policy change. Everything else (new flows, IPv4 options, IPv6 extension headers,
ICMP) takes the full parse and the rule scan against rules pre-indexed by (IP version, protocol).

`from_netmap([])` keeps the netmap convention that an empty list means "no policy: allow all";
the policy compiler never emits an empty list for a node that may receive nothing.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from wiremesh.core.policy.model import PORT_PROTOS, FilterRule

log = logging.getLogger(__name__)

ICMP4 = 1
ICMP6 = 58
TCP = 6
UDP = 17
_ECHO_REQUEST = {4: 8, 6: 128}
_ECHO_REPLY = {4: 0, 6: 129}
_ICMP4_ERRORS = frozenset({3, 11, 12})
_ICMP6_ERRORS = frozenset({1, 2, 3, 4})
_V6_EXT = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_V6_FRAGMENT = 44
_MAX_EXT_HEADERS = 8
_NO_PORTS = b"\x00\x00\x00\x00"

DEFAULT_MAX_FLOWS = 65536
TIMEOUTS = {TCP: 3600.0, UDP: 120.0, 132: 3600.0, ICMP4: 30.0, ICMP6: 30.0}
OTHER_TIMEOUT = 120.0
SWEEP_INTERVAL = 10.0

DROP_REASONS = ("not_ip", "malformed", "no_rule")

# (protocol, source address | destination address | source port | destination port), the
# addresses and ports as the packet carries them; ICMP echo puts its identifier in both ports.
FlowKey = tuple[int, bytes]
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


def reverse_key(key: FlowKey) -> FlowKey:
    """The same flow's key as packets in the other direction carry it."""
    proto, raw = key
    half = (len(raw) - 4) // 2
    ports = 2 * half
    return proto, raw[half:ports] + raw[:half] + raw[ports + 2 : ports + 4] + raw[ports : ports + 2]


class _Flow:
    """One flow, reachable under both directions' keys. `generation` is the rules generation
    whose verdict admitted a peer's flow; our own flows need no verdict."""

    __slots__ = ("expiry", "generation", "inbound_key", "ours", "timeout")

    def __init__(self, inbound_key: FlowKey, ours: bool, generation: int, timeout: float, now: float) -> None:
        self.inbound_key = inbound_key
        self.ours = ours
        self.generation = generation
        self.timeout = timeout
        self.expiry = now + timeout


class _Header:
    """What the full parse learns about a packet (slow path only)."""

    __slots__ = ("dst", "error_about", "icmp_type", "key", "off", "port", "proto", "src", "version")

    def __init__(self) -> None:
        self.version = 0
        self.proto = 0
        self.src = b""
        self.dst = b""
        self.off = 0
        self.port = 0
        self.key: FlowKey | None = None
        self.icmp_type = -1
        # For an ICMP error: the quoted packet's key (as we sent it) and where it went.
        self.error_about: tuple[FlowKey, bytes] | None = None


_FRAGMENT = "fragment"


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
        # Every live flow under the key its inbound packets carry, and under the key our
        # outbound packets carry (the same _Flow object).
        self._inbound: dict[FlowKey, _Flow] = {}
        self._outbound: dict[FlowKey, _Flow] = {}
        self._generation = 0
        self._next_sweep = 0.0
        self.rules: tuple[FilterRule, ...] = ()
        self.set_rules(rules)

    @classmethod
    def from_netmap(cls, packet_filter: Iterable[Mapping[str, Any]], **kwargs: Any) -> Filter:
        """Build from the netmap's `packet_filter` dicts (ValueError if malformed)."""
        rules = [FilterRule.from_dict(dict(r)) for r in packet_filter]
        return cls(rules, allow_all=not rules, **kwargs)

    def set_rules(self, rules: Iterable[FilterRule], allow_all: bool | None = None) -> None:
        """Swap in new rules: every flow a peer opened is judged again at its next packet; the
        flows this node opened keep passing."""
        rules = tuple(rules)
        by_proto, any_proto = _build_index(rules)
        if allow_all is not None:
            self.allow_all = allow_all
        self.rules = rules
        self._by_proto, self._any_proto = by_proto, any_proto
        # Last: a verdict reached while the old rules were read carries the old generation.
        self._generation += 1

    @property
    def flow_count(self) -> int:
        return len(self._inbound)

    # ---- the hot path ----

    def filter_inbound(self, packets: list[bytes], now: float) -> list[bytes]:
        """The packets of a batch that may be delivered (check_inbound for each, the fast path
        inlined)."""
        flows, generation = self._inbound, self._generation
        kept: list[bytes] = []
        admitted = replies = 0
        for packet in packets:
            key = _fast_key(packet)
            if key is not None:
                flow = flows.get(key)
                if flow is not None and flow.expiry >= now:
                    if flow.ours:
                        replies += 1
                    elif flow.generation == generation:
                        admitted += 1
                    else:
                        flow = None  # admitted under older rules: judge it again
                    if flow is not None:
                        flow.expiry = now + flow.timeout
                        kept.append(packet)
                        continue
            if self._check_inbound_slow(packet, now):
                kept.append(packet)
        self.accepted += admitted
        self.accepted_replies += replies
        return kept

    def admit_flow(self, packet: bytes, count: int, now: float) -> bool:
        """filter_inbound for `count` packets of one TCP/UDP flow (one 5-tuple, no fragments),
        judged by the first, `packet`, and counted as `count`: packets with one flow key have one
        verdict, whatever their flags or payload."""
        accepted, replies = self.accepted, self.accepted_replies
        if count == 1:
            return bool(self.filter_inbound([packet], now))
        # A live flow admits without touching the drop counters (filter_inbound's fast path);
        # only a verdict that may deny needs to know which counter it moved.
        before = None if self.in_live_flow(packet, now) else dict(self.drops)
        if self.filter_inbound([packet], now):
            self.accepted += (self.accepted - accepted) * (count - 1)
            self.accepted_replies += (self.accepted_replies - replies) * (count - 1)
            return True
        if before is not None:
            for reason, n in self.drops.items():
                if n != before.get(reason, 0):
                    self.drops[reason] = n + count - 1
        return False

    def in_live_flow(self, packet: bytes, now: float) -> bool:
        """Does `packet` belong to a flow this filter admits without judging it again (a live
        flow of ours, or of the peer's admitted under the current rules)? Changes nothing."""
        key = _fast_key(packet)
        flow = self._inbound.get(key) if key is not None else None
        return flow is not None and flow.expiry >= now and (flow.ours or flow.generation == self._generation)

    def check_inbound(self, packet: bytes, now: float) -> bool:
        """True if this decrypted packet from a peer may be delivered."""
        return bool(self.filter_inbound([packet], now))

    def note_outbound_batch(self, packets: list[bytes], now: float) -> list[bytes]:
        """note_outbound for each packet of a batch, the fast path inlined. Returns the packets
        that opened a flow of ours or took one over (what another copy of the filter must learn)."""
        flows = self._outbound
        opened: list[bytes] = []
        for packet in packets:
            key = _fast_key(packet)
            if key is not None:
                flow = flows.get(key)
                if flow is not None and flow.expiry >= now:
                    if flow.ours:
                        flow.expiry = now + flow.timeout
                        continue
                    # A reply in the peer's flow, unless it is our own SYN reusing the tuple.
                    if not _tcp_syn(packet):
                        continue
            if self._note_outbound_slow(packet, now):
                opened.append(packet)
        return opened

    def count(self, drops: dict[str, int], accepted: int, accepted_replies: int) -> None:
        """Add what another copy of this filter (an agent's receive worker) counted."""
        for reason, n in drops.items():
            self.drops[reason] = self.drops.get(reason, 0) + n
        self.accepted += accepted
        self.accepted_replies += accepted_replies

    def note_outbound(self, packet: bytes, now: float) -> bool:
        """Record a packet this node sends, so that replies to it pass. Always True."""
        self.note_outbound_batch([packet], now)
        return True

    # ---- the slow path ----

    def _check_inbound_slow(self, packet: bytes, now: float) -> bool:
        header = self._parse(packet)
        if isinstance(header, str):
            if header is _FRAGMENT:
                self.accepted += 1
                return True
            self.drops[header] += 1
            return False
        if now >= self._next_sweep:
            self.sweep(now)
        if header.error_about is not None:
            return self._check_icmp_error(header, now)
        generation = self._generation
        key = header.key
        flow = self._inbound.get(key) if key is not None else None
        if flow is not None and flow.expiry < now:
            self._forget(flow)
            flow = None
        if flow is not None and (flow.ours or flow.generation == generation):
            flow.expiry = now + flow.timeout
            if flow.ours:
                self.accepted_replies += 1
            else:
                self.accepted += 1
            return True
        if not (self.allow_all or self._rules_allow(header)):
            # A denied flow of the peer's stays known as the peer's: our replies in it must
            # not adopt it.
            self.drops["no_rule"] += 1
            return False
        self.accepted += 1
        if flow is not None:
            flow.generation = generation
            flow.expiry = now + flow.timeout
        elif key is not None:
            self._add(key, ours=False, generation=generation, now=now)
        return True

    def _check_icmp_error(self, header: _Header, now: float) -> bool:
        assert header.error_about is not None
        quoted_key, quoted_destination = header.error_about
        flow = self._outbound.get(quoted_key)
        if (
            flow is not None
            and flow.expiry >= now
            and (flow.ours or flow.generation == self._generation)
            and header.src == quoted_destination  # only the far end of the flow may report on it
        ):
            self.accepted_replies += 1
            return True
        self.drops["no_rule"] += 1
        return False

    def _note_outbound_slow(self, packet: bytes, now: float) -> bool:
        header = self._parse(packet)
        if isinstance(header, str) or header.key is None or header.error_about is not None:
            return False  # nothing to remember: fragments, garbage, ICMP errors and echo replies
        proto = header.proto
        if proto in (ICMP4, ICMP6) and header.icmp_type != _ECHO_REQUEST[header.version]:
            return False  # only echo requests open a flow
        out_key = header.key
        # A TCP SYN without ACK (or an echo request) opens a new flow of ours, whatever came before.
        if proto == TCP:
            opener = len(packet) >= header.off + 14 and packet[header.off + 13] & 0x12 == 0x02
        else:
            opener = proto in (ICMP4, ICMP6)
        flow = self._outbound.get(out_key)
        if flow is not None and flow.expiry < now:
            self._forget(flow)
            flow = None
        changed = True
        if flow is None:
            # New, or older than our memory of it (evicted, expired): ours.
            self._add(reverse_key(out_key), ours=True, generation=self._generation, now=now)
        elif flow.ours or opener:
            changed = not flow.ours or opener
            flow.ours = True
            flow.expiry = now + flow.timeout
        else:
            changed = False
        if now >= self._next_sweep:
            self.sweep(now)
        return changed

    def _parse(self, packet: bytes) -> _Header | str:
        """The full parse: a _Header, _FRAGMENT for a non-first fragment, or a drop reason."""
        n = len(packet)
        if n == 0:
            return "not_ip"
        h = _Header()
        version = packet[0] >> 4
        if version == 4:
            if n < 20:
                return "malformed"
            off = (packet[0] & 15) * 4
            if off < 20 or n < off:
                return "malformed"
            if (packet[6] & 0x1F) or packet[7]:  # non-first fragment: no transport header
                return _FRAGMENT
            proto = packet[9]
            h.src, h.dst = packet[12:16], packet[16:20]
        elif version == 6:
            if n < 40:
                return "malformed"
            proto = packet[6]
            h.src, h.dst = packet[8:24], packet[24:40]
            off = 40
            if proto in _V6_EXT or proto == _V6_FRAGMENT:
                walked = _walk_v6(packet, proto, off)
                if walked is None:
                    return "malformed"
                proto, off = walked
                if proto < 0:
                    return _FRAGMENT
        else:
            return "not_ip"
        h.version, h.proto, h.off = version, proto, off
        addresses = h.src + h.dst
        if proto in PORT_PROTOS:
            if n < off + 4:
                return "malformed"
            h.port = (packet[off + 2] << 8) | packet[off + 3]
            h.key = (proto, addresses + packet[off : off + 4])
        elif proto in (ICMP4, ICMP6):
            if n < off + 8:
                return "malformed"
            h.icmp_type = icmp_type = packet[off]
            if icmp_type in (_ECHO_REQUEST[version], _ECHO_REPLY[version]):
                ident = packet[off + 4 : off + 6]
                h.key = (proto, addresses + ident + ident)
            elif icmp_type in (_ICMP4_ERRORS if version == 4 else _ICMP6_ERRORS):
                h.error_about = _quoted(packet, off + 8, version)
                if h.error_about is None:
                    return "malformed"
        else:
            h.key = (proto, addresses + _NO_PORTS)
        return h

    def _rules_allow(self, h: _Header) -> bool:
        version, proto = h.version, h.proto
        src, dst, port = int.from_bytes(h.src, "big"), int.from_bytes(h.dst, "big"), h.port
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

    # ---- the flow table ----

    def _add(self, inbound_key: FlowKey, *, ours: bool, generation: int, now: float) -> None:
        if len(self._inbound) >= self.max_flows:
            self._make_room(now)
        flow = _Flow(inbound_key, ours, generation, TIMEOUTS.get(inbound_key[0], OTHER_TIMEOUT), now)
        self._inbound[inbound_key] = flow
        self._outbound[reverse_key(inbound_key)] = flow

    def _forget(self, flow: _Flow) -> None:
        key = flow.inbound_key
        if self._inbound.get(key) is flow:
            self._inbound.pop(key, None)
        out_key = reverse_key(key)
        if self._outbound.get(out_key) is flow:
            self._outbound.pop(out_key, None)

    def sweep(self, now: float) -> int:
        """Forget expired flows; returns how many. (Called from the slow path periodically.)"""
        self._next_sweep = now + SWEEP_INTERVAL
        # list() copies in one step under the GIL, so packets in other threads are safe.
        expired = [flow for flow in list(self._inbound.values()) if flow.expiry < now]
        for flow in expired:
            self._forget(flow)
        return len(expired)

    def _make_room(self, now: float) -> None:
        self.sweep(now)
        while len(self._inbound) >= self.max_flows:
            # Full of live flows: forget the oldest one (insertion order).
            try:
                oldest = next(iter(self._inbound.values()))
            except (StopIteration, RuntimeError):
                return
            self._forget(oldest)
            self.flows_evicted += 1


def _fast_key(packet: bytes) -> FlowKey | None:
    """The flow key of a TCP or UDP packet with a plain header (IPv4 without options, IPv6
    without extension headers, not a later fragment): slices of the header as it is. None
    sends the packet down the full parse."""
    n = len(packet)
    if n >= 24 and packet[0] == 0x45 and not (packet[6] & 0x1F or packet[7]):
        proto = packet[9]
        if proto in (TCP, UDP):
            return proto, packet[12:24]
    elif n >= 44 and packet[0] >> 4 == 6:
        proto = packet[6]
        if proto in (TCP, UDP):
            return proto, packet[8:44]
    return None


def _tcp_syn(packet: bytes) -> bool:
    """A plain-header TCP packet (see _fast_key) with SYN and without ACK."""
    flags = 33 if packet[0] == 0x45 else 53
    return packet[9 if flags == 33 else 6] == TCP and len(packet) > flags and packet[flags] & 0x12 == 0x02


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


def _quoted(packet: bytes, off: int, version: int) -> tuple[FlowKey, bytes] | None:
    """An ICMP error's quoted packet (one we sent): its flow key as we sent it, and the address
    it went to."""
    n = len(packet)
    if version == 4:
        if n < off + 20 or packet[off] >> 4 != 4:
            return None
        inner_off = off + (packet[off] & 15) * 4
        proto = packet[off + 9]
        local, remote = packet[off + 12 : off + 16], packet[off + 16 : off + 20]
    else:
        if n < off + 40 or packet[off] >> 4 != 6:
            return None
        inner_off = off + 40
        proto = packet[off + 6]
        local, remote = packet[off + 8 : off + 24], packet[off + 24 : off + 40]
    if proto in PORT_PROTOS:
        if n < inner_off + 4:
            return None
        return (proto, local + remote + packet[inner_off : inner_off + 4]), remote
    if proto in (ICMP4, ICMP6):
        if n < inner_off + 8:
            return None
        ident = packet[inner_off + 4 : inner_off + 6]
        return (proto, local + remote + ident + ident), remote
    return (proto, local + remote + _NO_PORTS), remote
