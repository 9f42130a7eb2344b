"""The relay's data path: one asyncio Protocol per TCP connection around the sans-I/O
DERP server connection, and the `Relay` that forwards packets by destination node key.

Why a Protocol and not streams: `data_received` hands us whatever the kernel delivered,
the sans-I/O core splits it into frames, and every frame for one destination produced by
that batch is written with one `transport.write`. No task per client, no await per packet.

Bounded queues: a client's send queue is its transport's write buffer plus frames
gathered in the current batch. Past `max_queue_bytes` new packets to that client are
dropped and counted; the sender and every other client go on unaffected. Control frames
the relay owes a client (Pong, PeerGone, ...) count against the same bound, and a client
whose write buffer passes half of it is not read from until it drains: a client that
floods Pings and never reads the Pongs stops itself, not the relay's memory.

Admission: each connection's handshake answers a fresh server challenge (see
wiremesh.core.derp.connection), reading is rate-limited per client by default, and one
source address may hold at most `max_connections_per_ip` connections.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import h11
from nacl.public import PrivateKey

from wiremesh.core.derp import frames
from wiremesh.core.derp.connection import (
    ChallengeFailed,
    ClientHello,
    Event,
    IdleTimeout,
    ServerConnection,
    State,
)
from wiremesh.core.derp.frames import KEY_LEN, PROTOCOL_VERSION, FrameError, FrameType, PeerGoneReason
from wiremesh.derp.keyauth import KeyAuthority, encode_key


class ReplicaMesh(Protocol):
    """What the relay asks of the mesh between its region's replicas (wiremesh.derp.mesh.Mesh)."""

    def announce(self, key: bytes, present: bool) -> None: ...

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool: ...

    def lapsed(self, key: bytes) -> bool:
        """Whether `key` was on another replica whose lease lapsed (it may come back)."""
        ...


log = logging.getLogger("wiremesh.derp")

_RECV_HEADER = frames._HEADER  # struct "!BI"
MAX_HTTP_REQUEST = 8 << 10
HANDSHAKE_TIMEOUT = 10.0
MAX_PEER_GONE_MEMORY = 4096


DEFAULT_RATE_BYTES_PER_SECOND = 12_500_000  # 100 Mbit/s per client: DERP is the fallback path
DEFAULT_MAX_CONNECTIONS_PER_IP = 100


@dataclasses.dataclass(slots=True)
class RelayConfig:
    rate_bytes_per_second: int = DEFAULT_RATE_BYTES_PER_SECOND  # 0 = unlimited
    rate_burst: int = 0  # 0 = one second's worth
    max_queue_bytes: int = 1 << 20  # per client, packets and control frames alike
    keepalive_interval: float = frames.KEEPALIVE_INTERVAL
    idle_timeout: float | None = 3 * frames.KEEPALIVE_INTERVAL
    # Tailscale's own clients (the bench load generator) do not answer the challenge.
    require_challenge: bool = True
    max_connections_per_ip: int = DEFAULT_MAX_CONNECTIONS_PER_IP  # 0 = no cap
    # From connect to admitted: the HTTP upgrade and the DERP handshake, however slowly sent.
    handshake_timeout: float = HANDSHAKE_TIMEOUT


class Stats:
    """Plain integer counters on the hot path; exported by the metrics collector at scrape."""

    def __init__(self) -> None:
        self.connections_total = 0
        self.packets_forwarded = 0
        self.bytes_forwarded = 0
        self.packets_received = 0
        self.bytes_received = 0
        self.cross_replica_sent = 0
        self.cross_replica_received = 0
        self.drops: Counter[str] = Counter()  # packet drops by reason
        self.closes: Counter[str] = Counter()  # connections closed by reason
        self.refused: Counter[str] = Counter()  # connections refused by reason


