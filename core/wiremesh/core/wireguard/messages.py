"""WireGuard wire formats: message types 1-4, sizes, mac offsets, TAI64N timestamps."""

from __future__ import annotations

import struct
from dataclasses import dataclass

MESSAGE_INITIATION = 1
MESSAGE_RESPONSE = 2
MESSAGE_COOKIE_REPLY = 3
MESSAGE_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + 16  # header + Poly1305 tag (a keepalive)

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# Offsets of mac1 and mac2 (each 16 bytes) at the end of the two handshake messages.
INITIATION_MAC1 = INITIATION_SIZE - 32
RESPONSE_MAC1 = RESPONSE_SIZE - 32

# type (u8) + 3 reserved zero bytes read as one little-endian u32, then the indices / counter.
TRANSPORT_HEADER = struct.Struct("<IIQ")  # type, receiver index, counter
INITIATION_HEADER = struct.Struct("<II")  # type, sender index
RESPONSE_HEADER = struct.Struct("<III")  # type, sender index, receiver index
COOKIE_REPLY_HEADER = struct.Struct("<II")  # type, receiver index
INDEX_AND_COUNTER = struct.Struct("<IQ")

_TAI64N = struct.Struct(">QI")
_TAI64_BASE = 0x400000000000000A  # 2^62 + the 10 s TAI-UTC offset used by WireGuard


def tai64n(unix_time: float) -> bytes:
    """12-byte TAI64N label for a Unix time (big-endian, so later times compare greater as bytes)."""
    seconds = int(unix_time)
    nanos = min(int((unix_time - seconds) * 1e9), 999_999_999)
    return _TAI64N.pack(_TAI64_BASE + seconds, nanos)


def tai64n_from_ns(unix_ns: int) -> bytes:
    seconds, nanos = divmod(unix_ns, 1_000_000_000)
    return _TAI64N.pack(_TAI64_BASE + seconds, nanos)


@dataclass(frozen=True, slots=True)
class Initiation:
    sender_index: int
    ephemeral: bytes
    encrypted_static: bytes
    encrypted_timestamp: bytes
    mac1: bytes
    mac2: bytes

    @classmethod
    def parse(cls, data: bytes) -> Initiation:
        if len(data) != INITIATION_SIZE or data[:4] != b"\x01\x00\x00\x00":
            raise ValueError("not a handshake initiation")
        (sender,) = struct.unpack_from("<I", data, 4)
        return cls(sender, data[8:40], data[40:88], data[88:116], data[116:132], data[132:148])


@dataclass(frozen=True, slots=True)
class Response:
    sender_index: int
    receiver_index: int
    ephemeral: bytes
    encrypted_nothing: bytes
    mac1: bytes
    mac2: bytes

    @classmethod
    def parse(cls, data: bytes) -> Response:
        if len(data) != RESPONSE_SIZE or data[:4] != b"\x02\x00\x00\x00":
            raise ValueError("not a handshake response")
        sender, receiver = struct.unpack_from("<II", data, 4)
        return cls(sender, receiver, data[12:44], data[44:60], data[60:76], data[76:92])


@dataclass(frozen=True, slots=True)
class CookieReply:
    receiver_index: int
    nonce: bytes
    encrypted_cookie: bytes

    @classmethod
    def parse(cls, data: bytes) -> CookieReply:
        if len(data) != COOKIE_REPLY_SIZE or data[:4] != b"\x03\x00\x00\x00":
            raise ValueError("not a cookie reply")
        (receiver,) = struct.unpack_from("<I", data, 4)
        return cls(receiver, data[8:32], data[32:64])

    def __bytes__(self) -> bytes:
        return (
            COOKIE_REPLY_HEADER.pack(MESSAGE_COOKIE_REPLY, self.receiver_index)
            + self.nonce
            + self.encrypted_cookie
        )
