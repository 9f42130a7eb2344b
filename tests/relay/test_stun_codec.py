"""STUN codec against the RFC 5769 test vectors, plus garbage that must be refused cleanly."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiremesh.core import stun
from wiremesh.core.stun import AttributeType, Message, MessageClass, Method, StunError

# RFC 5769 section 2.1: sample request (short-term credentials, password below).
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "802200105354554e207465737420636c69656e74"
    "002400046e0001ff"
    "80290008932ff9b151263b36"
    "000600096576746a3a683676592020200"
    "0080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004e57a3bcf"
)
RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"

# RFC 5769 section 2.2: sample IPv4 response, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000080001a147e112a643"
    "000800142b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    "80280004c07d4c96"
)

# RFC 5769 section 2.3: sample IPv6 response, 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b7465737420766563746f7220"
    "002000140002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004c8fb0b4c"
)
RFC5769_TRANSACTION_ID = bytes.fromhex("b7e7a701bc34d686fa87dfae")


def test_rfc5769_request_parses_with_its_attributes() -> None:
    message = stun.parse_message(RFC5769_REQUEST)
    assert (message.method, message.message_class) == (Method.BINDING, MessageClass.REQUEST)
    assert message.get(AttributeType.SOFTWARE) == "STUN test client"
    assert message.get(AttributeType.PRIORITY) == 0x6E0001FF
    assert message.get(AttributeType.ICE_CONTROLLED) == 0x932FF9B151263B36
    assert message.get(AttributeType.USERNAME) == "evtj:h6vY"
    assert message.get(AttributeType.FINGERPRINT) == 0xE57A3BCF


def test_rfc5769_request_message_integrity_verifies_with_the_password() -> None:
    assert stun.verify_integrity(RFC5769_REQUEST, RFC5769_PASSWORD)
    assert not stun.verify_integrity(RFC5769_REQUEST, b"wrong password")


def test_rfc5769_ipv4_response_gives_the_mapped_address() -> None:
    message = stun.parse_message(RFC5769_IPV4_RESPONSE)
    assert message.message_class == MessageClass.SUCCESS
    assert message.transaction_id == RFC5769_TRANSACTION_ID
    assert message.get(AttributeType.XOR_MAPPED_ADDRESS) == ("192.0.2.1", 32853)
    assert message.get(AttributeType.SOFTWARE) == "test vector"
    assert stun.verify_integrity(RFC5769_IPV4_RESPONSE, RFC5769_PASSWORD)


def test_rfc5769_ipv6_response_gives_the_mapped_address() -> None:
    message = stun.parse_message(RFC5769_IPV6_RESPONSE)
    assert message.get(AttributeType.XOR_MAPPED_ADDRESS) == ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert stun.verify_integrity(RFC5769_IPV6_RESPONSE, RFC5769_PASSWORD)


def test_reencoding_the_ipv4_vector_reproduces_address_bytes_and_a_valid_fingerprint() -> None:
    message = stun.parse_message(RFC5769_IPV4_RESPONSE)
    again = stun.encode_message(message, integrity_key=RFC5769_PASSWORD)
    # Padding bytes differ (the RFC pads SOFTWARE with a space), so compare the parsed form.
    assert b"\x00\x20\x00\x08\x00\x01\xa1\x47\xe1\x12\xa6\x43" in again
    computed = {AttributeType.MESSAGE_INTEGRITY, AttributeType.FINGERPRINT}
    reparsed = stun.parse_message(again)
    assert [a for a in reparsed.attributes if a.type not in computed] == [
        a for a in message.attributes if a.type not in computed
    ]
    assert stun.verify_integrity(again, RFC5769_PASSWORD)


def test_message_type_bits_interleave_class_into_method() -> None:
    assert bytes(Message(Method.BINDING, MessageClass.REQUEST, bytes(12)))[:2] == b"\x00\x01"
    assert bytes(Message(Method.BINDING, MessageClass.INDICATION, bytes(12)))[:2] == b"\x00\x11"
    assert bytes(Message(Method.BINDING, MessageClass.SUCCESS, bytes(12)))[:2] == b"\x01\x01"
    assert bytes(Message(Method.BINDING, MessageClass.ERROR, bytes(12)))[:2] == b"\x01\x11"


def test_binding_request_round_trips_with_fingerprint() -> None:
    request = stun.binding_request(software="wiremesh")
    data = bytes(request)
    assert stun.is_stun(data)
    parsed = stun.parse_message(data)
    assert parsed.transaction_id == request.transaction_id
    assert parsed.get(AttributeType.SOFTWARE) == "wiremesh"
    assert parsed.get(AttributeType.FINGERPRINT) == stun.fingerprint(data[:-8])


def test_error_code_round_trips() -> None:
    message = Message(
        Method.BINDING,
        MessageClass.ERROR,
        bytes(range(12)),
        (stun.Attribute(AttributeType.ERROR_CODE, stun.ErrorCode(420, "Unknown Attribute")),),
    )
    assert stun.parse_message(bytes(message)).get(AttributeType.ERROR_CODE) == stun.ErrorCode(
        420, "Unknown Attribute"
    )


@pytest.mark.parametrize("host", ["203.0.113.7", "2001:db8::1", "::1"])
def test_xor_and_plain_mapped_address_round_trip(host: str) -> None:
    tid = os.urandom(12)
    message = Message(
        Method.BINDING,
        MessageClass.SUCCESS,
        tid,
        (
            stun.Attribute(AttributeType.XOR_MAPPED_ADDRESS, (host, 54321)),
            stun.Attribute(AttributeType.MAPPED_ADDRESS, (host, 54321)),
        ),
    )
    parsed = stun.parse_message(bytes(message))
    assert parsed.get(AttributeType.XOR_MAPPED_ADDRESS) == (host, 54321)
    assert parsed.get(AttributeType.MAPPED_ADDRESS) == (host, 54321)


def test_corrupted_fingerprint_is_refused() -> None:
    data = bytearray(RFC5769_IPV4_RESPONSE)
    data[-1] ^= 0xFF
    with pytest.raises(StunError, match="FINGERPRINT mismatch"):
        stun.parse_message(bytes(data))


def test_truncated_message_is_refused() -> None:
    with pytest.raises(StunError, match="length field"):
        stun.parse_message(RFC5769_IPV4_RESPONSE[:-4])


def test_attribute_running_past_the_end_is_refused() -> None:
    data = bytearray(bytes(stun.binding_request(with_fingerprint=False, software="abcd")))
    struct.pack_into("!H", data, 22, 200)
    with pytest.raises(StunError, match="runs past the end"):
        stun.parse_message(bytes(data))


def test_missing_magic_cookie_is_refused_unless_classic_allowed() -> None:
    data = b"\x00\x01\x00\x00" + os.urandom(16)
    with pytest.raises(StunError, match="magic cookie"):
        stun.parse_message(data)
    assert stun.parse_message(data, allow_classic=True).classic


def test_unknown_address_family_is_refused() -> None:
    bad = (
        b"\x01\x01\x00\x0c"
        + stun.MAGIC_COOKIE_BYTES
        + bytes(12)
        + b"\x00\x20\x00\x08\x00\x07\x00\x01"
        + bytes(4)
    )
    with pytest.raises(StunError, match="address family"):
        stun.parse_message(bad)


def test_is_stun_tells_stun_from_wireguard_and_disco() -> None:
    assert stun.is_stun(RFC5769_REQUEST)
    assert not stun.is_stun(b"\x01\x00\x00\x00" + bytes(144))  # WireGuard handshake initiation
    assert not stun.is_stun(b"TS\xf0\x9f\x92\xac" + bytes(60))  # a disco-like magic
    assert not stun.is_stun(RFC5769_REQUEST[:19])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_either_parse_or_raise_stun_error(data: bytes) -> None:
    with contextlib.suppress(StunError):
        stun.parse_message(data, allow_classic=True)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=20, max_value=len(RFC5769_REQUEST) - 1), st.integers(0, 255))
def test_mutated_vector_either_parses_or_raises_stun_error(position: int, byte: int) -> None:
    data = bytearray(RFC5769_REQUEST)
    data[position] = byte
    with contextlib.suppress(StunError):
        stun.parse_message(bytes(data))


def test_server_answers_binding_request_with_xor_mapped_address() -> None:
    request = stun.binding_request()
    result = stun.answer(bytes(request), ("198.51.100.9", 40000))
    assert result.reply is not None
    reply = stun.parse_message(result.reply)
    assert reply.message_class == MessageClass.SUCCESS
    assert reply.transaction_id == request.transaction_id
    assert reply.get(AttributeType.XOR_MAPPED_ADDRESS) == ("198.51.100.9", 40000)
    assert reply.get(AttributeType.MAPPED_ADDRESS) == ("198.51.100.9", 40000)


def test_server_reports_ipv4_mapped_ipv6_source_as_ipv4() -> None:
    result = stun.answer(bytes(stun.binding_request()), ("::ffff:198.51.100.9", 1234))
    assert result.reply is not None
    assert stun.mapped_address(stun.parse_message(result.reply)) == ("198.51.100.9", 1234)


def test_server_answers_classic_rfc3489_request_with_mapped_address() -> None:
    tid = os.urandom(16)
    result = stun.answer(b"\x00\x01\x00\x00" + tid, ("198.51.100.9", 1234))
    assert result.reply is not None
    reply = stun.parse_message(result.reply, allow_classic=True)
    assert reply.transaction_id == tid
    assert reply.get(AttributeType.MAPPED_ADDRESS) == ("198.51.100.9", 1234)


def test_server_rejects_unknown_comprehension_required_attribute_with_420() -> None:
    request = Message(Method.BINDING, MessageClass.REQUEST, os.urandom(12), (stun.Attribute(0x0777, b"x"),))
    result = stun.answer(bytes(request), ("198.51.100.9", 1234))
    assert result.reply is not None
    reply = stun.parse_message(result.reply)
    assert reply.message_class == MessageClass.ERROR
    assert reply.get(AttributeType.ERROR_CODE).code == 420
    assert reply.get(AttributeType.UNKNOWN_ATTRIBUTES) == (0x0777,)


def test_server_drops_garbage_with_a_reason() -> None:
    result = stun.answer(b"\xff" * 30, ("198.51.100.9", 1234))
    assert result.reply is None
    assert result.drop_reason == "malformed"


def test_server_drops_responses_it_receives() -> None:
    result = stun.answer(RFC5769_IPV4_RESPONSE, ("198.51.100.9", 1234))
    assert (result.reply, result.drop_reason) == (None, "not_request")