class Relay:
    """All clients of this replica, keyed by the node key each proved in its handshake."""

    def __init__(
        self,
        server_key: PrivateKey,
        authority: KeyAuthority,
        config: RelayConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server_key = server_key
        self.public_key = bytes(server_key.public_key)
        self.authority = authority
        self.config = config or RelayConfig()
        self.clock = clock
        self.clients: dict[bytes, DerpProtocol] = {}
        self.connections: set[DerpProtocol] = set()
        self.per_address: Counter[str] = Counter()  # open connections by source address
        self.stats = Stats()
        self.mesh: ReplicaMesh | None = None
        self._dirty: list[DerpProtocol] = []
        authority.on_revoked = self.revoke

    # --- registry ---------------------------------------------------------------------

    def register(self, proto: DerpProtocol, key: bytes) -> None:
        old = self.clients.get(key)
        if old is not None and old is not proto:
            # The newest connection for a key wins; the old one is most likely dead. It leaves
            # the table first, so closing it tells no peer (and no replica) that the key left.
            del self.clients[key]
            old.close("replaced")
        self.clients[key] = proto
        if self.mesh is not None:
            self.mesh.announce(key, True)

    def unregister(self, proto: DerpProtocol) -> None:
        key = proto.client_key
        if key is None or self.clients.get(key) is not proto:
            return
        del self.clients[key]
        if self.mesh is not None:
            self.mesh.announce(key, False)
        # Tell everyone this client sent to that it is gone, so they drop the reverse path.
        gone = frames.encode(frames.PeerGone(key, PeerGoneReason.DISCONNECTED))
        for peer_key in proto.sent_to:
            peer = self.clients.get(peer_key)
            if peer is not None:
                peer.write_frame(gone)

    def revoke(self, key: bytes, reason: str) -> None:
        proto = self.clients.get(key)
        if proto is not None:
            log.info("closing revoked node key %s: %s", encode_key(key), reason)
            proto.close("revoked")

    def sweep_expired(self) -> None:
        for key in self.authority.expired_keys():
            self.revoke(key, "expired")

    # --- forwarding -------------------------------------------------------------------

    def forward(self, src_proto: DerpProtocol, dst: bytes, packet: bytes) -> None:
        stats = self.stats
        dst_proto = self.clients.get(dst)
        src = src_proto.client_key
        assert src is not None
        if dst_proto is not None:
            self._deliver(dst_proto, src, packet)
            if len(src_proto.sent_to) < MAX_PEER_GONE_MEMORY:
                src_proto.sent_to.add(dst)
            if src_proto.told_gone:
                src_proto.told_gone.discard(dst)  # it is here now; tell again if it leaves
            return
        mesh = self.mesh
        if mesh is not None and mesh.forward(src, dst, packet):
            stats.cross_replica_sent += 1
            return
        if mesh is not None and mesh.lapsed(dst):
            stats.drops["peer_lease_expired"] += 1  # its replica died; the sender was told PeerGone
        else:
            stats.drops["no_such_peer"] += 1
        if dst not in src_proto.told_gone and len(src_proto.told_gone) < MAX_PEER_GONE_MEMORY:
            src_proto.told_gone.add(dst)
            src_proto.write_frame(frames.encode(frames.PeerGone(dst, PeerGoneReason.NOT_HERE)))

    def deliver_from_mesh(self, src: bytes, dst: bytes, packet: bytes) -> None:
        """A packet another replica forwarded here for a client of ours (caller flushes)."""
        self.stats.cross_replica_received += 1
        dst_proto = self.clients.get(dst)
        if dst_proto is None:
            self.stats.drops["mesh_not_here"] += 1
            return
        self._deliver(dst_proto, src, packet)

    def _deliver(self, dst_proto: DerpProtocol, src: bytes, packet: bytes) -> None:
        size = len(packet)
        if dst_proto.queued_bytes() + size > self.config.max_queue_bytes:
            self.stats.drops["queue_full"] += 1
            return
        if not dst_proto.pending:
            self._dirty.append(dst_proto)
        dst_proto.pending.append(_RECV_HEADER.pack(FrameType.RECV_PACKET, KEY_LEN + size))
        dst_proto.pending.append(src)
        dst_proto.pending.append(packet)
        dst_proto.pending_bytes += size + 5 + KEY_LEN
        self.stats.packets_forwarded += 1
        self.stats.bytes_forwarded += size

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for proto in dirty:
            proto.flush_pending()

    def close_all(self, reason: str, *, restarting: frames.Restarting | None = None) -> None:
        """Close every connection; with `restarting`, admitted clients are told first when to
        come back (Tailscale's Restarting frame), so they reconnect instead of failing over."""
        notice = frames.encode(restarting) if restarting is not None else None
        for proto in list(self.connections):
            if notice is not None and proto.client_key is not None and proto.client_key in self.clients:
                proto.write_frame(notice)
            proto.close(reason)


class DerpProtocol(asyncio.Protocol):
    """One TCP connection: HTTP upgrade (h11), then DERP frames."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.http: h11.Connection | None = h11.Connection(
            h11.SERVER, max_incomplete_event_size=MAX_HTTP_REQUEST
        )
        self._request: h11.Request | None = None
        self.conn: ServerConnection | None = None
        self.client_key: bytes | None = None
        self.peer = ""
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.sent_to: set[bytes] = set()
        self.told_gone: set[bytes] = set()
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._tokens = 0.0
        self._tokens_at = 0.0
        self._paused = False  # by the rate limit
        self._write_blocked = False  # by our own write buffer to this client
        self._address: str | None = None  # counted in relay.per_address

    # --- asyncio callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        relay = self.relay
        address = str(peer[0]) if isinstance(peer, tuple) else self.peer
        cap = relay.config.max_connections_per_ip
        if cap and relay.per_address[address] >= cap:
            # Refused before a byte is read: no HTTP parser, no handshake, no timer.
            relay.stats.refused["too_many_connections_from_address"] += 1
            self.closed = True
            transport.abort()
            return
        relay.per_address[address] += 1
        self._address = address
        # Past half the client's queue bound, stop reading it until it drains (pause_writing):
        # what it sends next would only add to what it does not read.
        high = relay.config.max_queue_bytes // 2
        transport.set_write_buffer_limits(high=high, low=high // 4)
        relay.connections.add(self)
        relay.stats.connections_total += 1
        self._arm_timer(relay.clock() + relay.config.handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._address is not None:
            per_address = self.relay.per_address
            per_address[self._address] -= 1
            if per_address[self._address] <= 0:
                del per_address[self._address]
            self._address = None
        if self._timer is not None:
            self._timer.cancel()
        self.relay.connections.discard(self)
        self.relay.unregister(self)
        self.relay.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.conn is None:
            self._http_received(data)
            return
        self._derp_received(data)

    # --- HTTP upgrade -----------------------------------------------------------------

    def _http_received(self, data: bytes) -> None:
        http = self.http
        assert http is not None
        try:
            http.receive_data(data)
            if self._request is None:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    return
                if not isinstance(event, h11.Request):
                    self._http_error(400, "expected an HTTP request")
                    return
                self._request = event
            # A GET has no body: the end of the message follows at once (or with more data).
            end = http.next_event()
            if end is h11.NEED_DATA:
                return
            if not isinstance(end, h11.EndOfMessage):
                self._http_error(400, "a request body is not expected here")
                return
        except h11.RemoteProtocolError as exc:
            self._http_error(400, f"bad HTTP request: {exc}")
            return
        event = self._request
        target = event.target.decode("latin-1").split("?", 1)[0]
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in event.headers}
        if target in ("/derp/probe", "/derp/latency-check", "/generate_204"):
            self._http_plain(204 if target == "/generate_204" else 200, b"")
            return
        if target != "/derp":
            self._http_plain(404, b"not found\n")
            return
        if event.method != b"GET":
            self._http_plain(405, b"method not allowed\n")
            return
        if headers.get("upgrade", "").lower() != "derp":
            # Tailscale's WebSocket transport is for browsers; we speak only raw DERP.
            self._http_plain(426, b"DERP requires connection upgrade\n", [("Upgrade", "DERP")])
            return
        if http.their_state is not h11.MIGHT_SWITCH_PROTOCOL:
            self._http_plain(400, b"Upgrade needs Connection: Upgrade\n")
            return
        fast_start = headers.get("derp-fast-start") == "1"
        if not fast_start:
            response = h11.InformationalResponse(
                status_code=101,
                headers=[
                    ("Upgrade", "DERP"),
                    ("Connection", "Upgrade"),
                    ("Derp-Version", str(PROTOCOL_VERSION)),
                    ("Derp-Public-Key", self.relay.public_key.hex()),
                ],
                reason=b"Switching Protocols",
            )
            self._write(http.send(response) or b"")
            rest = http.trailing_data[0]
        else:
            rest = http.trailing_data[0]
        self.http = None
        cfg = self.relay.config
        self.conn = ServerConnection(
            self.relay.server_key,
            now=self.relay.clock(),
            keepalive_interval=cfg.keepalive_interval,
            idle_timeout=cfg.idle_timeout,
            require_challenge=cfg.require_challenge,
        )
        self._write(self.conn.data_to_send())
        if rest:
            self._derp_received(bytes(rest))

    def _http_plain(self, status: int, body: bytes, extra: list[tuple[str, str]] | None = None) -> None:
        assert self.http is not None
        headers = [("Content-Length", str(len(body))), ("Connection", "close"), *(extra or [])]
        try:
            self._write(self.http.send(h11.Response(status_code=status, headers=headers)) or b"")
            self._write(self.http.send(h11.Data(data=body)) or b"")
            self._write(self.http.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            pass
        self.relay.stats.refused[f"http_{status}"] += 1
        self.close(f"http_{status}", count=False)

    def _http_error(self, status: int, message: str) -> None:
        log.info("refusing %s: %s", self.peer, message)
        body = (message + "\n").encode()
        head = f"HTTP/1.1 {status} Bad Request\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        self._write(head.encode() + body)
        self.relay.stats.refused["bad_http"] += 1
        self.close("bad_http", count=False)

    # --- DERP -------------------------------------------------------------------------

    def _derp_received(self, data: bytes) -> None:
        conn = self.conn
        assert conn is not None
        relay = self.relay
        now = relay.clock()
        if relay.config.rate_bytes_per_second and conn.state is State.ESTABLISHED:
            self._spend_tokens(len(data), now)
        try:
            events = conn.receive_data(data, now)
            self._handle_events(events, now)
        except ChallengeFailed as exc:
            log.info("refusing %s (%s): %s", self.peer, self._key_text(), exc)
            relay.stats.refused["challenge_failed"] += 1
            self.close("challenge_failed", count=False)
        except FrameError as exc:
            log.info("closing %s (%s): %s", self.peer, self._key_text(), exc)
            relay.stats.closes["protocol_error"] += 1
            self.close("protocol_error", count=False)
        out = conn.data_to_send()  # the handshake's ServerInfo, Pongs
        if out:
            # At most one read's worth past the bound: that write pauses reading (pause_writing).
            if self.queued_bytes() > relay.config.max_queue_bytes:
                relay.stats.drops["control_queue_full"] += 1
            else:
                self._write(out)
        relay.flush()

    def _handle_events(self, events: list[Event], now: float) -> None:
        relay = self.relay
        stats = relay.stats
        for event in events:
            if type(event) is frames.SendPacket:
                stats.packets_received += 1
                stats.bytes_received += len(event.packet)
                relay.forward(self, event.dst, event.packet)
            elif isinstance(event, ClientHello):
                self._on_hello(event, now)
                if self.closed:
                    return
            elif isinstance(event, frames.WatchConns | frames.ClosePeer | frames.ForwardPacket):
                # Mesh-only frames; our replicas mesh over NATS, so no client may send them.
                raise FrameError(f"{type(event).__name__} is not allowed for clients")
            # NotePreferred, Pong and others need nothing beyond what the core records.

    def _on_hello(self, hello: ClientHello, now: float) -> None:
        relay = self.relay
        key = hello.public_key
        self.client_key = key
        if not relay.authority.synced:
            log.info("refusing %s from %s: key registry not heard from yet", encode_key(key), self.peer)
            relay.stats.refused["registry_not_synced"] += 1
            self.close("registry_not_synced", count=False)
            return
        if not relay.authority.allowed(key):
            log.info("refusing unregistered node key %s from %s", encode_key(key), self.peer)
            relay.stats.refused["unregistered_key"] += 1
            self.close("unregistered_key", count=False)
            return
        assert self.conn is not None
        cfg = relay.config
        # Advertise the burst in force: Tailscale's client builds its own limiter from these two
        # numbers, and with a burst of 0 it would send nothing at all.
        pipelined = self.conn.accept(
            now,
            rate_bytes_per_second=cfg.rate_bytes_per_second,
            rate_burst=cfg.rate_burst or cfg.rate_bytes_per_second,
        )
        self._tokens = float(cfg.rate_burst or cfg.rate_bytes_per_second)
        self._tokens_at = now
        relay.register(self, key)
        log.info("node key %s connected from %s", encode_key(key), self.peer)
        self._arm_timer(self.conn.get_timer())
        self._handle_events(pipelined, now)

    # --- rate limit: a token bucket on bytes received; empty means stop reading -------

    def _spend_tokens(self, size: int, now: float) -> None:
        cfg = self.relay.config
        rate = cfg.rate_bytes_per_second
        burst = cfg.rate_burst or rate
        self._tokens = min(float(burst), self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        self._tokens -= size
        if self._tokens < 0 and not self._paused and self.transport is not None:
            # TCP backpressure instead of drops: the sender slows down, nobody else does.
            self._paused = True
            self.relay.stats.drops["rate_limited_pause"] += 1
            self._update_reading()
            asyncio.get_running_loop().call_later(-self._tokens / rate, self._resume)

    def _resume(self) -> None:
        self._paused = False
        self._update_reading()

    # --- back-pressure: asyncio calls these as our write buffer to the client passes its marks

    def pause_writing(self) -> None:
        self._write_blocked = True
        self.relay.stats.drops["write_blocked_pause"] += 1
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_blocked = False
        self._update_reading()

    def _update_reading(self) -> None:
        if self.closed or self.transport is None:
            return
        if self._paused or self._write_blocked:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    # --- output -----------------------------------------------------------------------

    def queued_bytes(self) -> int:
        transport = self.transport
        if transport is None or self.closed:
            return 1 << 62  # nothing more for a closed connection
        return transport.get_write_buffer_size() + self.pending_bytes

    def flush_pending(self) -> None:
        if self.pending and not self.closed and self.transport is not None:
            self.transport.write(b"".join(self.pending))
            if self.conn is not None:
                self.conn.last_sent = self.relay.clock()
        self.pending.clear()
        self.pending_bytes = 0

    def write_frame(self, data: bytes) -> None:
        """A control frame (PeerGone, ...) for this client, sent with the next flush."""
        if self.closed:
            return
        if self.queued_bytes() + len(data) > self.relay.config.max_queue_bytes:
            self.relay.stats.drops["control_queue_full"] += 1
            return
        if not self.pending:
            self.relay._dirty.append(self)
        self.pending.append(data)
        self.pending_bytes += len(data)

    def _write(self, data: bytes) -> None:
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self, reason: str, *, count: bool = True) -> None:
        if self.closed:
            return
        if count:
            self.relay.stats.closes[reason] += 1
        self.flush_pending()
        self.closed = True
        if self.conn is not None:
            self.conn.close()
        if self.transport is not None:
            self.transport.close()
        self.relay.unregister(self)

    # --- timers -----------------------------------------------------------------------

    def _arm_timer(self, deadline: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is None or self.closed:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, deadline - self.relay.clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        conn = self.conn
        if conn is None or conn.state is not State.ESTABLISHED:
            log.info(
                "closing %s: handshake not finished in %.0f s", self.peer, self.relay.config.handshake_timeout
            )
            self.close("handshake_timeout")
            return
        events = conn.handle_timer(self.relay.clock())
        out = conn.data_to_send()
        if out:
            self._write(out)
        if any(isinstance(e, IdleTimeout) for e in events):
            log.info("closing idle client %s", self._key_text())
            self.close("idle")
            return
        self._arm_timer(conn.get_timer())

    def _key_text(self) -> str:
        return encode_key(self.client_key) if self.client_key else "-"
