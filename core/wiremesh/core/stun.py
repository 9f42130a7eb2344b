"""STUN (RFC 8489) message codec and the Binding server's answer, sans-I/O.

The codec is table-driven: every attribute type we understand has one row in `_CODECS`
(decode and encode functions); anything else is kept as raw bytes so that a message can
still be inspected and re-encoded. `parse_message(data)` is pure and raises `StunError`
with a precise reason on malformed input; `bytes(message)` encodes.

Classic RFC 3489 messages (no magic cookie, 128-bit transaction id) are accepted only
when asked for (`allow_classic=True`), because old clients such as Debian's `stun` still
send them and a server should answer them with a plain MAPPED-ADDRESS.
"""

from __future__ import annotations

import binascii
import dataclasses
import hashlib
import hmac
import ipaddress
import os
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import Any

MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
FINGERPRINT_XOR = 0x5354554E
HEADER_LEN = 20
TRANSACTION_ID_LEN = 12
CLASSIC_TRANSACTION_ID_LEN = 16
MAX_MESSAGE_LEN = HEADER_LEN + 0xFFFF  # the length field is 16 bits
MAX_ATTRIBUTES = 64  # far more than any real message; bounds work on hostile input
INTEGRITY_LEN = 20  # HMAC-SHA1

IPv4Address = ipaddress.IPv4Address
IPv6Address = ipaddress.IPv6Address
Address = tuple[str, int]  # (host, port)


class StunError(ValueError):
    """A datagram that is not a well-formed STUN message."""


class Method(IntEnum):
    BINDING = 0x001


class MessageClass(IntEnum):
    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class AttributeType(IntEnum):
    MAPPED_ADDRESS = 0x0001
    CHANGE_REQUEST = 0x0003  # RFC 5780 / RFC 3489
    SOURCE_ADDRESS = 0x0004  # RFC 3489 (classic)
    CHANGED_ADDRESS = 0x0005  # RFC 3489 (classic)
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    REALM = 0x0014
    NONCE = 0x0015
    XOR_MAPPED_ADDRESS = 0x0020
    PRIORITY = 0x0024  # RFC 8445 (ICE)
    USE_CANDIDATE = 0x0025  # RFC 8445 (ICE)
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    RESPONSE_ORIGIN = 0x802B  # RFC 5780
    OTHER_ADDRESS = 0x802C  # RFC 5780


class AddressFamily(IntEnum):
    IPV4 = 0x01
    IPV6 = 0x02


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorCode:
    code: int  # 300..699
    reason: str


@dataclasses.dataclass(frozen=True, slots=True)
class Attribute:
    type: int  # an AttributeType, or a raw number for attributes we do not know
    value: Any  # decoded value (see _CODECS), or bytes for unknown types


@dataclasses.dataclass(frozen=True, slots=True)
class Message:
    method: int
    message_class: MessageClass
    transaction_id: bytes  # 12 bytes; 16 for a classic RFC 3489 message
    attributes: tuple[Attribute, ...] = ()

    @property
    def classic(self) -> bool:
        return len(self.transaction_id) == CLASSIC_TRANSACTION_ID_LEN

    def get(self, attr_type: int) -> Any:
        """The value of the first attribute of this type, or None."""
        for attr in self.attributes:
            if attr.type == attr_type:
                return attr.value
        return None

    def __bytes__(self) -> bytes:
        return encode_message(self)


# --- message type bits -------------------------------------------------------------------
# The 14-bit type interleaves the class bits C1 (bit 8) and C0 (bit 4) into the method.


def _pack_type(method: int, message_class: int) -> int:
    if not 0 <= method <= 0xFFF:
        raise StunError(f"method {method:#x} out of range")
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 0b01) << 4)
        | ((message_class & 0b10) << 7)
    )


def _unpack_type(message_type: int) -> tuple[int, MessageClass]:
    method = (message_type & 0x000F) | ((message_type & 0x00E0) >> 1) | ((message_type & 0x3E00) >> 2)
    message_class = ((message_type >> 4) & 0b01) | ((message_type >> 7) & 0b10)
    return method, MessageClass(message_class)


# --- attribute codecs --------------------------------------------------------------------


