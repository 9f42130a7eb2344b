"""A WireGuard device, sans-I/O: IP packets and datagrams in, datagrams, timers and events out.

The caller owns the TUN device, the socket and the clock. `now` is always Unix time in seconds
(time.time()): it also dates our handshake initiations (TAI64N), and a peer rejects initiations
that are not newer than the last one it saw from us, even across our restarts.

Not thread-safe: the agent serialises every call with one lock.
"""

from __future__ import annotations

import collections
import hmac
import logging
import random
import secrets
import struct
from collections.abc import Hashable

from wiremesh.core import crypto
from wiremesh.core.allowedips import AllowedIPs
from wiremesh.core.noise import HandshakeState, NoiseError
from wiremesh.core.wireguard import kernel
from wiremesh.core.wireguard.cookie import CookieChecker, HandshakeRateLimiter, add_macs, open_cookie_reply
from wiremesh.core.wireguard.events import (
    EndpointChanged,
    EndpointObserved,
    HandshakeCompleted,
    HandshakeFailed,
)
from wiremesh.core.wireguard.messages import (
    CONSTRUCTION,
    COOKIE_REPLY_SIZE,
    IDENTIFIER,
    INITIATION_HEADER,
    INITIATION_MAC1,
    INITIATION_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_RESPONSE,
    MESSAGE_TRANSPORT,
    RESPONSE_HEADER,
    RESPONSE_MAC1,
    RESPONSE_SIZE,
    TRANSPORT_HEADER,
    TRANSPORT_MIN_SIZE,
    tai64n_from_ns,
)
from wiremesh.core.wireguard.peer import Peer, PeerConfig, PendingHandshake, Session
from wiremesh.core.wireguard.timers import (
    COOKIE_REFRESH_TIME,
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    MAX_QUEUED_PACKETS,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    REKEY_TIMEOUT_JITTER_MAX,
    ZERO_KEYS_AFTER,
)
from wiremesh.core.wireguard.transport import Flow, receive_run

log = logging.getLogger(__name__)

__all__ = ["DROP_REASONS", "Device"]

DROP_REASONS = (
    "short",
    "wrong_size",
    "unknown_type",
    "bad_mac1",
    "bad_mac2",
    "unknown_peer",
    "handshake_invalid",
    "handshake_rate_limited",
    "replay",
    "decrypt_failed",
    "no_session",
    "expired_session",
    "no_route",
    "no_endpoint",
    "source_not_allowed",
    "not_ip",
    "queue_full",
    "cookie_invalid",
    "handshake_timeout",
    "internal_error",
)

_PADDING = bytes(16)
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_TYPE_INITIATION = b"\x01\x00\x00\x00"
_TYPE_RESPONSE = b"\x02\x00\x00\x00"
_TYPE_COOKIE = b"\x03\x00\x00\x00"
_TYPE_TRANSPORT = b"\x04\x00\x00\x00"
_pack_counter = struct.Struct("<Q").pack
_transport_unpack = TRANSPORT_HEADER.unpack_from
_u32_unpack = struct.Struct("<I").unpack_from

_MAX_RETIRED = 4096
_ROUTE_CACHE_SIZE = 4096
_NEVER = float("inf")

Datagram = tuple[bytes, Hashable]


