"""Sans-I/O DERP connection state machines, one per side.

Neither class touches a socket or a clock: bytes and `now` go in; bytes to send
(`data_to_send()`), the next timer deadline (`get_timer()`) and events come out. Any
protocol violation raises `FrameError`; the adapter then closes that one connection.

Handshake (Tailscale DERP v2):
  server -> ServerKey(magic, server public key, challenge)
  client -> ClientInfo(client public key, nonce, box(json) from client to server)
  server -> ServerInfo(nonce, box(json) from server to client)
Opening the ClientInfo box proves the client holds the private half of the key it
claims, so the relay only ever delivers a packet to the holder of its destination key.

The box alone is not fresh: both keys are static, so a ClientInfo captured on the wire
(plain TCP, or TLS terminated somewhere) opens again on any later connection. Our server
therefore sends a fresh random challenge in ServerKey's trailing bytes (which Tailscale's
frame layout reserves for future use and its client ignores) and our client puts it, hex,
in the sealed JSON ("challenge"); a ClientInfo carrying another connection's challenge is
a replay and is refused. Clients that know nothing of the challenge (Tailscale's own) are
refused too unless the server is told to admit them (`require_challenge=False`).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
import struct
from enum import Enum
from typing import Any

from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey

from wiremesh.core.derp import frames
from wiremesh.core.derp.frames import (
    CHALLENGE_LEN,
    KEY_LEN,
    MAGIC,
    MAX_FRAME_LEN,
    MAX_HANDSHAKE_FRAME_LEN,
    MAX_PACKET_SIZE,
    NONCE_LEN,
    PROTOCOL_VERSION,
    FrameError,
    FrameReader,
    FrameType,
)

_HEADER = struct.Struct("!BI")
MAX_PENDING_FRAMES = 64  # frames a client may pipeline before it is admitted


class ChallengeFailed(FrameError):
    """A ClientInfo that does not answer this connection's challenge: replayed, or an old client."""


# --- events ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ClientHello:
    """The client proved `public_key`; the adapter decides, then calls accept() or closes."""

    public_key: bytes
    info: dict[str, Any]

    @property
    def can_ack_pings(self) -> bool:
        return bool(_field(self.info, "CanAckPings"))


@dataclasses.dataclass(frozen=True, slots=True)
class Connected:
    """Client side: the handshake finished."""

    server_key: bytes
    info: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class PacketReceived:
    src: bytes
    packet: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class IdleTimeout:
    pass


Event = ClientHello | Connected | PacketReceived | IdleTimeout | frames.Frame


def _field(info: dict[str, Any], name: str) -> Any:
    # Go's JSON decoder matches field names case-insensitively; so do we.
    lowered = name.lower()
    for key, value in info.items():
        if key.lower() == lowered:
            return value
    return None


def _open_json(box: Box, payload: bytes) -> dict[str, Any]:
    if len(payload) < NONCE_LEN + frames.BOX_OVERHEAD:
        raise FrameError("sealed info shorter than a nonce and a tag")
    try:
        plain = box.decrypt(bytes(payload[NONCE_LEN:]), bytes(payload[:NONCE_LEN]))
    except CryptoError as exc:
        raise FrameError("sealed info does not open: wrong key or tampered") from exc
    try:
        info = json.loads(plain) if plain.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"sealed info is not JSON: {exc}") from exc
    if not isinstance(info, dict):
        raise FrameError("sealed info is not a JSON object")
    return info


def _seal_json(box: Box, info: dict[str, Any]) -> bytes:
    nonce = os.urandom(NONCE_LEN)
    sealed = box.encrypt(json.dumps(info, separators=(",", ":")).encode(), nonce)
    return nonce + sealed.ciphertext


class State(Enum):
    AWAIT_SERVER_KEY = "await_server_key"  # client
    AWAIT_CLIENT_INFO = "await_client_info"  # server
    AWAIT_ACCEPT = "await_accept"  # server: hello delivered, waiting for the adapter's verdict
    AWAIT_SERVER_INFO = "await_server_info"  # client
    ESTABLISHED = "established"
    CLOSED = "closed"


