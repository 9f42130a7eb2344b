"""DERP v2 wire format: frame types, constants, one dataclass per frame, encode and parse.

A frame is `type u8 | length u32 BE | payload`. The numbers and sizes are those of
Tailscale's DERP protocol (derp/derp.go), so Tailscale clients and servers interoperate.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from enum import IntEnum

MAGIC = "DERP🔑".encode()  # 8 bytes: 44 45 52 50 f0 9f 94 91
PROTOCOL_VERSION = 2
KEY_LEN = 32
NONCE_LEN = 24
BOX_OVERHEAD = 16  # Poly1305 tag of a NaCl box
FRAME_HEADER_LEN = 5
MAX_PACKET_SIZE = 64 << 10  # largest packet a client may relay (payload only)
MAX_INFO_LEN = 1 << 20  # Tailscale's bound on ClientInfo/ServerInfo; we use a far smaller one below
MAX_HANDSHAKE_FRAME_LEN = 16 << 10  # a real ClientInfo is well under 1 KiB
# The largest frame after the handshake: ForwardPacket = two keys + a maximal packet.
MAX_FRAME_LEN = 2 * KEY_LEN + MAX_PACKET_SIZE
KEEPALIVE_INTERVAL = 60.0  # seconds; Tailscale's server sends a keepalive this often
PING_LEN = 8
# Our relay appends a fresh random challenge to ServerKey (in the bytes Tailscale's layout keeps
# for future use, which its client ignores); our client answers it inside the sealed ClientInfo.
CHALLENGE_LEN = 32

_HEADER = struct.Struct("!BI")


class FrameType(IntEnum):
    SERVER_KEY = 0x01  # 8B magic + 32B server public key (+ future bytes: our 32B challenge)
    CLIENT_INFO = 0x02  # 32B client public key + 24B nonce + naclbox(json)
    SERVER_INFO = 0x03  # 24B nonce + naclbox(json)
    SEND_PACKET = 0x04  # 32B destination key + packet
    RECV_PACKET = 0x05  # 32B source key + packet
    KEEP_ALIVE = 0x06  # no payload
    NOTE_PREFERRED = 0x07  # 1 byte: 1 if this is the client's home relay
    PEER_GONE = 0x08  # 32B key + 1 byte reason
    PEER_PRESENT = 0x09  # 32B key (+ 16B IP + 2B port + 1B flags)
    FORWARD_PACKET = 0x0A  # 32B source key + 32B destination key + packet (mesh peers)
    WATCH_CONNS = 0x10  # no payload (mesh peers)
    CLOSE_PEER = 0x11  # 32B key (mesh peers)
    PING = 0x12  # 8 bytes, echoed in PONG
    PONG = 0x13  # 8 bytes
    HEALTH = 0x14  # UTF-8 problem text; empty clears it
    RESTARTING = 0x15  # u32 reconnect-in ms, u32 try-for ms


class PeerGoneReason(IntEnum):
    DISCONNECTED = 0x00  # the peer was connected here and went away
    NOT_HERE = 0x01  # the server does not know the peer


class PeerPresentFlags(IntEnum):
    IS_REGULAR = 1 << 0
    IS_MESH_PEER = 1 << 1
    IS_PROBER = 1 << 2
    NOT_IDEAL = 1 << 3


class FrameError(ValueError):
    """A frame that breaks the protocol: the connection that sent it must be closed."""


# --- frame dataclasses ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerKey:
    public_key: bytes
    challenge: bytes = b""  # CHALLENGE_LEN bytes from our relay; empty from Tailscale's


@dataclasses.dataclass(frozen=True, slots=True)
class SendPacket:
    dst: bytes
    packet: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class RecvPacket:
    src: bytes
    packet: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class ForwardPacket:
    src: bytes
    dst: bytes
    packet: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class NotePreferred:
    preferred: bool


@dataclasses.dataclass(frozen=True, slots=True)
class PeerGone:
    key: bytes
    reason: int = PeerGoneReason.DISCONNECTED


@dataclasses.dataclass(frozen=True, slots=True)
class PeerPresent:
    key: bytes
    endpoint: tuple[str, int] | None = None
    flags: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class WatchConns:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class ClosePeer:
    key: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Health:
    problem: str


@dataclasses.dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


Frame = (
    ServerKey
    | SendPacket
    | RecvPacket
    | ForwardPacket
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | WatchConns
    | ClosePeer
    | Ping
    | Pong
    | Health
    | Restarting
)


# --- encoding ----------------------------------------------------------------------------


def frame_header(frame_type: int, length: int) -> bytes:
    return _HEADER.pack(frame_type, length)


def encode_frame(frame_type: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(frame_type, len(payload)) + payload


def _check_key(key: bytes, what: str = "key") -> None:
    if len(key) != KEY_LEN:
        raise FrameError(f"{what} is {len(key)} bytes, want {KEY_LEN}")


def encode(frame: Frame) -> bytes:
    """Encode one of the frame dataclasses (the handshake frames have their own helpers)."""
    if isinstance(frame, SendPacket):
        _check_key(frame.dst)
        _check_packet(frame.packet)
        return encode_frame(FrameType.SEND_PACKET, frame.dst + frame.packet)
    if isinstance(frame, RecvPacket):
        _check_key(frame.src)
        _check_packet(frame.packet)
        return encode_frame(FrameType.RECV_PACKET, frame.src + frame.packet)
    if isinstance(frame, ForwardPacket):
        _check_key(frame.src)
        _check_key(frame.dst)
        _check_packet(frame.packet)
        return encode_frame(FrameType.FORWARD_PACKET, frame.src + frame.dst + frame.packet)
    if isinstance(frame, ServerKey):
        _check_key(frame.public_key)
        if frame.challenge and len(frame.challenge) != CHALLENGE_LEN:
            raise FrameError(f"challenge is {len(frame.challenge)} bytes, want {CHALLENGE_LEN}")
        return encode_frame(FrameType.SERVER_KEY, MAGIC + frame.public_key + frame.challenge)
    if isinstance(frame, KeepAlive):
        return encode_frame(FrameType.KEEP_ALIVE)
    if isinstance(frame, NotePreferred):
        return encode_frame(FrameType.NOTE_PREFERRED, b"\x01" if frame.preferred else b"\x00")
    if isinstance(frame, PeerGone):
        _check_key(frame.key)
        return encode_frame(FrameType.PEER_GONE, frame.key + bytes([frame.reason]))
    if isinstance(frame, PeerPresent):
        _check_key(frame.key)
        payload = frame.key
        if frame.endpoint is not None:
            ip = ipaddress.ip_address(frame.endpoint[0])
            raw = (
                ip.packed
                if ip.version == 6
                else ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).packed
            )
            payload += raw + struct.pack("!HB", frame.endpoint[1], frame.flags)
        return encode_frame(FrameType.PEER_PRESENT, payload)
    if isinstance(frame, WatchConns):
        return encode_frame(FrameType.WATCH_CONNS)
    if isinstance(frame, ClosePeer):
        _check_key(frame.key)
        return encode_frame(FrameType.CLOSE_PEER, frame.key)
    if isinstance(frame, Ping | Pong):
        if len(frame.data) != PING_LEN:
            raise FrameError(f"ping data is {len(frame.data)} bytes, want {PING_LEN}")
        return encode_frame(FrameType.PING if isinstance(frame, Ping) else FrameType.PONG, frame.data)
    if isinstance(frame, Health):
        return encode_frame(FrameType.HEALTH, frame.problem.encode("utf-8"))
    if isinstance(frame, Restarting):
        return encode_frame(FrameType.RESTARTING, struct.pack("!II", frame.reconnect_in_ms, frame.try_for_ms))
    raise TypeError(f"cannot encode {type(frame).__name__}")


def _check_packet(packet: bytes) -> None:
    if len(packet) > MAX_PACKET_SIZE:
        raise FrameError(f"packet of {len(packet)} bytes exceeds the {MAX_PACKET_SIZE}-byte maximum")


# --- parsing -----------------------------------------------------------------------------


def parse(frame_type: int, payload: bytes) -> Frame:
    """Parse the payload of one non-handshake frame; raises FrameError on bad content.

    Unknown frame types raise too; callers that must skip them (as Tailscale's client
    does for forward compatibility) check `frame_type in KNOWN_TYPES` first.
    """
    n = len(payload)
    if frame_type == FrameType.SEND_PACKET or frame_type == FrameType.RECV_PACKET:
        if n < KEY_LEN:
            raise FrameError(f"frame {frame_type:#x} of {n} bytes is shorter than a key")
        if n - KEY_LEN > MAX_PACKET_SIZE:
            raise FrameError("packet exceeds the maximum packet size")
        key, packet = bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN:])
        return SendPacket(key, packet) if frame_type == FrameType.SEND_PACKET else RecvPacket(key, packet)
    if frame_type == FrameType.FORWARD_PACKET:
        if n < 2 * KEY_LEN:
            raise FrameError("ForwardPacket shorter than two keys")
        return ForwardPacket(
            bytes(payload[:KEY_LEN]), bytes(payload[KEY_LEN : 2 * KEY_LEN]), bytes(payload[64:])
        )
    if frame_type == FrameType.KEEP_ALIVE:
        return KeepAlive()
    if frame_type == FrameType.NOTE_PREFERRED:
        if n < 1:
            raise FrameError("NotePreferred without its byte")
        return NotePreferred(payload[0] != 0)
    if frame_type == FrameType.PEER_GONE:
        if n < KEY_LEN:
            raise FrameError("PeerGone shorter than a key")
        reason = payload[KEY_LEN] if n > KEY_LEN else PeerGoneReason.DISCONNECTED
        return PeerGone(bytes(payload[:KEY_LEN]), reason)
    if frame_type == FrameType.PEER_PRESENT:
        if n < KEY_LEN:
            raise FrameError("PeerPresent shorter than a key")
        endpoint = None
        flags = 0
        if n >= KEY_LEN + 18:
            ip = ipaddress.IPv6Address(bytes(payload[KEY_LEN : KEY_LEN + 16]))
            host = str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)
            endpoint = (host, struct.unpack_from("!H", payload, KEY_LEN + 16)[0])
            if n >= KEY_LEN + 19:
                flags = payload[KEY_LEN + 18]
        return PeerPresent(bytes(payload[:KEY_LEN]), endpoint, flags)
    if frame_type == FrameType.WATCH_CONNS:
        return WatchConns()
    if frame_type == FrameType.CLOSE_PEER:
        if n != KEY_LEN:
            raise FrameError("ClosePeer must carry exactly one key")
        return ClosePeer(bytes(payload))
    if frame_type == FrameType.PING or frame_type == FrameType.PONG:
        if n != PING_LEN:
            raise FrameError(f"ping/pong of {n} bytes, want {PING_LEN}")
        return Ping(bytes(payload)) if frame_type == FrameType.PING else Pong(bytes(payload))
    if frame_type == FrameType.HEALTH:
        return Health(bytes(payload).decode("utf-8", errors="replace"))
    if frame_type == FrameType.RESTARTING:
        if n < 8:
            raise FrameError("Restarting shorter than 8 bytes")
        reconnect, try_for = struct.unpack_from("!II", payload)
        return Restarting(reconnect, try_for)
    if frame_type == FrameType.SERVER_KEY:
        if n < len(MAGIC) + KEY_LEN or bytes(payload[: len(MAGIC)]) != MAGIC:
            raise FrameError("ServerKey without the DERP magic and a key")
        start = len(MAGIC) + KEY_LEN
        # Bytes past the key are for future use: a challenge only when it is exactly ours.
        extra = bytes(payload[start:])
        return ServerKey(bytes(payload[len(MAGIC) : start]), extra if len(extra) == CHALLENGE_LEN else b"")
    raise FrameError(f"unexpected frame type {frame_type:#x}")


KNOWN_TYPES = frozenset(int(t) for t in FrameType)


class FrameReader:
    """Splits a byte stream into frames. `feed(data)` returns complete (type, payload) pairs.

    A header announcing more than `max_frame_len` bytes raises FrameError at once, before
    any of the payload is buffered, so a hostile length costs nothing.
    """

    __slots__ = ("_buf", "max_frame_len")

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        self._buf = bytearray()
        self.max_frame_len = max_frame_len

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buf
        buf += data
        frames: list[tuple[int, bytes]] = []
        offset = 0
        end = len(buf)
        unpack = _HEADER.unpack_from
        while end - offset >= FRAME_HEADER_LEN:
            frame_type, length = unpack(buf, offset)
            if length > self.max_frame_len:
                raise FrameError(f"frame length {length} exceeds the limit of {self.max_frame_len}")
            stop = offset + FRAME_HEADER_LEN + length
            if stop > end:
                break
            frames.append((frame_type, bytes(buf[offset + FRAME_HEADER_LEN : stop])))
            offset = stop
        if offset:
            del buf[:offset]
        return frames
