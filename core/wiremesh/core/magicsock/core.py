"""Path selection between direct UDP and the relay, sans-I/O.

`PathSelector` holds, for every peer, its candidate endpoints (from the netmap, from its
CallMeMaybe, and from addresses its pings came from), the disco pings in flight, the best
direct path and how long it stays trusted. It never touches a socket or a clock:

    ms = PathSelector(node_key, DiscoKey(), now)
    ms.set_peers([PeerInfo(...)], now)
    dest = ms.route(peer_node_key, now)          # where a WireGuard datagram goes: Direct or Relay
    ms.receive_disco(data, Direct(addr) or Relay(region, key), now)
    ms.handle_timer(now); ms.next_timer()
    ms.datagrams_to_send() -> [(bytes, Destination)];  ms.next_event() -> Event | None

Behaviour (DESIGN.md, "Paths a packet can take"):
- With no trusted direct path, traffic goes through the relay at once, and a discovery round
  pings every candidate and sends the peer a CallMeMaybe through the relay; rounds repeat with
  backoff (1 s doubling to 15 s) while there is traffic and no direct path.
- The first Pong makes its path the best; a later one replaces it when it is a LAN path and the
  best is not, or is clearly faster. A Pong trusts the path for TRUST_DURATION; heartbeats
  every HEARTBEAT_INTERVAL while traffic flows renew it. A heartbeat unanswered within
  PING_TIMEOUT drops the path at once (traffic falls back to the relay within
  HEARTBEAT_INTERVAL + PING_TIMEOUT of a failure).
- Where peers see us: a Pong over a public path says from which address the peer saw us. When
  that is our public IP but not the port we published (STUN), our NAT gives new flows another
  port than the STUN servers saw, typically because another host behind it holds our port
  towards them; we then also advertise the observed address (kind STUN) in our CallMeMaybes, so
  a peer's pings and birthday probes reach the mapping our new flows really use.
- Birthday probe, when our NAT maps per destination and the peer's does not: we ask the adapter
  for many probe sockets, ping the peer's public endpoints from each (opening as many mappings),
  and send a CallMeMaybe flagged `birthday`; the peer then sprays pings at many random ports of
  our public address. Any port in both sets is a working path; with N sockets and M sprayed
  ports over P possible ports a hit is expected N*M/P times (192 * 1400 / 64512 ≈ 4.2, so a
  round fails with probability about e^-4.2 ≈ 1.5 %). Rates and counts are bounded.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any

from wiremesh.core import disco
from wiremesh.core.disco import CallMeMaybe, DiscoError, DiscoKey, Endpoint, EndpointKind, Ping, Pong
from wiremesh.core.magicsock.types import (
    PRIMARY_SOCKET,
    Address,
    AddressConfirmed,
    CloseProbeSockets,
    Destination,
    Direct,
    Event,
    MappingChanged,
    OpenProbeSockets,
    PathChanged,
    PeerInfo,
    PingResult,
    Relay,
)

log = logging.getLogger(__name__)

TRUST_DURATION = 4.0  # a direct path stays trusted this long past its last Pong
HEARTBEAT_INTERVAL = 1.5  # ping the best path this often while traffic flows
PING_TIMEOUT = 1.2  # a heartbeat unanswered this long means the path is gone
SESSION_ACTIVE = 45.0  # traffic within this many seconds makes a peer "active"
DISCOVERY_FIRST_BACKOFF = 1.0  # rounds at 0, 1, 3, 7, 15 s, then every 15 s
DISCOVERY_MAX_BACKOFF = 15.0
UPGRADE_INTERVAL = 20.0  # with a direct path, re-ping every candidate this often (find better)
MIN_PING_SPACING = 0.8  # never ping one candidate more often (answers to ping storms)
CALL_ME_MAYBE_SPACING = 1.0
LEARNED_CANDIDATE_TTL = 120.0  # candidates learned from inbound pings expire without a Pong
MAX_CANDIDATES = 64
MAX_PENDING = 8192  # disco pings in flight, all peers together (oldest forgotten first)
DISCOVERY_PING_TIMEOUT = 5.0
MAX_OBSERVED = 4  # our own public addresses learned from Pongs, advertised beside the published
OBSERVED_TTL = 120.0  # one not seen again in any Pong for this long is no longer advertised

BIRTHDAY_AFTER_ROUNDS = 3  # plain hole punching gets rounds 1 and 2 (0 s and 1 s)
SHARED_NAT_BIRTHDAY_AFTER_ROUNDS = 4  # we share our NAT with another peer: from 7 s
BIRTHDAY_SOCKETS = 192
BIRTHDAY_SPRAY = 1400
BIRTHDAY_PORTS = (1024, 65535)  # Linux picks random NAT ports here
BIRTHDAY_ROUND = 6.0  # probe sockets wait this long for a hit before they are closed
BIRTHDAY_MIN_INTERVAL = 4.0  # per peer, between sprays we answer
SPRAY_BATCH = 100  # pings per tick ...
SPRAY_TICK = 0.02  # ... so at most 5,000 sprayed pings per second
LAN_LATENCY_BONUS = 0.5  # a LAN path's latency counts half when comparing paths
FASTER_BY = 0.7  # another public path must be this much faster to replace the best

_LAN_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7", "fe80::/10")
)


def is_lan_address(host: str) -> bool:
    """RFC 1918 / ULA / link-local: addresses that only mean something on one LAN."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in _LAN_NETS)