def _decode_address(value: bytes, transaction_id: bytes) -> Address:
    if len(value) < 4:
        raise StunError("address attribute shorter than 4 bytes")
    family, port = value[1], struct.unpack_from("!H", value, 2)[0]
    raw = value[4:]
    if family == AddressFamily.IPV4:
        if len(raw) != 4:
            raise StunError(f"IPv4 address attribute has {len(raw)} address bytes, want 4")
        return str(IPv4Address(raw)), port
    if family == AddressFamily.IPV6:
        if len(raw) != 16:
            raise StunError(f"IPv6 address attribute has {len(raw)} address bytes, want 16")
        return str(IPv6Address(raw)), port
    raise StunError(f"unknown address family {family:#x}")


def _encode_address(value: Address, transaction_id: bytes) -> bytes:
    host, port = value
    ip = ipaddress.ip_address(host)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    family = AddressFamily.IPV4 if ip.version == 4 else AddressFamily.IPV6
    return struct.pack("!BBH", 0, family, port) + ip.packed


def _xor_key(transaction_id: bytes) -> bytes:
    return MAGIC_COOKIE_BYTES + transaction_id


def _decode_xor_address(value: bytes, transaction_id: bytes) -> Address:
    if len(value) < 4:
        raise StunError("XOR address attribute shorter than 4 bytes")
    key = _xor_key(transaction_id)
    raw = value[4:]
    if len(raw) > len(key):
        raise StunError("XOR address attribute too long")
    port = bytes(a ^ b for a, b in zip(value[2:4], key[:2], strict=True))
    address = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    return _decode_address(value[:2] + port + address, transaction_id)


def _encode_xor_address(value: Address, transaction_id: bytes) -> bytes:
    plain = _encode_address(value, transaction_id)
    key = _xor_key(transaction_id)
    return plain[:2] + bytes(a ^ b for a, b in zip(plain[2:], key[:2] + key, strict=False))