class Device:
    """One WireGuard interface: our static key, our peers, their sessions and timers."""

    def __init__(self, private_key: bytes, now: float) -> None:
        self.peers: dict[bytes, Peer] = {}
        self.drops: collections.Counter[str] = collections.Counter()
        self.under_load = False
        # Roaming: a peer's endpoint follows its latest authenticated packet. A path manager that
        # picks endpoints itself (magicsock) turns it off; a peer with no endpoint still learns one.
        self.roaming = True
        self._routes: AllowedIPs[Peer] = AllowedIPs()
        # Address -> peer answers of _routes, cleared whenever AllowedIPs change: a dict hit costs
        # a tenth of walking the trie, and a tunnel carries few distinct addresses.
        self._route_cache: dict[bytes, Peer | None] = {}
        self._sessions: dict[int, Session] = {}  # by our local index
        self._handshakes: dict[int, PendingHandshake] = {}  # by our local index
        # Indices of removed peers' sessions, so their late packets count as unknown_peer (bounded).
        self._retired: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._outbox: list[Datagram] = []
        self._events: collections.deque[object] = collections.deque()
        # A lower bound of every armed timer (kept cheaply on the packet path); see next_timer().
        self._earliest = _NEVER
        self._now = now
        self._last_timestamp_ns = 0
        self._random = random.Random()
        self._private_key = b""
        self.public_key = b""
        self._cookies = CookieChecker(bytes(32), now)
        self._rate_limiter = HandshakeRateLimiter()
        self.set_private_key(private_key)

    # ------------------------------------------------------------------ configuration

    def set_private_key(self, private_key: bytes) -> None:
        """Replace our static key; every session and handshake in flight is dropped.
        Setting the key we already have changes nothing (like `wg set`)."""
        public = crypto.public_key(private_key)
        if self._private_key and hmac.compare_digest(private_key, self._private_key):
            return
        self._private_key = private_key
        self.public_key = public
        self._cookies = CookieChecker(public, self._now)
        for peer in self.peers.values():
            self._drop_sessions(peer)
            peer.queue.clear()

    def set_peer(self, config: PeerConfig) -> None:
        """Add a peer or update one; an update keeps its sessions and replaces its AllowedIPs."""
        if len(config.public_key) != 32:
            raise ValueError("peer public key must be 32 bytes")
        if config.preshared_key is not None and len(config.preshared_key) != 32:
            raise ValueError("preshared key must be 32 bytes")
        if config.persistent_keepalive < 0 or config.persistent_keepalive > 65535:
            raise ValueError("persistent keepalive must be 0..65535 seconds")
        # Validate every prefix before touching the table, so a bad one changes nothing.
        probe: AllowedIPs[int] = AllowedIPs()
        for prefix in config.allowed_ips:
            probe.insert(prefix, 0)
        peer = self.peers.get(config.public_key)
        if peer is None:
            peer = Peer(config)
            self.peers[config.public_key] = peer
        else:
            old = peer.config
            peer.config = config
            peer.keepalive_interval = config.persistent_keepalive
            peer.psk = config.preshared_key or bytes(32)
            if config.endpoint is not None and config.endpoint != old.endpoint:
                peer.endpoint = config.endpoint
        self._routes.remove_value(peer)
        for prefix in config.allowed_ips:
            self._routes.insert(prefix, peer)
        self._route_cache.clear()
        if config.persistent_keepalive > 0:
            # Like wg: a keepalive goes out as soon as persistent keepalive is configured.
            if peer.t_persistent is None:
                peer.t_persistent = self._now
                if peer.t_persistent < self._earliest:
                    self._earliest = peer.t_persistent
        else:
            peer.t_persistent = None

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer at once: its sessions go, and its packets now count as unknown_peer."""
        peer = self.peers.pop(public_key, None)
        if peer is None:
            return
        for session in peer.sessions():
            self._retired[session.local_index] = None
        while len(self._retired) > _MAX_RETIRED:
            self._retired.popitem(last=False)
        self._drop_sessions(peer)
        peer.queue.clear()
        self._routes.remove_value(peer)
        self._route_cache.clear()

    # ------------------------------------------------------------------ outbound (TUN -> network)

    def send(self, packet: bytes, now: float) -> tuple[bytes, Hashable] | None:
        """Encrypt one IP packet from the TUN for the peer that AllowedIPs routes it to.

        Returns (datagram, endpoint), or None when the packet was dropped (counted in `drops`) or
        queued while a handshake starts (the initiation then shows up in datagrams_to_send()).
        """
        self._now = now
        n = len(packet)
        version = packet[0] >> 4 if n else 0
        if version == 4 and n >= 20:
            peer = self._route(packet[16:20])
        elif version == 6 and n >= 40:
            peer = self._route(packet[24:40])
        else:
            self.drops["not_ip"] += 1
            return None
        if peer is None:
            self.drops["no_route"] += 1
            return None
        session = peer.current
        endpoint = peer.endpoint
        # Fast path: a live session that needs no rekey yet. Everything else takes the slow path.
        if (
            session is None
            or endpoint is None
            or now >= session.send_rekey_deadline
            or session.send_counter >= REKEY_AFTER_MESSAGES
        ):
            return self._send_to_peer(peer, packet, now)
        return self._seal(peer, session, packet, now), endpoint

    def send_batch(self, packets: list[bytes], now: float) -> tuple[list[Datagram], bool]:
        """send() for each packet, in order, with every run of packets to one peer over a live
        session sealed by the transport kernel (kernel.py) in one call. Returns the datagrams
        and whether any packet was dropped or held for a handshake (as send()'s None)."""
        self._now = now
        out: list[Datagram] = []
        held = False
        run: list[bytes] = []
        run_peer: Peer | None = None
        for packet in packets:
            n = len(packet)
            version = packet[0] >> 4 if n else 0
            if version == 4 and n >= 20:
                peer = self._route(packet[16:20])
            elif version == 6 and n >= 40:
                peer = self._route(packet[24:40])
            else:
                self.drops["not_ip"] += 1
                held = True
                continue
            if peer is None:
                self.drops["no_route"] += 1
                held = True
                continue
            if peer is not run_peer:
                if run_peer is not None and run:
                    self._seal_run(run_peer, run, now, out)
                    run = []
                run_peer = peer
            session = peer.current
            if (
                session is None
                or peer.endpoint is None
                or now >= session.send_rekey_deadline
                or session.send_counter + len(run) >= REKEY_AFTER_MESSAGES
            ):
                if run:
                    self._seal_run(peer, run, now, out)
                    run = []
                result = self._send_to_peer(peer, packet, now)
                if result is None:
                    held = True
                else:
                    out.append(result)
                continue
            run.append(packet)
        if run_peer is not None and run:
            self._seal_run(run_peer, run, now, out)
        return out, held

    def _seal_run(self, peer: Peer, packets: list[bytes], now: float, out: list[Datagram]) -> None:
        """Seal packets for `peer` over its current session (live and needing no rekey: the
        caller checked) with one kernel call."""
        session = peer.current
        assert session is not None
        counter = session.send_counter
        session.send_counter = counter + len(packets)
        datagrams = kernel.seal(session.send_key, session.send_aead, session.remote_index, counter, packets)
        endpoint = peer.endpoint
        size = 0
        for datagram in datagrams:
            out.append((datagram, endpoint))
            size += len(datagram)
        peer.tx_bytes += size
        peer.tx_packets += len(datagrams)
        self._sent(peer, now, data=True)

    def send_tso(
        self, raw: bytes, offset: int, mss: int, now: float
    ) -> tuple[bytes, int, int, Hashable] | None:
        """A TUN TSO super-packet (raw[offset:], TCP payload in `mss`-byte segments) sealed for
        the peer AllowedIPs routes it to, every segment in one buffer by one kernel call:
        (buffer, datagram size, count, endpoint) for one segmented send, every datagram but a
        shorter last one of that size. None when the packet needs more than this fast path (no
        route, no live session or endpoint, a rekey due): the caller then segments it and uses
        send_batch, which handles and counts all of those. ValueError if it is not a TSO packet."""
        self._now = now
        n = len(raw) - offset
        if mss <= 0 or n < 40:
            return None
        version = raw[offset] >> 4
        if version == 4:
            peer = self._route(raw[offset + 16 : offset + 20])
        elif version == 6:
            peer = self._route(raw[offset + 24 : offset + 40])
        else:
            return None
        if peer is None:
            return None
        session = peer.current
        endpoint = peer.endpoint
        if (
            session is None
            or endpoint is None
            or now >= session.send_rekey_deadline
            or session.send_counter + n // mss + 1 >= REKEY_AFTER_MESSAGES
        ):
            return None
        counter = session.send_counter
        buffer, size, count = kernel.seal_tso(
            session.send_key, session.send_aead, session.remote_index, counter, raw, offset, mss
        )
        session.send_counter = counter + count
        peer.tx_bytes += len(buffer)
        peer.tx_packets += count
        self._sent(peer, now, data=True)
        return buffer, size, count, endpoint

    def _route(self, address: bytes) -> Peer | None:
        cache = self._route_cache
        try:
            return cache[address]
        except KeyError:
            if len(cache) >= _ROUTE_CACHE_SIZE:
                cache.clear()
            peer = cache[address] = self._routes.lookup(address)
            return peer
        except (TypeError, ValueError):  # slices of bytearray or writable memoryview: unhashable
            return self._routes.lookup(bytes(address))

    def _send_to_peer(self, peer: Peer, payload: bytes, now: float) -> tuple[bytes, Hashable] | None:
        endpoint = peer.endpoint
        if endpoint is None:
            self.drops["no_endpoint"] += 1
            return None
        session = peer.current
        if (
            session is None
            or now - session.created >= REJECT_AFTER_TIME
            or session.send_counter >= REJECT_AFTER_MESSAGES
        ):
            self._enqueue(peer, payload)
            self._initiate(peer, now, retry=False)
            return None
        datagram = self._seal(peer, session, payload, now)
        if session.send_counter >= REKEY_AFTER_MESSAGES or (
            session.initiator and now - session.created >= REKEY_AFTER_TIME
        ):
            self._initiate(peer, now, retry=False)
        return datagram, endpoint

    def _enqueue(self, peer: Peer, payload: bytes) -> None:
        payload = bytes(payload)  # the caller may reuse its buffer once we return
        queue = peer.queue
        if len(queue) >= MAX_QUEUED_PACKETS:
            queue.popleft()  # keep the newest, like wireguard-go
            self.drops["queue_full"] += 1
        queue.append(payload)

    def _seal(self, peer: Peer, session: Session, payload: bytes, now: float) -> bytes:
        counter = session.send_counter
        session.send_counter = counter + 1
        n = len(payload)
        pad = -n & 15
        if pad:
            payload = b"".join((payload, _PADDING[:pad]))  # also takes memoryview/bytearray packets
        wire_counter = _pack_counter(counter)
        datagram = b"".join(
            (
                session.header,
                wire_counter,
                session.send_aead.encrypt(_NONCE_PREFIX + wire_counter, payload, None),
            )
        )
        peer.tx_bytes += len(datagram)
        peer.tx_packets += 1
        self._sent(peer, now, data=n > 0)
        return datagram

    def _sent(self, peer: Peer, now: float, data: bool) -> None:
        # Timers (whitepaper 6.5): anything we send makes a pending keepalive unnecessary; data we
        # send expects an answer within KEEPALIVE_TIMEOUT + REKEY_TIMEOUT or we start a handshake.
        peer.t_keepalive = None
        if data and peer.t_new_handshake is None:
            peer.t_new_handshake = now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + self._jitter()
            if peer.t_new_handshake < self._earliest:
                self._earliest = peer.t_new_handshake
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval
            if peer.t_persistent < self._earliest:
                self._earliest = peer.t_persistent

    def _flush_queue(self, peer: Peer, session: Session, now: float, keepalive_if_empty: bool) -> None:
        endpoint = peer.endpoint
        if endpoint is None:
            return
        if not peer.queue:
            if keepalive_if_empty:
                self._outbox.append((self._seal(peer, session, b"", now), endpoint))
            return
        while peer.queue:
            self._outbox.append((self._seal(peer, session, peer.queue.popleft(), now), endpoint))

    def _send_keepalive(self, peer: Peer, now: float) -> None:
        result = self._send_to_peer(peer, b"", now)
        if result is not None:
            self._outbox.append(result)

    # ------------------------------------------------------------------ inbound (network -> TUN)

    def receive(self, datagram: bytes, source: Hashable, now: float) -> bytes | None:
        """Process one datagram. Returns the inner IP packet for the TUN, or None (handshake,
        cookie reply, keepalive, or a counted drop). Never raises."""
        self._now = now
        try:
            n = len(datagram)
            if n >= TRANSPORT_MIN_SIZE:
                kind, receiver, counter = _transport_unpack(datagram, 0)
                if kind == MESSAGE_TRANSPORT:  # the type byte and three zero bytes, as one u32
                    return self._receive_transport(datagram, n, receiver, counter, source, now)
            self._receive_other(datagram, source, now)
            return None
        except Exception:  # a bug must cost one packet, never the data plane
            log.exception("unexpected error processing a %d-byte datagram", len(datagram))
            self.drops["internal_error"] += 1
            return None

    def receive_batch(
        self, datagrams: list[bytes], source: Hashable, now: float, vnet: bool = False
    ) -> tuple[list[Flow], bool]:
        """receive() for each datagram of one source, in order, with every run of transport
        messages of one session opened by transport.receive_run (one kernel call). Returns the
        runs of one flow, (first packet, how many, the TUN writes: the packets, or with `vnet`
        virtio_net_hdr writes with TCP segments merged), for a filter to judge once each, and
        whether anything but data arrived (handshakes, keepalives, drops: as receive()'s None).
        Never raises."""
        self._now = now
        flows: list[Flow] = []
        other = False
        i, n = 0, len(datagrams)
        while i < n:
            datagram = datagrams[i]
            j = i + 1
            try:
                if len(datagram) >= TRANSPORT_MIN_SIZE and datagram[:4] == _TYPE_TRANSPORT:
                    receiver = _u32_unpack(datagram, 4)[0]
                    j, clean = self._receive_run(datagrams, i, receiver, source, now, flows, vnet)
                    if not clean:
                        other = True
                else:
                    other = True
                    self._receive_other(datagram, source, now)
            except Exception:  # a bug must cost these datagrams, never the data plane
                log.exception("unexpected error processing %d datagram(s)", j - i)
                self.drops["internal_error"] += j - i
                other = True
            i = j
        return flows, other

    def _receive_transport(
        self, datagram: bytes, n: int, receiver: int, counter: int, source: Hashable, now: float
    ) -> bytes | None:
        flows: list[Flow] = []
        self._receive_run([datagram], 0, receiver, source, now, flows, vnet=False)
        return flows[0][2][0] if flows else None

    def _receive_run(
        self,
        datagrams: list[bytes],
        start: int,
        receiver: int,
        source: Hashable,
        now: float,
        flows: list[Flow],
        vnet: bool,
    ) -> tuple[int, bool]:
        """The run of one session's transport messages at datagrams[start] -> its flows (from
        allowed sources) appended; (the index after the run, True when every message was data
        that reached `flows`)."""
        session = self._sessions.get(receiver)
        if session is None:
            end = kernel.run_end(datagrams, start)
            self.drops["unknown_peer" if receiver in self._retired else "no_session"] += end - start
            return end, False
        run = receive_run(session, session.peer, datagrams, start, now, self._route, vnet)
        drops = self.drops
        for reason, count in run.drops.items():
            drops[reason] += count
        if run.authenticated:
            # What authenticated messages mean (confirmation, counters, roaming, timers): the
            # same whether they were decrypted here or by a worker.
            self.note_received(receiver, source, run.nbytes, run.authenticated, run.data, now)
        flows += run.flows
        clean = not run.drops and run.data == run.end - start
        return run.end, clean

    def _receive_other(self, datagram: bytes, source: Hashable, now: float) -> None:
        datagram = bytes(datagram)  # handshake messages are small and rare; libraries below want bytes
        n = len(datagram)
        if n < 4:
            self.drops["short"] += 1
            return None
        kind = datagram[:4]
        if kind == _TYPE_INITIATION:
            if self._sized(n, INITIATION_SIZE):
                self._receive_initiation(datagram, source, now)
        elif kind == _TYPE_RESPONSE:
            if self._sized(n, RESPONSE_SIZE):
                self._receive_response(datagram, source, now)
        elif kind == _TYPE_COOKIE:
            if self._sized(n, COOKIE_REPLY_SIZE):
                self._receive_cookie_reply(datagram)
        elif kind == _TYPE_TRANSPORT:
            self.drops["short"] += 1  # longer transport messages never get here
        else:
            self.drops["unknown_type"] += 1
        return None

    def _sized(self, n: int, expected: int) -> bool:
        if n == expected:
            return True
        self.drops["short" if n < expected else "wrong_size"] += 1
        return False

    def _macs_ok(
        self, datagram: bytes, mac1_offset: int, sender_index: int, source: Hashable, now: float
    ) -> bool:
        if not self._cookies.mac1_valid(datagram, mac1_offset):
            self.drops["bad_mac1"] += 1
            return False
        if self.under_load and not self._cookies.mac2_valid(datagram, mac1_offset, source, now):
            # Answer with a cookie instead of spending a DH on an address we have not verified.
            self._outbox.append(
                (self._cookies.cookie_reply(datagram, mac1_offset, sender_index, source, now), source)
            )
            self.drops["bad_mac2"] += 1
            return False
        if self.under_load and not self._rate_limiter.allow(source, now):
            self.drops["handshake_rate_limited"] += 1
            return False
        return True

    def _receive_initiation(self, datagram: bytes, source: Hashable, now: float) -> None:
        _, sender_index = INITIATION_HEADER.unpack_from(datagram, 0)
        if not self._macs_ok(datagram, INITIATION_MAC1, sender_index, source, now):
            return
        state = HandshakeState(CONSTRUCTION, False, IDENTIFIER, s=self._private_key, rs=None)
        try:
            timestamp = state.read_message(datagram[8:INITIATION_MAC1])
        except NoiseError:
            self.drops["handshake_invalid"] += 1
            return
        peer = self.peers.get(state.remote_static or b"")
        if peer is None:
            self.drops["unknown_peer"] += 1
            return
        if len(timestamp) != 12 or timestamp <= peer.last_received_timestamp:
            self.drops["replay"] += 1
            return
        if now - peer.last_initiation_consumed < HANDSHAKE_INITIATION_RATE:
            self.drops["handshake_rate_limited"] += 1
            return
        peer.last_received_timestamp = timestamp
        peer.last_initiation_consumed = now
        peer.t_new_handshake = None
        state.psk = peer.psk
        local_index = self._new_index()
        try:
            noise_response = state.write_message(b"")
        except NoiseError:
            self.drops["handshake_invalid"] += 1
            return
        message, peer.last_mac1 = add_macs(
            RESPONSE_HEADER.pack(MESSAGE_RESPONSE, local_index, sender_index) + noise_response,
            peer.mac1_key,
            self._fresh_cookie(peer, now),
        )
        initiator_to_us, us_to_initiator = state.split()
        session = Session(
            peer,
            local_index,
            sender_index,
            send_key=_key(us_to_initiator.key),
            recv_key=_key(initiator_to_us.key),
            initiator=False,
            created=now,
        )
        # A responder's session waits in `next` until the initiator's first packet confirms it.
        if peer.next is not None:
            self._forget(peer.next)
        if peer.previous is not None:
            self._forget(peer.previous)
            peer.previous = None
        peer.next = session
        self._sessions[local_index] = session
        peer.rx_bytes += len(datagram)
        peer.rx_packets += 1
        if source != peer.endpoint:
            self._roam(peer, source)
        peer.last_handshake_sent = now
        self._outbox.append((message, source))
        peer.tx_bytes += len(message)
        peer.tx_packets += 1
        self._handshake_done(peer, now, initiator=False)

    def _receive_response(self, datagram: bytes, source: Hashable, now: float) -> None:
        _, sender_index, receiver_index = RESPONSE_HEADER.unpack_from(datagram, 0)
        if not self._macs_ok(datagram, RESPONSE_MAC1, sender_index, source, now):
            return
        pending = self._handshakes.get(receiver_index)
        if pending is None:
            self.drops["handshake_invalid"] += 1
            return
        peer = pending.peer
        # Work on a copy: a forged response naming our index must not spoil the real exchange.
        state = pending.state.copy()
        state.psk = peer.psk
        try:
            payload = state.read_message(datagram[12:RESPONSE_MAC1])
        except NoiseError:
            self.drops["handshake_invalid"] += 1
            return
        if payload:
            self.drops["handshake_invalid"] += 1
            return
        us_to_responder, responder_to_us = state.split()
        del self._handshakes[receiver_index]
        peer.handshake = None
        session = Session(
            peer,
            receiver_index,
            sender_index,
            send_key=_key(us_to_responder.key),
            recv_key=_key(responder_to_us.key),
            initiator=True,
            created=now,
        )
        # As initiator the new session is usable at once; what the peer may still use stays receivable.
        if peer.next is not None:
            if peer.current is not None:
                self._forget(peer.current)
            if peer.previous is not None:
                self._forget(peer.previous)
            peer.previous = peer.next
            peer.next = None
        else:
            if peer.previous is not None:
                self._forget(peer.previous)
            peer.previous = peer.current
        peer.current = session
        self._sessions[receiver_index] = session
        peer.rx_bytes += len(datagram)
        peer.rx_packets += 1
        if source != peer.endpoint:
            self._roam(peer, source)
        peer.t_retransmit = None
        peer.t_new_handshake = None
        peer.handshake_started = None
        self._handshake_done(peer, now, initiator=True)
        # The responder may not send until it hears from us: confirm at once, with data if we have it.
        self._flush_queue(peer, session, now, keepalive_if_empty=True)

    def _receive_cookie_reply(self, datagram: bytes) -> None:
        (receiver_index,) = _u32_unpack(datagram, 4)
        pending = self._handshakes.get(receiver_index)
        peer = pending.peer if pending is not None else None
        if peer is None:
            session = self._sessions.get(receiver_index)
            peer = session.peer if session is not None else None
        if peer is None or peer.last_mac1 is None:
            self.drops["cookie_invalid"] += 1
            return
        try:
            cookie = open_cookie_reply(peer.cookie_key, datagram, peer.last_mac1)
        except crypto.AuthenticationError:
            self.drops["cookie_invalid"] += 1
            return
        peer.cookie = cookie
        peer.cookie_time = self._now
        # Only one cookie per handshake message: a replayed reply must not reset the clock.
        peer.last_mac1 = None

    def _confirm_next(self, peer: Peer, session: Session, now: float) -> None:
        if peer.previous is not None:
            self._forget(peer.previous)
        peer.previous = peer.current
        peer.current = session
        peer.next = None
        if peer.queue:
            self._flush_queue(peer, session, now, keepalive_if_empty=False)

    def _roam(self, peer: Peer, source: Hashable) -> None:
        if peer.endpoint is None or (self.roaming and peer.config.roam):
            peer.endpoint = source
            self._events.append(EndpointChanged(peer.public_key, source))
        elif not peer.config.roam and source != peer.observed_source:
            peer.observed_source = source
            self._events.append(EndpointObserved(peer.public_key, source))

    # ------------------------------------------------------------------ handshakes

    def _initiate(self, peer: Peer, now: float, retry: bool) -> None:
        endpoint = peer.endpoint
        if endpoint is None:
            return
        if not retry:
            # At most one initiation per REKEY_TIMEOUT; retries come from the retransmit timer.
            if now - peer.last_handshake_sent < REKEY_TIMEOUT:
                return
            if peer.handshake_started is None or peer.t_retransmit is None:
                peer.handshake_started = now
        elif peer.handshake_started is None:
            peer.handshake_started = now
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
            peer.handshake = None
        state = HandshakeState(
            CONSTRUCTION, True, IDENTIFIER, s=self._private_key, rs=peer.public_key, psk=peer.psk
        )
        local_index = self._new_index()
        noise_message = state.write_message(self._timestamp(now))
        message, peer.last_mac1 = add_macs(
            INITIATION_HEADER.pack(MESSAGE_INITIATION, local_index) + noise_message,
            peer.mac1_key,
            self._fresh_cookie(peer, now),
        )
        pending = PendingHandshake(peer, local_index, state, now)
        peer.handshake = pending
        self._handshakes[local_index] = pending
        peer.last_handshake_sent = now
        peer.t_retransmit = now + REKEY_TIMEOUT + self._jitter()
        if peer.t_retransmit < self._earliest:
            self._earliest = peer.t_retransmit
        peer.t_keepalive = None
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval
            if peer.t_persistent < self._earliest:
                self._earliest = peer.t_persistent
        self._outbox.append((message, endpoint))
        peer.tx_bytes += len(message)
        peer.tx_packets += 1

    def _handshake_done(self, peer: Peer, now: float, initiator: bool) -> None:
        peer.last_handshake = now
        peer.handshakes_completed += 1
        # A handshake message went each way: like any authenticated traffic, it makes a pending
        # keepalive unnecessary and restarts the persistent-keepalive interval.
        peer.t_keepalive = None
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval
            if peer.t_persistent < self._earliest:
                self._earliest = peer.t_persistent
        peer.t_zero_keys = now + ZERO_KEYS_AFTER
        if peer.t_zero_keys < self._earliest:
            self._earliest = peer.t_zero_keys
        self._events.append(HandshakeCompleted(peer.public_key, initiator))

    def _give_up(self, peer: Peer, now: float) -> None:
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
            peer.handshake = None
        peer.t_retransmit = None
        peer.handshake_started = None
        peer.handshakes_failed += 1
        dropped = len(peer.queue)
        peer.queue.clear()
        if dropped:
            self.drops["handshake_timeout"] += dropped
        if peer.t_zero_keys is None:
            peer.t_zero_keys = now + ZERO_KEYS_AFTER
            if peer.t_zero_keys < self._earliest:
                self._earliest = peer.t_zero_keys
        self._events.append(HandshakeFailed(peer.public_key))

    def _fresh_cookie(self, peer: Peer, now: float) -> bytes | None:
        if peer.cookie is not None and now - peer.cookie_time < COOKIE_REFRESH_TIME:
            return peer.cookie
        return None

    def _timestamp(self, now: float) -> bytes:
        # Strictly increasing even if the caller's clock stalls, or the peer would see a replay.
        ns = max(int(now * 1e9), self._last_timestamp_ns + 1)
        self._last_timestamp_ns = ns
        return tai64n_from_ns(ns)

    def _new_index(self) -> int:
        while True:
            index = secrets.randbits(32)
            if index not in self._sessions and index not in self._handshakes:
                return index

    def _jitter(self) -> float:
        return self._random.uniform(0.0, REKEY_TIMEOUT_JITTER_MAX)

    def _forget(self, session: Session) -> None:
        self._sessions.pop(session.local_index, None)

    def _drop_sessions(self, peer: Peer) -> None:
        for session in peer.sessions():
            self._forget(session)
        peer.current = peer.previous = peer.next = None
        if peer.handshake is not None:
            self._handshakes.pop(peer.handshake.local_index, None)
            peer.handshake = None
        peer.handshake_started = None
        peer.t_retransmit = peer.t_keepalive = peer.t_new_handshake = peer.t_zero_keys = None

    # ------------------------------------------------------------------ receive offload
    # An agent may decrypt transport messages elsewhere (another process) with a session's
    # exported receive state; the Device then must not decrypt that session itself (the replay
    # window lives where decryption happens) and learns what arrived through note_received.

    def session_indices(self) -> set[int]:
        """Our local indices of every live session (current, previous and unconfirmed next)."""
        return set(self._sessions)

    def export_receive_state(self, local_index: int) -> tuple[bytes, bytes, float] | None:
        """(peer public key, receive key, reject deadline) of a live session, or None."""
        session = self._sessions.get(local_index)
        if session is None:
            return None
        return session.peer.public_key, session.recv_key, session.reject_deadline

    def expire_sessions(self, local_indices: set[int]) -> None:
        """Stop using these sessions at once, as if they were past REJECT_AFTER_TIME: their
        packets count as expired, and the next packet to send starts a handshake without the
        usual REKEY_TIMEOUT wait (e.g. their receive side was lost with a crashed worker)."""
        for index in local_indices:
            session = self._sessions.get(index)
            if session is None:
                continue
            session.created = session.reject_deadline = session.send_rekey_deadline = -_NEVER
            session.peer.last_handshake_sent = -_NEVER

    def note_received(
        self, local_index: int, source: Hashable, nbytes: int, packets: int, data_packets: int, now: float
    ) -> None:
        """Account for `packets` transport messages of a session that were authenticated elsewhere
        (`data_packets` of them not keepalives): counters, confirming a responder's session,
        roaming and the timers, as _receive_transport does after decrypting."""
        self._now = now
        session = self._sessions.get(local_index)
        if session is None or packets <= 0:
            return
        peer = session.peer
        if session is peer.next:
            self._confirm_next(peer, session, now)
        peer.rx_bytes += nbytes
        peer.rx_packets += packets
        if source != peer.endpoint:
            self._roam(peer, source)
        peer.t_new_handshake = None
        if peer.keepalive_interval:
            peer.t_persistent = now + peer.keepalive_interval
            if peer.t_persistent < self._earliest:
                self._earliest = peer.t_persistent
        if now >= session.receive_rekey_deadline and session is peer.current and peer.handshake is None:
            self._initiate(peer, now, retry=False)
        if data_packets and peer.t_keepalive is None:
            peer.t_keepalive = now + KEEPALIVE_TIMEOUT
            if peer.t_keepalive < self._earliest:
                self._earliest = peer.t_keepalive

    # ------------------------------------------------------------------ driving

    def datagrams_to_send(self) -> list[tuple[bytes, Hashable]]:
        """Datagrams produced since the last call (handshakes, cookie replies, keepalives, flushed queues)."""
        out = self._outbox
        self._outbox = []
        return out

    def next_event(self) -> object | None:
        return self._events.popleft() if self._events else None

    def next_timer(self) -> float | None:
        """The earliest absolute deadline at which handle_timer has work, or None.

        May be earlier than needed (a timer that was cancelled since); handle_timer then finds
        nothing due and the next answer is exact. Never later than a real deadline.
        """
        return None if self._earliest == _NEVER else self._earliest

    def _recompute_earliest(self) -> None:
        best = _NEVER
        for peer in self.peers.values():
            t = peer.next_deadline()
            if t is not None and t < best:
                best = t
        self._earliest = best

    def handle_timer(self, now: float) -> None:
        """Run every timer due at `now` (retransmit, give up, keepalive, rekey, key erasure)."""
        self._now = now
        for peer in list(self.peers.values()):
            if peer.t_retransmit is not None and now >= peer.t_retransmit:
                peer.t_retransmit = None
                started = peer.handshake_started if peer.handshake_started is not None else now
                if now - started >= REKEY_ATTEMPT_TIME:
                    self._give_up(peer, now)
                else:
                    self._initiate(peer, now, retry=True)
            if peer.t_keepalive is not None and now >= peer.t_keepalive:
                peer.t_keepalive = None
                session = peer.current
                if session is not None and now - session.created < REJECT_AFTER_TIME:
                    self._send_keepalive(peer, now)
            if peer.t_new_handshake is not None and now >= peer.t_new_handshake:
                # We sent data and heard nothing back: the session may be dead on the other side.
                peer.t_new_handshake = None
                self._initiate(peer, now, retry=False)
            if peer.t_zero_keys is not None and now >= peer.t_zero_keys:
                # No handshake for 3 * REJECT_AFTER_TIME: erase the (long unusable) session keys.
                peer.t_zero_keys = None
                for session in peer.sessions():
                    self._forget(session)
                peer.current = peer.previous = peer.next = None
            if peer.t_persistent is not None and now >= peer.t_persistent:
                peer.t_persistent = None
                if peer.keepalive_interval:
                    if peer.current is not None:
                        self._send_keepalive(peer, now)
                    else:
                        # No session: a keepalive can only go out after a handshake.
                        self._initiate(peer, now, retry=False)
                    if peer.t_persistent is None:
                        peer.t_persistent = now + peer.keepalive_interval
                        if peer.t_persistent < self._earliest:
                            self._earliest = peer.t_persistent
        self._recompute_earliest()


def _key(key: bytes | None) -> bytes:
    if key is None:  # split() always yields keys; this only satisfies the type checker
        raise NoiseError("handshake produced no key")
    return key
