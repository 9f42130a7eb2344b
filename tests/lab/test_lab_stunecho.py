"""The lab's STUN responder (plumbing for miniupnpd): correct answers, garbage dropped."""

from __future__ import annotations

import os
import struct

from wiremesh.lab.stunecho import MAGIC_COOKIE, binding_response, change_request


def request(txid: bytes, attrs: bytes = b"", cookie: int = MAGIC_COOKIE) -> bytes:
    return struct.pack("!HHI12s", 0x0001, len(attrs), cookie, txid) + attrs


def attributes(response: bytes) -> dict[int, bytes]:
    out, pos = {}, 20
    while pos + 4 <= len(response):
        kind, length = struct.unpack_from("!HH", response, pos)
        out[kind] = response[pos + 4 : pos + 4 + length]
        pos += 4 + length
    return out


def test_response_echoes_transaction_id_and_is_a_binding_success() -> None:
    txid = os.urandom(12)
    response = binding_response(request(txid), ("198.18.1.2", 40000))
    assert response is not None
    msg_type, length, cookie, got_txid = struct.unpack_from("!HHI12s", response)
    assert (msg_type, cookie, got_txid, length) == (0x0101, MAGIC_COOKIE, txid, len(response) - 20)


def test_response_carries_the_source_in_mapped_and_xor_mapped_address() -> None:
    response = binding_response(request(os.urandom(12)), ("198.18.1.2", 40000))
    assert response is not None
    attrs = attributes(response)
    assert attrs[0x0001] == struct.pack("!BBH4B", 0, 1, 40000, 198, 18, 1, 2)
    _, family, xport, xaddr = struct.unpack("!BBHI", attrs[0x0020])
    assert (family, xport ^ 0x2112, xaddr ^ MAGIC_COOKIE) == (1, 40000, 0xC6120102)


def test_change_request_is_answered_from_the_same_place() -> None:
    change_ip_and_port = struct.pack("!HHI", 0x0003, 4, 0x6)
    assert binding_response(request(os.urandom(12), change_ip_and_port), ("198.18.1.2", 1)) is not None


def test_garbage_and_truncated_and_oversized_input_is_dropped() -> None:
    assert binding_response(b"", ("198.18.1.2", 1)) is None
    assert binding_response(request(os.urandom(12))[:19], ("198.18.1.2", 1)) is None
    assert binding_response(b"\x01\x01" + request(os.urandom(12))[2:], ("198.18.1.2", 1)) is None
    assert binding_response(request(os.urandom(12), b"\0" * 4096), ("198.18.1.2", 1)) is None
    bad_length = bytearray(request(os.urandom(12)))
    bad_length[3] = 8
    assert binding_response(bytes(bad_length), ("198.18.1.2", 1)) is None


def test_change_request_flags_are_parsed() -> None:
    for flags, expected in [(0, (False, False)), (2, (False, True)), (4, (True, False)), (6, (True, True))]:
        attr = struct.pack("!HHI", 0x0003, 4, flags)
        assert change_request(request(os.urandom(12), attr)) == expected


def test_change_request_after_another_attribute_is_found() -> None:
    software = struct.pack("!HH", 0x8022, 3) + b"abc\0"
    attr = struct.pack("!HHI", 0x0003, 4, 4)
    assert change_request(request(os.urandom(12), software + attr)) == (True, False)


def test_truncated_change_request_is_ignored() -> None:
    attr = struct.pack("!HHI", 0x0003, 4, 6)[:6]
    assert change_request(request(os.urandom(12)) + attr) == (False, False)