@dataclasses.dataclass(slots=True)
class Candidate:
    direct: Direct
    kind: EndpointKind
    learned_at: float
    configured: bool = False  # from the netmap or a CallMeMaybe (does not expire)
    last_ping: float = -1e9
    last_pong: float | None = None
    latency: float | None = None

    @property
    def lan(self) -> bool:
        return self.kind is EndpointKind.LOCAL or (
            self.kind is EndpointKind.UNKNOWN and is_lan_address(self.direct.address[0])
        )

    def score(self) -> float:
        latency = self.latency if self.latency is not None else 1.0
        return latency * LAN_LATENCY_BONUS if self.lan else latency


@dataclasses.dataclass(slots=True)
class PendingPing:
    node_key: bytes
    dest: Destination
    sent_at: float
    expires: float
    purpose: str  # discovery | heartbeat | spray | user


class PeerPath:
    """What we know about reaching one peer. `best`/`trust_until` are read on the hot path."""

    __slots__ = (
        "best",
        "best_since",
        "birthday_attempts",
        "birthday_deadline",
        "candidates",
        "derp_route",
        "disco_key",
        "discovery_backoff",
        "home_region",
        "last_birthday_answered",
        "last_call_me_maybe",
        "last_send",
        "mapping_varies",
        "netmap_hosts",
        "next_discovery",
        "next_upgrade",
        "node_key",
        "probe_sockets",
        "rounds",
        "trust_until",
        "wants_birthday",
    )

    def __init__(self, info: PeerInfo, now: float) -> None:
        self.node_key = info.node_key
        self.disco_key = info.disco_key
        self.home_region = info.home_region
        # The peer's addresses as coord published them (its STUN results among them): the only
        # hosts a birthday spray may aim at, whatever a CallMeMaybe claims.
        self.netmap_hosts = frozenset(ep.address[0] for ep in info.endpoints)
        self.derp_route: int | None = None  # the region the peer last reached us through
        self.candidates: dict[Direct, Candidate] = {}
        self.best: Candidate | None = None
        self.best_since = 0.0
        self.trust_until = 0.0
        self.last_send = -1e9
        self.next_discovery = now
        self.next_upgrade = now
        self.discovery_backoff = DISCOVERY_FIRST_BACKOFF
        self.last_call_me_maybe = -1e9
        self.mapping_varies = False
        self.probe_sockets: tuple[int, ...] = ()
        self.birthday_deadline: float | None = None
        self.birthday_attempts = 0
        self.wants_birthday = False
        self.last_birthday_answered = -1e9
        self.rounds = 0  # discovery rounds since the last direct path

    def active(self, now: float) -> bool:
        return now - self.last_send < SESSION_ACTIVE

    def trusted(self, now: float) -> Direct | None:
        best = self.best
        return best.direct if best is not None and now < self.trust_until else None

    def relay_region(self, fallback: int | None) -> int | None:
        if self.derp_route is not None:
            return self.derp_route
        return self.home_region if self.home_region is not None else fallback