def _decode_text(value: bytes, transaction_id: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StunError(f"text attribute is not UTF-8: {exc}") from exc


def _encode_text(value: str, transaction_id: bytes) -> bytes:
    return value.encode("utf-8")


def _decode_u32(value: bytes, transaction_id: bytes) -> int:
    if len(value) != 4:
        raise StunError(f"32-bit attribute has length {len(value)}")
    return int(struct.unpack("!I", value)[0])


def _encode_u32(value: int, transaction_id: bytes) -> bytes:
    return struct.pack("!I", value)


def _decode_u64(value: bytes, transaction_id: bytes) -> int:
    if len(value) != 8:
        raise StunError(f"64-bit attribute has length {len(value)}")
    return int(struct.unpack("!Q", value)[0])


def _encode_u64(value: int, transaction_id: bytes) -> bytes:
    return struct.pack("!Q", value)


def _decode_error_code(value: bytes, transaction_id: bytes) -> ErrorCode:
    if len(value) < 4:
        raise StunError("ERROR-CODE shorter than 4 bytes")
    code = (value[2] & 0x07) * 100 + value[3]
    if not 300 <= code <= 699 or value[3] > 99:
        raise StunError(f"ERROR-CODE {code} out of range")
    return ErrorCode(code, _decode_text(value[4:], transaction_id))


def _encode_error_code(value: ErrorCode, transaction_id: bytes) -> bytes:
    return struct.pack("!HBB", 0, value.code // 100, value.code % 100) + value.reason.encode("utf-8")


def _decode_unknown_attributes(value: bytes, transaction_id: bytes) -> tuple[int, ...]:
    if len(value) % 2:
        raise StunError("UNKNOWN-ATTRIBUTES has an odd length")
    return tuple(struct.unpack(f"!{len(value) // 2}H", value))


def _encode_unknown_attributes(value: tuple[int, ...], transaction_id: bytes) -> bytes:
    return struct.pack(f"!{len(value)}H", *value)


def _decode_raw(value: bytes, transaction_id: bytes) -> bytes:
    return bytes(value)


def _encode_raw(value: bytes, transaction_id: bytes) -> bytes:
    return bytes(value)


def _decode_empty(value: bytes, transaction_id: bytes) -> None:
    if value:
        raise StunError("flag attribute carries a value")
    return None


def _encode_empty(value: None, transaction_id: bytes) -> bytes:
    return b""


_Decoder = Callable[[bytes, bytes], Any]
_Encoder = Callable[[Any, bytes], bytes]

_CODECS: dict[int, tuple[_Decoder, _Encoder]] = {
    AttributeType.MAPPED_ADDRESS: (_decode_address, _encode_address),
    AttributeType.CHANGE_REQUEST: (_decode_u32, _encode_u32),
    AttributeType.SOURCE_ADDRESS: (_decode_address, _encode_address),
    AttributeType.CHANGED_ADDRESS: (_decode_address, _encode_address),
    AttributeType.USERNAME: (_decode_text, _encode_text),
    AttributeType.MESSAGE_INTEGRITY: (_decode_raw, _encode_raw),
    AttributeType.ERROR_CODE: (_decode_error_code, _encode_error_code),
    AttributeType.UNKNOWN_ATTRIBUTES: (_decode_unknown_attributes, _encode_unknown_attributes),
    AttributeType.REALM: (_decode_text, _encode_text),
    AttributeType.NONCE: (_decode_text, _encode_text),
    AttributeType.XOR_MAPPED_ADDRESS: (_decode_xor_address, _encode_xor_address),
    AttributeType.PRIORITY: (_decode_u32, _encode_u32),
    AttributeType.USE_CANDIDATE: (_decode_empty, _encode_empty),
    AttributeType.SOFTWARE: (_decode_text, _encode_text),
    AttributeType.ALTERNATE_SERVER: (_decode_address, _encode_address),
    AttributeType.FINGERPRINT: (_decode_u32, _encode_u32),
    AttributeType.ICE_CONTROLLED: (_decode_u64, _encode_u64),
    AttributeType.ICE_CONTROLLING: (_decode_u64, _encode_u64),
    AttributeType.RESPONSE_ORIGIN: (_decode_address, _encode_address),
    AttributeType.OTHER_ADDRESS: (_decode_address, _encode_address),
}


def _attribute_type(number: int) -> int:
    try:
        return AttributeType(number)
    except ValueError:
        return number


def comprehension_required(attr_type: int) -> bool:
    """Types 0x0000-0x7FFF must be understood; an unknown one makes a request fail with 420."""
    return attr_type < 0x8000


def fingerprint(data: bytes) -> int:
    """FINGERPRINT value over `data` (the message up to, not including, the attribute)."""
    return (binascii.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


# --- parse -------------------------------------------------------------------------------


def is_stun(data: bytes) -> bool:
    """Demultiplexing check for one UDP socket: top two bits zero and the magic cookie."""
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and data[4:8] == MAGIC_COOKIE_BYTES


def parse_message(data: bytes, *, allow_classic: bool = False) -> Message:
    """Parse one STUN message; raises StunError saying what is wrong.

    FINGERPRINT, when present, is verified. MESSAGE-INTEGRITY is returned as raw bytes;
    check it with `verify_integrity`. Attributes after MESSAGE-INTEGRITY other than
    FINGERPRINT are ignored, as RFC 8489 section 14.5 says.
    """
    if len(data) < HEADER_LEN:
        raise StunError(f"message is {len(data)} bytes, shorter than the 20-byte header")
    if len(data) > MAX_MESSAGE_LEN:
        raise StunError(f"message is {len(data)} bytes, longer than any STUN message")
    message_type, length = struct.unpack_from("!HH", data, 0)
    if message_type & 0xC000:
        raise StunError("first two bits are not zero")
    if length % 4:
        raise StunError(f"length {length} is not a multiple of 4")
    if HEADER_LEN + length != len(data):
        raise StunError(f"length field says {length} attribute bytes, datagram has {len(data) - HEADER_LEN}")
    if data[4:8] == MAGIC_COOKIE_BYTES:
        transaction_id = bytes(data[8:20])
    elif allow_classic:
        transaction_id = bytes(data[4:20])
    else:
        raise StunError("magic cookie missing")
    method, message_class = _unpack_type(message_type)
    attributes: list[Attribute] = []
    offset = HEADER_LEN
    after_integrity = False
    while offset < len(data):
        if len(attributes) >= MAX_ATTRIBUTES:
            raise StunError(f"more than {MAX_ATTRIBUTES} attributes")
        if offset + 4 > len(data):
            raise StunError("truncated attribute header")
        number, attr_len = struct.unpack_from("!HH", data, offset)
        start = offset + 4
        end = start + attr_len
        if end > len(data):
            raise StunError(f"attribute {number:#06x} runs past the end of the message")
        value = data[start:end]
        offset = start + ((attr_len + 3) & ~3)
        if number == AttributeType.FINGERPRINT:
            expected = fingerprint(data[: start - 4])
            got = _decode_u32(value, transaction_id)
            if got != expected:
                raise StunError(f"FINGERPRINT mismatch (got {got:#010x}, want {expected:#010x})")
            if offset != len(data):
                raise StunError("FINGERPRINT is not the last attribute")
            attributes.append(Attribute(AttributeType.FINGERPRINT, got))
            break
        if after_integrity:
            continue
        if number == AttributeType.MESSAGE_INTEGRITY and attr_len != INTEGRITY_LEN:
            raise StunError(f"MESSAGE-INTEGRITY has length {attr_len}, want {INTEGRITY_LEN}")
        attr_type = _attribute_type(number)
        codec = _CODECS.get(attr_type)
        decoded = codec[0](bytes(value), transaction_id) if codec else bytes(value)
        attributes.append(Attribute(attr_type, decoded))
        after_integrity = number == AttributeType.MESSAGE_INTEGRITY
    return Message(method, message_class, transaction_id, tuple(attributes))


def verify_integrity(data: bytes, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY (HMAC-SHA1) of a raw message against `key`.

    For short-term credentials the key is the password; for long-term credentials it is
    MD5(username ":" realm ":" password). Compared in constant time.
    """
    message = parse_message(data, allow_classic=False)
    offset = HEADER_LEN
    while offset + 4 <= len(data):
        number, attr_len = struct.unpack_from("!HH", data, offset)
        if number == AttributeType.MESSAGE_INTEGRITY:
            # The length field covers everything up to and including MESSAGE-INTEGRITY.
            covered_len = offset + 4 + INTEGRITY_LEN - HEADER_LEN
            head = data[:2] + struct.pack("!H", covered_len) + data[4:offset]
            mac = hmac.new(key, head, hashlib.sha1).digest()
            return hmac.compare_digest(mac, data[offset + 4 : offset + 4 + INTEGRITY_LEN])
        offset += 4 + ((attr_len + 3) & ~3)
    del message
    return False


# --- encode ------------------------------------------------------------------------------


def encode_message(message: Message, *, integrity_key: bytes | None = None) -> bytes:
    """Encode `message`. FINGERPRINT and MESSAGE-INTEGRITY values are computed here, at
    the position they occupy in `message.attributes` (their given values are ignored)."""
    tid = message.transaction_id
    if len(tid) == TRANSACTION_ID_LEN:
        head_id = MAGIC_COOKIE_BYTES + tid
    elif len(tid) == CLASSIC_TRANSACTION_ID_LEN:
        head_id = tid
    else:
        raise StunError(f"transaction id is {len(tid)} bytes, want 12 (or 16 for RFC 3489)")
    message_type = _pack_type(message.method, message.message_class)
    body = bytearray()
    for attr in message.attributes:
        if attr.type == AttributeType.FINGERPRINT:
            head = struct.pack("!HH", message_type, len(body) + 8) + head_id
            value = struct.pack("!I", fingerprint(head + bytes(body)))
        elif attr.type == AttributeType.MESSAGE_INTEGRITY:
            if integrity_key is None:
                raise StunError("MESSAGE-INTEGRITY requested without a key")
            head = struct.pack("!HH", message_type, len(body) + 4 + INTEGRITY_LEN) + head_id
            value = hmac.new(integrity_key, head + bytes(body), hashlib.sha1).digest()
        else:
            codec = _CODECS.get(attr.type)
            value = codec[1](attr.value, tid) if codec else bytes(attr.value)
        if len(value) > 0xFFFF:
            raise StunError(f"attribute {attr.type:#06x} value too long")
        body += struct.pack("!HH", attr.type, len(value)) + value
        body += b"\x00" * (-len(value) % 4)
    if len(body) > 0xFFFF:
        raise StunError("message too long")
    return struct.pack("!HH", message_type, len(body)) + head_id + bytes(body)


# --- convenience constructors ---------------------------------------------------------------


def new_transaction_id() -> bytes:
    return os.urandom(TRANSACTION_ID_LEN)


def binding_request(
    transaction_id: bytes | None = None, *, software: str | None = None, with_fingerprint: bool = True
) -> Message:
    attrs: list[Attribute] = []
    if software:
        attrs.append(Attribute(AttributeType.SOFTWARE, software))
    if with_fingerprint:
        attrs.append(Attribute(AttributeType.FINGERPRINT, 0))
    return Message(Method.BINDING, MessageClass.REQUEST, transaction_id or new_transaction_id(), tuple(attrs))


def mapped_address(message: Message) -> Address | None:
    """The reflexive address a response carries: XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS."""
    value = message.get(AttributeType.XOR_MAPPED_ADDRESS)
    if value is None:
        value = message.get(AttributeType.MAPPED_ADDRESS)
    return value


# --- the server side ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ServerResult:
    """What a Binding server does with one datagram: send `reply`, or drop with a reason."""

    reply: bytes | None
    drop_reason: str | None = None  # "malformed" | "not_request" | ...
    error: str = ""


def answer(data: bytes, source: Address, *, software: str = "wiremesh-stun") -> ServerResult:
    """Answer one datagram received from `source` (host, port) as a Binding server.

    Success responses carry XOR-MAPPED-ADDRESS (plus MAPPED-ADDRESS for pre-RFC 5389
    clients that do not understand it), SOFTWARE and FINGERPRINT. Classic RFC 3489
    requests get MAPPED-ADDRESS (and SOURCE-ADDRESS) only, which is all they can read.
    """
    try:
        request = parse_message(data, allow_classic=True)
    except StunError as exc:
        return ServerResult(None, "malformed", str(exc))
    if request.message_class != MessageClass.REQUEST:
        return ServerResult(None, "not_request")
    tid = request.transaction_id
    unknown = tuple(
        a.type
        for a in request.attributes
        if comprehension_required(a.type) and not isinstance(a.type, AttributeType)
    )
    if request.get(AttributeType.CHANGE_REQUEST):
        # One address and port only: we cannot answer from elsewhere, and saying so (RFC 5780
        # section 7.2) keeps NAT-behaviour probes from drawing the wrong conclusion.
        unknown += (AttributeType.CHANGE_REQUEST,)
    if request.method != Method.BINDING or unknown:
        code = ErrorCode(420, "Unknown Attribute") if unknown else ErrorCode(400, "Bad Request")
        attrs = [Attribute(AttributeType.ERROR_CODE, code)]
        if unknown:
            attrs.append(Attribute(AttributeType.UNKNOWN_ATTRIBUTES, unknown))
        padded = software + " " * (-len(software.encode()) % 4) if request.classic else software
        attrs.append(Attribute(AttributeType.SOFTWARE, padded))
        if not request.classic:
            attrs.append(Attribute(AttributeType.FINGERPRINT, 0))
        reply = Message(request.method, MessageClass.ERROR, tid, tuple(attrs))
        return ServerResult(encode_message(reply))
    host, port = source[0], source[1]
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    address = (str(ip), port)
    if request.classic:
        # RFC 3489's SERVER attribute had to be a multiple of 4 bytes long; old parsers check.
        padded = software + " " * (-len(software.encode()) % 4)
        attrs = [
            Attribute(AttributeType.MAPPED_ADDRESS, address),
            Attribute(AttributeType.SOFTWARE, padded),
        ]
    else:
        attrs = [
            Attribute(AttributeType.XOR_MAPPED_ADDRESS, address),
            Attribute(AttributeType.MAPPED_ADDRESS, address),
            Attribute(AttributeType.SOFTWARE, software),
            Attribute(AttributeType.FINGERPRINT, 0),
        ]
    reply = Message(Method.BINDING, MessageClass.SUCCESS, tid, tuple(attrs))
    return ServerResult(encode_message(reply))
