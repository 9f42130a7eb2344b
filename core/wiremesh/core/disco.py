"""disco: the small sealed messages agents exchange to find and keep direct paths (sans-I/O).

Wire format of one disco datagram (over UDP or inside a DERP packet):

    MAGIC (6) | sender disco public key (32) | nonce (24) | NaCl box(plaintext)

The box is crypto_box (X25519 + XSalsa20-Poly1305) between the sender's and the receiver's
disco keys, so only the two agents can read or forge a message. Plaintext:

    type u8 | version u8 | body

- Ping (1):        tx id (12) | sender node key (32)
- Pong (2):        tx id (12) | observed source address: IPv6 or IPv4-mapped (16) | port u16
- CallMeMaybe (3): flags u8 | up to MAX_ENDPOINTS x (kind u8 | address (16) | port u16)

The magic cannot be mistaken for WireGuard (type 1-4 then three zero bytes) or STUN (cookie
0x2112A442 at bytes 4-8), which lets one UDP socket carry all three.
CallMeMaybe carries endpoint kinds and a "my NAT maps per destination" flag (our extension) so
the receiver can prefer LAN paths and knows when to spray ports for the birthday probe.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import struct
from collections import OrderedDict

from nacl.bindings import crypto_box_afternm, crypto_box_beforenm, crypto_box_open_afternm
from nacl.exceptions import CryptoError

MAGIC = b"WM\xf0\x9f\x92\xac"  # "WM" + U+1F4AC SPEECH BALLOON in UTF-8
KEY_LEN = 32
NONCE_LEN = 24
TX_ID_LEN = 12
HEADER_LEN = len(MAGIC) + KEY_LEN + NONCE_LEN
BOX_OVERHEAD = 16
VERSION = 0
MAX_ENDPOINTS = 32
MAX_DISCO = 1400  # sealed; anything larger is not ours
BOX_CACHE = 4096  # precomputed shared keys kept (one per peer disco key)

Address = tuple[str, int]

_ADDR = struct.Struct("!16sH")
_ENDPOINT = struct.Struct("!B16sH")


class DiscoError(ValueError):
    """A datagram that is not a well-formed, authentic disco message."""


class MessageType(enum.IntEnum):
    PING = 1
    PONG = 2
    CALL_ME_MAYBE = 3


class EndpointKind(enum.IntEnum):
    """Where an endpoint came from; the receiver prefers LOCAL (same LAN) paths."""

    UNKNOWN = 0
    LOCAL = 1  # an address of the sender's own interfaces
    STUN = 2  # the sender's NAT mapping as a STUN server saw it
    PORTMAP = 3  # a mapping the sender's router granted (NAT-PMP / PCP)


FLAG_MAPPING_VARIES = 0x01  # the sender's NAT maps each destination to a different port
FLAG_BIRTHDAY = 0x02  # the sender just opened probe sockets: spray its public address's ports now


@dataclasses.dataclass(frozen=True, slots=True)
class Ping:
    tx_id: bytes
    node_key: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Pong:
    tx_id: bytes
    source: Address  # where the Ping came from, as the ponger saw it


@dataclasses.dataclass(frozen=True, slots=True)
class Endpoint:
    address: Address
    kind: EndpointKind = EndpointKind.UNKNOWN


@dataclasses.dataclass(frozen=True, slots=True)
class CallMeMaybe:
    endpoints: tuple[Endpoint, ...]
    mapping_varies: bool = False
    birthday: bool = False


Message = Ping | Pong | CallMeMaybe


def is_disco(data: bytes) -> bool:
    return data[:6] == MAGIC


def new_tx_id() -> bytes:
    return os.urandom(TX_ID_LEN)


# ----------------------------------------------------------------------------- plaintext codec


def _pack_addr(addr: Address) -> bytes:
    ip = ipaddress.ip_address(addr[0])
    raw = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
    if not 0 <= addr[1] <= 0xFFFF:
        raise DiscoError(f"port out of range: {addr[1]}")
    return _ADDR.pack(raw, addr[1])


def _unpack_addr(raw: bytes, port: int) -> Address:
    ip6 = ipaddress.IPv6Address(raw)
    v4 = ip6.ipv4_mapped
    return (str(v4) if v4 is not None else str(ip6), port)


def encode(message: Message) -> bytes:
    """The plaintext of `message` (before sealing)."""
    if isinstance(message, Ping):
        if len(message.tx_id) != TX_ID_LEN or len(message.node_key) != KEY_LEN:
            raise DiscoError("ping needs a 12-byte tx id and a 32-byte node key")
        return bytes((MessageType.PING, VERSION)) + message.tx_id + message.node_key
    if isinstance(message, Pong):
        if len(message.tx_id) != TX_ID_LEN:
            raise DiscoError("pong needs a 12-byte tx id")
        return bytes((MessageType.PONG, VERSION)) + message.tx_id + _pack_addr(message.source)
    if len(message.endpoints) > MAX_ENDPOINTS:
        raise DiscoError(f"at most {MAX_ENDPOINTS} endpoints in a CallMeMaybe")
    flags = (FLAG_MAPPING_VARIES if message.mapping_varies else 0) | (
        FLAG_BIRTHDAY if message.birthday else 0
    )
    body = b"".join(bytes((ep.kind,)) + _pack_addr(ep.address) for ep in message.endpoints)
    return bytes((MessageType.CALL_ME_MAYBE, VERSION, flags)) + body


def decode(plain: bytes) -> Message:
    """Parse a plaintext; unknown types and short bodies raise DiscoError. Extra bytes are ignored
    (a later version may append fields)."""
    if len(plain) < 2:
        raise DiscoError("disco message too short")
    kind, body = plain[0], plain[2:]
    if kind == MessageType.PING:
        if len(body) < TX_ID_LEN + KEY_LEN:
            raise DiscoError("truncated ping")
        return Ping(body[:TX_ID_LEN], body[TX_ID_LEN : TX_ID_LEN + KEY_LEN])
    if kind == MessageType.PONG:
        if len(body) < TX_ID_LEN + _ADDR.size:
            raise DiscoError("truncated pong")
        raw, port = _ADDR.unpack_from(body, TX_ID_LEN)
        return Pong(body[:TX_ID_LEN], _unpack_addr(raw, port))
    if kind == MessageType.CALL_ME_MAYBE:
        if not body:
            raise DiscoError("truncated call-me-maybe")
        flags, rest = body[0], body[1:]
        count = min(len(rest) // _ENDPOINT.size, MAX_ENDPOINTS)
        endpoints = []
        for i in range(count):
            ep_kind, raw, port = _ENDPOINT.unpack_from(rest, i * _ENDPOINT.size)
            try:
                k = EndpointKind(ep_kind)
            except ValueError:
                k = EndpointKind.UNKNOWN
            if port == 0:
                continue
            endpoints.append(Endpoint(_unpack_addr(raw, port), k))
        return CallMeMaybe(tuple(endpoints), bool(flags & FLAG_MAPPING_VARIES), bool(flags & FLAG_BIRTHDAY))
    raise DiscoError(f"unknown disco message type {kind}")


# ----------------------------------------------------------------------------- sealing


class DiscoKey:
    """Our disco key pair; seals to and opens from peers' disco public keys.

    Shared keys (X25519) are precomputed once per peer and cached, since every heartbeat
    would otherwise cost a scalar multiplication.
    """

    def __init__(self, private_key: bytes | None = None) -> None:
        from nacl.public import PrivateKey

        pk = PrivateKey(private_key) if private_key is not None else PrivateKey.generate()
        self.private_key = bytes(pk)
        self.public_key = bytes(pk.public_key)
        self._shared: OrderedDict[bytes, bytes] = OrderedDict()

    def _shared_key(self, peer: bytes) -> bytes:
        key = self._shared.get(peer)
        if key is None:
            if len(peer) != KEY_LEN:
                raise DiscoError("disco public keys are 32 bytes")
            key = crypto_box_beforenm(peer, self.private_key)
            self._shared[peer] = key
            if len(self._shared) > BOX_CACHE:
                self._shared.popitem(last=False)
        return key

    def seal(self, message: Message, peer: bytes) -> bytes:
        nonce = os.urandom(NONCE_LEN)
        boxed = crypto_box_afternm(encode(message), nonce, self._shared_key(peer))
        return MAGIC + self.public_key + nonce + boxed

    @staticmethod
    def sender(data: bytes) -> bytes:
        """The sender's disco public key (unauthenticated until `open` succeeds)."""
        if len(data) < HEADER_LEN + BOX_OVERHEAD or not is_disco(data):
            raise DiscoError("not a disco message")
        return data[6 : 6 + KEY_LEN]

    def open(self, data: bytes) -> tuple[bytes, Message]:
        """(sender disco key, message); DiscoError when malformed, oversized or not authentic."""
        if len(data) > MAX_DISCO:
            raise DiscoError("disco message too large")
        sender = self.sender(data)
        nonce = data[6 + KEY_LEN : HEADER_LEN]
        try:
            plain = crypto_box_open_afternm(data[HEADER_LEN:], nonce, self._shared_key(sender))
        except CryptoError as exc:
            raise DiscoError("disco message failed authentication") from exc
        return sender, decode(plain)