class PathSelector:
    """The sans-I/O path selector for all peers of one node. See the module docstring."""

    def __init__(
        self,
        node_key: bytes,
        disco_key: DiscoKey,
        now: float,
        *,
        rng: random.Random | None = None,
        birthday_sockets: int = BIRTHDAY_SOCKETS,
        birthday_spray: int = BIRTHDAY_SPRAY,
    ) -> None:
        self.node_key = node_key
        self.disco = disco_key
        self.peers: dict[bytes, PeerPath] = {}
        self._by_disco: dict[bytes, PeerPath] = {}
        self._pending: OrderedDict[bytes, PendingPing] = OrderedDict()
        self._out: list[tuple[bytes, Destination]] = []
        self._events: deque[Event] = deque()
        self._spray: deque[tuple[bytes, Address]] = deque()  # (peer node key, destination)
        self._next_spray = 0.0
        self.local_endpoints: tuple[Endpoint, ...] = ()
        self.mapping_varies: bool | None = None  # None: not known (fewer than two STUN answers)
        self.home_region: int | None = None
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self._rng = rng or random.Random()
        self.birthday_sockets = birthday_sockets
        self.birthday_spray = birthday_spray
        self._now = now
        self._mapping_reported: Address | None = None
        # Our public address as peers' Pongs showed it, where it is not what we publish: our
        # address -> when a Pong last showed it (most recent last).
        self.observed: OrderedDict[Address, float] = OrderedDict()

    # ------------------------------------------------------------------- configuration

    def set_peers(self, peers: Iterable[PeerInfo], now: float) -> None:
        """Reconcile with the netmap: add, update (endpoints, keys, home region) and remove."""
        wanted = {p.node_key: p for p in peers}
        for key in list(self.peers):
            if key not in wanted:
                self._remove_peer(key)
        for key, info in wanted.items():
            path = self.peers.get(key)
            if path is None:
                path = self.peers[key] = PeerPath(info, now)
            elif path.disco_key != info.disco_key:
                self._by_disco.pop(path.disco_key or b"", None)
                path.disco_key = info.disco_key
            path.home_region = info.home_region
            path.netmap_hosts = frozenset(ep.address[0] for ep in info.endpoints)
            if info.disco_key is not None:
                self._by_disco[info.disco_key] = path
            for ep in info.endpoints:
                self._add_candidate(path, Direct(ep.address), ep.kind, now, configured=True)

    def _remove_peer(self, key: bytes) -> None:
        path = self.peers.pop(key)
        if path.disco_key is not None and self._by_disco.get(path.disco_key) is path:
            del self._by_disco[path.disco_key]
        if path.probe_sockets:
            self._events.append(CloseProbeSockets(key, ()))
        for tx in [tx for tx, p in self._pending.items() if p.node_key == key]:
            del self._pending[tx]

    def set_local_endpoints(
        self, endpoints: Sequence[Endpoint], mapping_varies: bool | None, now: float
    ) -> None:
        """Our own endpoints (and whether our NAT maps per destination; None when unknown, as
        with a single STUN server), sent in CallMeMaybe.

        A change starts a discovery round for every active peer: our old endpoints may be gone.
        """
        eps = tuple(endpoints)[: disco.MAX_ENDPOINTS]
        if eps == self.local_endpoints and mapping_varies == self.mapping_varies:
            # A netcheck that confirmed what we publish: a peer that still sees us elsewhere
            # does so because another host behind our NAT holds our port towards it, not
            # because the NAT rebound. Reporting that again would only re-run netcheck forever.
            return
        self._mapping_reported = None
        self.local_endpoints, self.mapping_varies = eps, mapping_varies
        published = {ep.address for ep in eps}
        hosts = {ep.address[0] for ep in eps if ep.kind is EndpointKind.STUN}
        for addr in list(self.observed):
            # Published now, or left behind by a public address we no longer have.
            if mapping_varies or addr in published or addr[0] not in hosts:
                del self.observed[addr]
        for path in self.peers.values():
            if path.active(now):
                path.next_discovery = now
                path.discovery_backoff = DISCOVERY_FIRST_BACKOFF
                path.last_call_me_maybe = -1e9

    def set_home_region(self, region: int | None) -> None:
        self.home_region = region

    def note_relay_route(self, node_key: bytes, region: int) -> None:
        """A packet from the peer arrived through `region`: answer the same way."""
        path = self.peers.get(node_key)
        if path is not None:
            path.derp_route = region

    def forget_relay_region(self, region: int) -> None:
        """The relay of `region` is gone: stop routing peers through it by habit."""
        for path in self.peers.values():
            if path.derp_route == region:
                path.derp_route = None

    def note_wireguard_source(self, node_key: bytes, address: Address, now: float) -> None:
        """WireGuard authenticated the peer from `address`, which no Pong proved yet: make it
        a candidate and probe it soon."""
        path = self.peers.get(node_key)
        if path is not None and self._add_candidate(path, Direct(address), EndpointKind.UNKNOWN, now):
            path.next_discovery = min(path.next_discovery, now)

    # ------------------------------------------------------------------- hot path

    def route(self, node_key: bytes, now: float) -> Destination | None:
        """Where WireGuard's next datagram for the peer goes; None when the peer is unknown
        or no relay region is known. Starts a discovery round when one is due."""
        path = self.peers.get(node_key)
        if path is None:
            return None
        path.last_send = now
        if path.best is not None and now < path.trust_until:
            return path.best.direct
        if now >= path.next_discovery:
            self._discover(path, now)
        region = path.relay_region(self.home_region)
        return None if region is None else Relay(region, node_key)

    # ------------------------------------------------------------------- disco in

    def receive_disco(self, data: bytes, source: Destination, now: float) -> bool:
        """Handle one disco datagram that arrived from `source` (a UDP address and our socket
        number, or a relay region and the sending node key). False when it was dropped."""
        self._now = now
        try:
            sender = DiscoKey.sender(data)
        except DiscoError:
            self.drops["disco_malformed"] += 1
            return False
        path = self._by_disco.get(sender)
        if path is None:
            self.drops["disco_unknown_sender"] += 1
            return False
        if isinstance(source, Relay) and source.node_key != path.node_key:
            self.drops["disco_relay_key_mismatch"] += 1
            return False
        try:
            _, message = self.disco.open(data)
        except DiscoError:
            self.drops["disco_unauthentic"] += 1
            return False
        if isinstance(source, Relay):
            path.derp_route = source.region
        if isinstance(message, Ping):
            self._on_ping(path, message, source, now)
        elif isinstance(message, Pong):
            self._on_pong(path, message, source, now)
        else:
            self._on_call_me_maybe(path, message, now)
        return True

    def _on_ping(self, path: PeerPath, ping: Ping, source: Destination, now: float) -> None:
        if ping.node_key != path.node_key:
            self.drops["disco_ping_wrong_node_key"] += 1
            return
        self.counters["ping_received"] += 1
        observed = source.address if isinstance(source, Direct) else ("0.0.0.0", 0)
        self._send(path, Pong(ping.tx_id, observed), source)
        self.counters["pong_sent"] += 1
        if isinstance(source, Direct) and self._socket_open(path, source):
            cand = self._add_candidate(path, source, EndpointKind.UNKNOWN, now)
            # The peer found a way to us; make sure the way back is proven too.
            if cand is not None and path.trusted(now) != source and now - cand.last_ping >= MIN_PING_SPACING:
                self._ping(path, cand, now, "discovery")

    def _on_pong(self, path: PeerPath, pong: Pong, source: Destination, now: float) -> None:
        pending = self._pending.pop(pong.tx_id, None)
        if pending is None or pending.node_key != path.node_key:
            self.drops["disco_pong_unknown_tx"] += 1
            return
        if pending.dest != source:
            # A Pong proves only the path it came back on.
            self.drops["disco_pong_wrong_path"] += 1
            return
        latency = max(now - pending.sent_at, 0.0)
        self.counters["pong_received"] += 1
        if pending.purpose == "user":
            self._events.append(PingResult(path.node_key, pong.tx_id, source, latency))
        if not isinstance(source, Direct):
            return
        if not self._socket_open(path, source):
            # A probe socket we already asked the adapter to close (a second birthday hit right
            # behind the first): the path must not move onto it, or it dies with the socket.
            self.drops["disco_pong_closed_probe_socket"] += 1
            return
        cand = path.candidates.get(source) or self._add_candidate(path, source, EndpointKind.UNKNOWN, now)
        if cand is None:
            return
        self._check_mapping(cand, pong.source, now)
        first = cand.last_pong is None
        cand.last_pong = now
        cand.latency = latency if cand.latency is None else 0.5 * cand.latency + 0.5 * latency
        if first:
            self._events.append(AddressConfirmed(path.node_key, source))
        best = path.best
        if best is None or now >= path.trust_until or (best is not cand and self._better(cand, best)):
            self._set_best(path, cand, now)
        if path.best is cand:
            path.trust_until = now + TRUST_DURATION

    @staticmethod
    def _socket_open(path: PeerPath, direct: Direct) -> bool:
        """Whether `direct` leaves from a socket that stays open: the primary one, or a probe
        socket not yet closed (our CloseProbeSockets events, in order, are what the adapter does)."""
        return direct.socket == PRIMARY_SOCKET or direct.socket in path.probe_sockets

    def _check_mapping(self, cand: Candidate, observed: Address, now: float) -> None:
        """A Pong over a public path tells us our public address; if our NAT maps independently
        of the destination, it should equal our published STUN endpoint. When it does not, the
        NAT rebound (the adapter re-runs STUN), or it gives our new flows another port than the
        one the STUN servers saw (advertised from now on, see `advertised_endpoints`)."""
        if self.mapping_varies or cand.direct.socket != PRIMARY_SOCKET or cand.lan:
            return
        published = next((ep.address for ep in self.local_endpoints if ep.kind is EndpointKind.STUN), None)
        if published is None or observed == published or observed[0] != published[0]:
            return
        self._note_observed(observed, now)
        if self._mapping_reported != observed:
            self._mapping_reported = observed
            self.counters["mapping_changed"] += 1
            self._events.append(MappingChanged(published, observed))

    def _note_observed(self, observed: Address, now: float) -> None:
        new = observed not in self.observed
        self.observed[observed] = now
        self.observed.move_to_end(observed)
        while len(self.observed) > MAX_OBSERVED:
            self.observed.popitem(last=False)
        if not new:
            return
        self.counters["observed_endpoint_learned"] += 1
        log.info("observed_endpoint address=%s", Direct(observed))
        # Peers still on the relay may be pinging a port of ours that leads nowhere (or to
        # another host): tell them at once where we are seen.
        for path in self.peers.values():
            if path.active(now) and path.trusted(now) is None:
                path.next_discovery = now
                path.discovery_backoff = DISCOVERY_FIRST_BACKOFF
                path.last_call_me_maybe = -1e9

    def advertised_endpoints(self, now: float) -> tuple[Endpoint, ...]:
        """What our CallMeMaybes carry: the endpoints we publish, then the public addresses
        peers saw us at lately (kind STUN, so a symmetric-NAT peer's birthday probes aim at
        them too)."""
        eps = list(self.local_endpoints)
        known = {ep.address for ep in eps}
        for addr, seen in reversed(self.observed.items()):
            if now - seen < OBSERVED_TTL and addr not in known:
                eps.append(Endpoint(addr, EndpointKind.STUN))
        return tuple(eps[: disco.MAX_ENDPOINTS])

    def _better(self, cand: Candidate, best: Candidate) -> bool:
        if cand.lan != best.lan:
            return cand.lan
        return cand.score() < best.score() * FASTER_BY

    def _set_best(self, path: PeerPath, cand: Candidate, now: float) -> None:
        changed = path.best is None or path.best.direct != cand.direct or now >= path.trust_until
        path.best = cand
        path.trust_until = now + TRUST_DURATION
        if changed:
            path.best_since = now
            path.discovery_backoff = DISCOVERY_FIRST_BACKOFF
            path.next_upgrade = now + UPGRADE_INTERVAL
            self.counters["path_direct"] += 1
            log.info(
                "path_direct peer=%s via=%s latency_ms=%.1f",
                _short(path.node_key),
                cand.direct,
                (cand.latency or 0) * 1000,
            )
            self._events.append(PathChanged(path.node_key, cand.direct, cand.latency))
        if cand.direct.socket != PRIMARY_SOCKET and path.probe_sockets:
            keep = (cand.direct.socket,)
            if path.probe_sockets != keep:
                path.probe_sockets = keep
                path.birthday_deadline = None
                self._events.append(CloseProbeSockets(path.node_key, keep))

    def _lose_best(self, path: PeerPath, now: float, reason: str) -> None:
        if path.best is None:
            return
        log.info("path_relay peer=%s lost=%s reason=%s", _short(path.node_key), path.best.direct, reason)
        path.best = None
        path.trust_until = 0.0
        path.next_discovery = now
        path.discovery_backoff = DISCOVERY_FIRST_BACKOFF
        path.rounds = 0
        self.counters["path_lost"] += 1
        self._events.append(PathChanged(path.node_key, None, None))

    def _on_call_me_maybe(self, path: PeerPath, cmm: CallMeMaybe, now: float) -> None:
        self.counters["call_me_maybe_received"] += 1
        path.mapping_varies = cmm.mapping_varies
        for ep in cmm.endpoints:
            self._add_candidate(path, Direct(ep.address), ep.kind, now, configured=True)
        # Ping back at once: our pings open our NAT for theirs, which are on their way.
        for cand in list(path.candidates.values()):
            if cand.direct.socket == PRIMARY_SOCKET and now - cand.last_ping >= MIN_PING_SPACING:
                self._ping(path, cand, now, "discovery")
        if (
            cmm.birthday
            and not self.mapping_varies
            and path.trusted(now) is None
            and now - path.last_birthday_answered >= BIRTHDAY_MIN_INTERVAL
        ):
            path.last_birthday_answered = now
            self._start_spray(path, cmm.endpoints)

    # ------------------------------------------------------------------- discovery

    def _add_candidate(
        self, path: PeerPath, direct: Direct, kind: EndpointKind, now: float, configured: bool = False
    ) -> Candidate | None:
        cand = path.candidates.get(direct)
        if cand is None:
            if direct.address[1] == 0 or direct.address[0] in ("0.0.0.0", "::"):
                return None
            if len(path.candidates) >= MAX_CANDIDATES:
                self._expire_candidates(path, now, force=True)
                if len(path.candidates) >= MAX_CANDIDATES:
                    self.drops["candidate_table_full"] += 1
                    return None
            cand = path.candidates[direct] = Candidate(direct, kind, now, configured)
        else:
            if kind is not EndpointKind.UNKNOWN:
                cand.kind = kind
            cand.configured = cand.configured or configured
            cand.learned_at = now
        return cand

    def _expire_candidates(self, path: PeerPath, now: float, force: bool = False) -> None:
        ttl = 0.0 if force else LEARNED_CANDIDATE_TTL
        for direct, cand in list(path.candidates.items()):
            if cand.configured or cand is path.best:
                continue
            fresh = cand.last_pong is not None and now - cand.last_pong < LEARNED_CANDIDATE_TTL
            if not fresh and now - cand.learned_at >= ttl:
                del path.candidates[direct]

    def _discover(self, path: PeerPath, now: float) -> None:
        """One discovery round: ping every candidate, CallMeMaybe through the relay."""
        self.counters["discovery_rounds"] += 1
        path.rounds += 1
        path.next_discovery = now + path.discovery_backoff
        path.discovery_backoff = min(path.discovery_backoff * 2, DISCOVERY_MAX_BACKOFF)
        for cand in list(path.candidates.values()):
            if cand.direct.socket == PRIMARY_SOCKET and now - cand.last_ping >= MIN_PING_SPACING:
                self._ping(path, cand, now, "discovery")
        self._call_me_maybe(path, now, birthday=False)
        if self._birthday_wanted(path, now):
            path.birthday_attempts += 1
            path.wants_birthday = True
            path.birthday_deadline = now + BIRTHDAY_ROUND
            self.counters["birthday_rounds"] += 1
            self._events.append(OpenProbeSockets(path.node_key, self.birthday_sockets))

    def _birthday_wanted(self, path: PeerPath, now: float) -> bool:
        if path.mapping_varies or path.wants_birthday:
            return False
        if not self.mapping_varies and not self._mapping_unknown() and not self._behind_shared_nat():
            return False
        # Only after plain hole punching had one round to work (three when our mapping is not
        # known to vary), and only towards an address a STUN server or a port mapping vouched for.
        after = BIRTHDAY_AFTER_ROUNDS if self.mapping_varies else SHARED_NAT_BIRTHDAY_AFTER_ROUNDS
        if path.trusted(now) is not None or path.rounds < after or not path.active(now):
            return False
        return any(c.kind in (EndpointKind.STUN, EndpointKind.PORTMAP) for c in path.candidates.values())

    def _mapping_unknown(self) -> bool:
        """Whether UDP gets out (a STUN server saw us) but one server cannot tell whether our NAT
        maps per destination. Plain punching that keeps failing then may be meeting a symmetric
        NAT: a birthday round finds out, at a bounded cost."""
        return self.mapping_varies is None and any(
            ep.kind is EndpointKind.STUN for ep in self.local_endpoints
        )

    def _behind_shared_nat(self) -> bool:
        """Whether another peer has an endpoint on our public (STUN) address's host: we share a NAT.

        Such a NAT keeps a host's source port only while the resulting tuple is free, so when
        two hosts behind it bind the same port, one of them gets a random port towards some
        destination, and the endpoint it published (its mapping towards the STUN servers) leads
        that peer to the other host. Plain hole punching then never meets, but a birthday round
        from our side does: the peer's spray finds one of our probe sockets' fresh mappings.
        """
        ours = {ep.address[0] for ep in self.local_endpoints if ep.kind is EndpointKind.STUN}
        if not ours:
            return False  # no UDP out of here: probe sockets would reach nobody
        # Any kind: the netmap's endpoints carry none, and peers that went direct over their
        # LAN at once never sent us a CallMeMaybe saying which one is their STUN address.
        return any(
            cand.direct.address[0] in ours
            for other in self.peers.values()
            for cand in other.candidates.values()
        )

    def _call_me_maybe(self, path: PeerPath, now: float, birthday: bool) -> None:
        if path.disco_key is None:
            return
        if not birthday and now - path.last_call_me_maybe < CALL_ME_MAYBE_SPACING:
            return
        region = path.relay_region(self.home_region)
        if region is None:
            return
        path.last_call_me_maybe = now
        self.counters["call_me_maybe_sent"] += 1
        cmm = CallMeMaybe(self.advertised_endpoints(now), bool(self.mapping_varies), birthday)
        self._send(path, cmm, Relay(region, path.node_key))

    def probe_sockets_opened(self, node_key: bytes, sockets: Sequence[int], now: float) -> None:
        """The adapter opened the probe sockets asked for by OpenProbeSockets."""
        path = self.peers.get(node_key)
        if path is None:
            if sockets:
                self._events.append(CloseProbeSockets(node_key, ()))
            return
        path.wants_birthday = False
        path.probe_sockets = tuple(sockets)
        path.birthday_deadline = now + BIRTHDAY_ROUND
        targets = [c for c in path.candidates.values() if c.kind in (EndpointKind.STUN, EndpointKind.PORTMAP)]
        # Each socket's first packet to the peer's public endpoint opens one NAT mapping.
        for sock in sockets:
            for cand in targets:
                self._ping(path, Candidate(Direct(cand.direct.address, sock), cand.kind, now), now, "spray")
        self._call_me_maybe(path, now, birthday=True)

    def _start_spray(self, path: PeerPath, endpoints: Sequence[Endpoint]) -> None:
        claimed = {ep.address[0] for ep in endpoints if ep.kind is EndpointKind.STUN}
        # A spray is ~1400 packets: only at a host the netmap gave for this peer, so a peer's
        # CallMeMaybe cannot aim them at anyone else.
        hosts = sorted(claimed & path.netmap_hosts)
        if len(hosts) < len(claimed):
            self.drops["birthday_host_not_in_netmap"] += len(claimed) - len(hosts)
        if not hosts:
            return
        low, high = BIRTHDAY_PORTS
        per_host = max(1, self.birthday_spray // len(hosts))
        self.counters["birthday_sprays"] += 1
        for host in hosts:
            for port in self._rng.sample(range(low, high + 1), per_host):
                self._spray.append((path.node_key, (host, port)))

    # ------------------------------------------------------------------- user pings

    def ping(self, node_key: bytes, now: float) -> list[bytes]:
        """A user ping (`wiremesh ping`): through the relay and to every candidate. Answers come
        back as PingResult events; an unknown peer raises KeyError."""
        path = self.peers[node_key]
        path.last_send = now  # a ping is traffic: keep discovery going
        txs = []
        region = path.relay_region(self.home_region)
        if region is not None and path.disco_key is not None:
            txs.append(self._send_ping(path, Relay(region, node_key), now, "user"))
        for cand in list(path.candidates.values()):
            if cand.direct.socket == PRIMARY_SOCKET or cand is path.best:
                txs.append(self._ping(path, cand, now, "user"))
        if path.trusted(now) is None and now >= path.next_discovery:
            self._discover(path, now)
        return [tx for tx in txs if tx]

    # ------------------------------------------------------------------- timers

    def handle_timer(self, now: float) -> None:
        self._now = now
        for tx, pending in list(self._pending.items()):
            if now < pending.expires:
                continue
            del self._pending[tx]
            if pending.purpose != "heartbeat":
                continue
            path = self.peers.get(pending.node_key)
            if path is not None and path.best is not None and path.best.direct == pending.dest:
                last = path.best.last_pong
                if last is None or last < pending.sent_at:
                    self._lose_best(path, now, "heartbeat_timeout")
        for path in self.peers.values():
            if path.best is not None and now >= path.trust_until:
                self._lose_best(path, now, "trust_expired")
            active = path.active(now)
            best = path.best
            if best is not None:
                if active and now - best.last_ping >= HEARTBEAT_INTERVAL:
                    self._ping(path, best, now, "heartbeat")
                if active and now >= path.next_upgrade:
                    path.next_upgrade = now + UPGRADE_INTERVAL
                    for cand in list(path.candidates.values()):
                        if cand is not best and cand.direct.socket == PRIMARY_SOCKET:
                            self._ping(path, cand, now, "discovery")
            elif active and now >= path.next_discovery:
                self._discover(path, now)
            if path.birthday_deadline is not None and now >= path.birthday_deadline:
                path.birthday_deadline = None
                path.wants_birthday = False
                keep = (best.direct.socket,) if best is not None and best.direct.socket else ()
                if path.probe_sockets != keep:
                    path.probe_sockets = keep
                    self._events.append(CloseProbeSockets(path.node_key, keep))
            if len(path.candidates) > 8:
                self._expire_candidates(path, now)
        if self._spray and now >= self._next_spray:
            for _ in range(min(SPRAY_BATCH, len(self._spray))):
                key, addr = self._spray.popleft()
                path = self.peers.get(key)
                if path is None or path.trusted(now) is not None:
                    continue
                self._ping(path, Candidate(Direct(addr), EndpointKind.UNKNOWN, now), now, "spray")
            self._next_spray = now + SPRAY_TICK

    def next_timer(self) -> float | None:
        deadlines: list[float] = []
        if self._spray:
            deadlines.append(self._next_spray)
        for pending in self._pending.values():
            if pending.purpose == "heartbeat":
                deadlines.append(pending.expires)
        for path in self.peers.values():
            if path.best is not None:
                deadlines.append(path.trust_until)
                if path.active(self._now):
                    deadlines.append(path.best.last_ping + HEARTBEAT_INTERVAL)
                    deadlines.append(path.next_upgrade)
            elif path.active(self._now):
                deadlines.append(path.next_discovery)
            if path.birthday_deadline is not None:
                deadlines.append(path.birthday_deadline)
        if self._pending:
            deadlines.append(min(p.expires for p in self._pending.values()))
        return min(deadlines) if deadlines else None

    # ------------------------------------------------------------------- output

    def datagrams_to_send(self) -> list[tuple[bytes, Destination]]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def _send(self, path: PeerPath, message: disco.Message, dest: Destination) -> None:
        if path.disco_key is None:
            self.drops["peer_has_no_disco_key"] += 1
            return
        self._out.append((self.disco.seal(message, path.disco_key), dest))

    def _send_ping(self, path: PeerPath, dest: Destination, now: float, purpose: str) -> bytes:
        if path.disco_key is None:
            return b""
        tx = disco.new_tx_id()
        timeout = PING_TIMEOUT if purpose == "heartbeat" else DISCOVERY_PING_TIMEOUT
        self._pending[tx] = PendingPing(path.node_key, dest, now, now + timeout, purpose)
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)
        self._send(path, Ping(tx, self.node_key), dest)
        self.counters["ping_sent"] += 1
        return tx

    def _ping(self, path: PeerPath, cand: Candidate, now: float, purpose: str) -> bytes:
        cand.last_ping = now
        return self._send_ping(path, cand.direct, now, purpose)

    # ------------------------------------------------------------------- status

    def peer_status(self, node_key: bytes, now: float) -> dict[str, Any]:
        path = self.peers[node_key]
        direct = path.trusted(now)
        region = path.relay_region(self.home_region)
        return {
            "path": "direct" if direct is not None else ("relay" if region is not None else "none"),
            "direct": None if direct is None else str(direct),
            "direct_address": None if direct is None else list(direct.address),
            "relay_region": region,
            "home_region": path.home_region,
            "latency_ms": None
            if direct is None or path.best is None or path.best.latency is None
            else round(path.best.latency * 1000, 2),
            "direct_since_seconds": None if direct is None else round(now - path.best_since, 1),
            "candidates": [str(c.direct) for c in path.candidates.values() if c.direct.socket == 0][:16],
            "peer_mapping_varies": path.mapping_varies,
            "birthday_attempts": path.birthday_attempts,
        }


def _short(key: bytes) -> str:
    import base64

    return base64.b64encode(key).decode()[:8]