class _Base:
    def __init__(self, now: float, keepalive_interval: float) -> None:
        self.state = State.CLOSED
        self._out = bytearray()
        self.keepalive_interval = keepalive_interval
        self.last_received = now
        self.last_sent = now
        self.frames_received = 0

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def _write(self, data: bytes) -> None:
        self._out += data

    def close(self) -> None:
        self.state = State.CLOSED


class ServerConnection(_Base):
    """One client's connection, as the relay sees it."""

    def __init__(
        self,
        server_key: PrivateKey,
        *,
        now: float,
        keepalive_interval: float = frames.KEEPALIVE_INTERVAL,
        idle_timeout: float | None = 3 * frames.KEEPALIVE_INTERVAL,
        challenge: bytes | None = None,
        require_challenge: bool = True,
    ) -> None:
        super().__init__(now, keepalive_interval)
        self._server_key = server_key
        self.challenge = os.urandom(CHALLENGE_LEN) if challenge is None else challenge
        self.require_challenge = require_challenge
        self.idle_timeout = idle_timeout
        self.state = State.AWAIT_CLIENT_INFO
        self.client_key: bytes | None = None
        self.can_ack_pings = False
        self.preferred = False
        self._reader = FrameReader(MAX_HANDSHAKE_FRAME_LEN)
        self._box: Box | None = None
        self._pending: list[tuple[int, bytes]] = []
        self._write(frames.encode(frames.ServerKey(bytes(server_key.public_key), self.challenge)))

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self.last_received = now
        return self._process(self._reader.feed(data), now)

    def _process(self, parsed: list[tuple[int, bytes]], now: float) -> list[Event]:
        events: list[Event] = []
        for frame_type, payload in parsed:
            self.frames_received += 1
            if self.state is State.ESTABLISHED:
                if frame_type == FrameType.SEND_PACKET:
                    # The hot path: no dataclass per packet beyond the event itself.
                    if len(payload) < KEY_LEN:
                        raise FrameError("SendPacket shorter than a key")
                    if len(payload) > KEY_LEN + MAX_PACKET_SIZE:
                        raise FrameError(f"packet exceeds the {MAX_PACKET_SIZE}-byte maximum")
                    events.append(frames.SendPacket(payload[:KEY_LEN], payload[KEY_LEN:]))
                    continue
                frame = frames.parse(frame_type, payload) if frame_type in frames.KNOWN_TYPES else None
                if frame is None:
                    continue  # unknown types are skipped for forward compatibility
                if isinstance(frame, frames.Ping):
                    self._write(frames.encode(frames.Pong(frame.data)))
                    self.last_sent = now
                    continue
                if isinstance(frame, frames.NotePreferred):
                    self.preferred = frame.preferred
                if isinstance(frame, frames.KeepAlive):
                    continue
                if isinstance(
                    frame,
                    frames.ServerKey
                    | frames.RecvPacket
                    | frames.PeerGone
                    | frames.PeerPresent
                    | frames.Health
                    | frames.Restarting,
                ):
                    raise FrameError(f"client sent server-only frame {frame_type:#x}")
                events.append(frame)
            elif self.state is State.AWAIT_CLIENT_INFO:
                if frame_type != FrameType.CLIENT_INFO:
                    raise FrameError(f"expected ClientInfo, got frame type {frame_type:#x}")
                events.append(self._on_client_info(payload))
            else:  # AWAIT_ACCEPT: the client may pipeline packets right behind ClientInfo
                if len(self._pending) >= MAX_PENDING_FRAMES:
                    raise FrameError("too many frames before the server accepted the client")
                self._pending.append((frame_type, payload))
        return events

    def _on_client_info(self, payload: bytes) -> ClientHello:
        if len(payload) < KEY_LEN + NONCE_LEN + frames.BOX_OVERHEAD:
            raise FrameError("ClientInfo too short")
        key = bytes(payload[:KEY_LEN])
        try:
            box = Box(self._server_key, PublicKey(key))
        except (CryptoError, ValueError) as exc:
            raise FrameError(f"ClientInfo key unusable: {exc}") from exc
        info = _open_json(box, payload[KEY_LEN:])
        answer = _field(info, "challenge")
        if answer is None:
            if self.require_challenge:
                raise ChallengeFailed(
                    "ClientInfo does not answer the relay's challenge: a replayed handshake, or a client "
                    "that predates it (run the relay with --allow-unchallenged-clients for those)"
                )
        elif not isinstance(answer, str) or not hmac.compare_digest(
            answer.encode(), self.challenge.hex().encode()
        ):
            raise ChallengeFailed("ClientInfo answers another connection's challenge: a replayed handshake")
        self._box = box
        self.client_key = key
        self.can_ack_pings = bool(_field(info, "CanAckPings"))
        self.state = State.AWAIT_ACCEPT
        return ClientHello(key, info)

    def pending_frames_after_hello(self) -> bool:
        return self._reader.buffered > 0

    def accept(self, now: float, *, rate_bytes_per_second: int = 0, rate_burst: int = 0) -> list[Event]:
        """Admit the client: send ServerInfo and process anything it pipelined behind ClientInfo."""
        if self.state is not State.AWAIT_ACCEPT or self._box is None:
            raise FrameError("accept() outside the handshake")
        info: dict[str, Any] = {"version": PROTOCOL_VERSION}
        if rate_bytes_per_second:
            info["TokenBucketBytesPerSecond"] = rate_bytes_per_second
            info["TokenBucketBytesBurst"] = rate_burst
        self._write(frames.encode_frame(FrameType.SERVER_INFO, _seal_json(self._box, info)))
        self.last_sent = now
        self.state = State.ESTABLISHED
        self._reader.max_frame_len = MAX_FRAME_LEN
        pending, self._pending = self._pending, []
        return self._process(pending, now)

    # Frames the relay sends to this client.

    def recv_packet_frame(self, src: bytes, packet: bytes) -> bytes:
        """Encoded RecvPacket, for the adapter to write straight to the transport."""
        return _HEADER.pack(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src + packet

    def send_frame(self, frame: frames.Frame, now: float) -> None:
        self._write(frames.encode(frame))
        self.last_sent = now

    def get_timer(self) -> float | None:
        if self.state is not State.ESTABLISHED:
            return None
        deadline = self.last_sent + self.keepalive_interval
        if self.idle_timeout is not None and self.can_ack_pings:
            deadline = min(deadline, self.last_received + self.idle_timeout)
        return deadline

    def handle_timer(self, now: float) -> list[Event]:
        if self.state is not State.ESTABLISHED:
            return []
        if (
            self.idle_timeout is not None
            and self.can_ack_pings
            and now >= self.last_received + self.idle_timeout
        ):
            self.state = State.CLOSED
            return [IdleTimeout()]
        if now >= self.last_sent + self.keepalive_interval:
            # A client that can answer pings gets a Ping, which proves it is alive;
            # others get the classic KeepAlive.
            frame: frames.Frame = frames.Ping(os.urandom(8)) if self.can_ack_pings else frames.KeepAlive()
            self.send_frame(frame, now)
        return []


class ClientConnection(_Base):
    """A relay client: handshake, then packets in and out."""

    def __init__(
        self,
        private_key: PrivateKey,
        *,
        now: float,
        server_key: bytes | None = None,
        can_ack_pings: bool = True,
        info: dict[str, Any] | None = None,
        keepalive_interval: float = frames.KEEPALIVE_INTERVAL,
    ) -> None:
        super().__init__(now, keepalive_interval)
        self._private_key = private_key
        self.public_key = bytes(private_key.public_key)
        self.expected_server_key = server_key
        self.server_key: bytes | None = None
        self._info: dict[str, Any] = {"version": PROTOCOL_VERSION, "CanAckPings": can_ack_pings}
        if info:
            self._info.update(info)
        self._box: Box | None = None
        self._reader = FrameReader(max(MAX_FRAME_LEN, MAX_HANDSHAKE_FRAME_LEN))
        self.state = State.AWAIT_SERVER_KEY

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        if self.state is State.CLOSED:
            return []
        self.last_received = now
        events: list[Event] = []
        for frame_type, payload in self._reader.feed(data):
            self.frames_received += 1
            if self.state is State.ESTABLISHED:
                if frame_type == FrameType.RECV_PACKET:
                    if len(payload) < KEY_LEN:
                        raise FrameError("RecvPacket shorter than a key")
                    events.append(PacketReceived(payload[:KEY_LEN], payload[KEY_LEN:]))
                    continue
                if frame_type not in frames.KNOWN_TYPES:
                    continue
                frame = frames.parse(frame_type, payload)
                if isinstance(frame, frames.Ping):
                    self._write(frames.encode(frames.Pong(frame.data)))
                    self.last_sent = now
                events.append(frame)
            elif self.state is State.AWAIT_SERVER_KEY:
                if frame_type != FrameType.SERVER_KEY:
                    raise FrameError(f"expected ServerKey, got frame type {frame_type:#x}")
                self._on_server_key(payload, now)
            elif self.state is State.AWAIT_SERVER_INFO:
                if frame_type != FrameType.SERVER_INFO:
                    raise FrameError(f"expected ServerInfo, got frame type {frame_type:#x}")
                assert self._box is not None and self.server_key is not None
                info = _open_json(self._box, payload)
                self.state = State.ESTABLISHED
                events.append(Connected(self.server_key, info))
        return events

    def _on_server_key(self, payload: bytes, now: float) -> None:
        if len(payload) < len(MAGIC) + KEY_LEN or bytes(payload[: len(MAGIC)]) != MAGIC:
            raise FrameError("ServerKey without the DERP magic")
        key = bytes(payload[len(MAGIC) : len(MAGIC) + KEY_LEN])
        if self.expected_server_key is not None and key != self.expected_server_key:
            raise FrameError("server key differs from the one expected")
        self.server_key = key
        self._box = Box(self._private_key, PublicKey(key))
        info = dict(self._info)
        challenge = bytes(payload[len(MAGIC) + KEY_LEN :])
        if len(challenge) == CHALLENGE_LEN:
            info["challenge"] = challenge.hex()  # binds this ClientInfo to this connection
        sealed = _seal_json(self._box, info)
        self._write(frames.encode_frame(FrameType.CLIENT_INFO, self.public_key + sealed))
        self.last_sent = now
        self.state = State.AWAIT_SERVER_INFO

    def send_packet(self, dst: bytes, packet: bytes, now: float) -> None:
        if self.state not in (State.AWAIT_SERVER_INFO, State.ESTABLISHED):
            raise FrameError("cannot send before the server key is known")
        if len(dst) != KEY_LEN:
            raise FrameError("destination key must be 32 bytes")
        if len(packet) > MAX_PACKET_SIZE:
            raise FrameError(f"packet of {len(packet)} bytes exceeds {MAX_PACKET_SIZE}")
        self._write(_HEADER.pack(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + dst + packet)
        self.last_sent = now

    def send_frame(self, frame: frames.Frame, now: float) -> None:
        self._write(frames.encode(frame))
        self.last_sent = now

    def get_timer(self) -> float | None:
        if self.state is not State.ESTABLISHED:
            return None
        return self.last_sent + self.keepalive_interval

    def handle_timer(self, now: float) -> list[Event]:
        if self.state is State.ESTABLISHED and now >= self.last_sent + self.keepalive_interval:
            self.send_frame(frames.KeepAlive(), now)
        return []
