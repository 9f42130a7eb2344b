"""Software TSO: a TUN super-packet becomes MSS-sized segments with valid checksums (agent.gso)."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wiremesh.core import gro, gso

SRC4, DST4 = ipaddress.IPv4Address("10.99.0.1").packed, ipaddress.IPv4Address("10.99.0.2").packed
SRC6, DST6 = ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed
TS = b"\x01\x01\x08\x0a" + bytes(range(8))


def ref_sum(data: bytes) -> int:
    """Textbook RFC 1071 sum, word by word: the reference the fast paths must match."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_checksum_ok(packet: bytes) -> bool:
    if packet[0] >> 4 == 4:
        t = (packet[0] & 15) * 4
        pseudo = SRC4 + DST4 + struct.pack("!BBH", 0, 6, len(packet) - t)
    else:
        t = 40
        pseudo = packet[8:40] + struct.pack("!IxxxB", len(packet) - 40, 6)
    return ref_sum(pseudo + packet[t:]) == 0xFFFF


def super4(payload: bytes, flags: int = 0x18, seq: int = 1000, ident: int = 7) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 99, 8 << 4, flags, 500, 0xABCD, 0) + TS
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), ident, 0x4000, 64, 6, 0, SRC4, DST4
        )
    )
    ip[10:12] = struct.pack("!H", gro.ipv4_header_checksum(ip))
    return bytes(ip) + tcp + payload


def super6(payload: bytes, flags: int = 0x10, seq: int = 5) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 5201, 40000, seq, 99, 8 << 4, flags, 500, 0xABCD, 0) + TS
    return struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, SRC6, DST6) + tcp + payload


@pytest.mark.parametrize("length", [0, 1, 2, 3, 63, 64, 65, 1367, 1368, 4001])
def test_ones_sum_matches_rfc1071(length: int) -> None:
    data = os.urandom(length)
    assert gso.ones_sum(data) % 0xFFFF == ref_sum(data) % 0xFFFF


def test_segment_sums_match_per_segment_reference() -> None:
    payload = os.urandom(1368 * 5 + 10)
    assert [s % 0xFFFF for s in gso.segment_sums(payload, 1368, 5)] == [
        ref_sum(payload[k * 1368 : (k + 1) * 1368]) % 0xFFFF for k in range(5)
    ]


def test_ipv4_super_packet_splits_into_valid_segments() -> None:
    payload = os.urandom(1368 * 3 + 500)
    segments = gso.segment_tcp(super4(payload), 1368)
    assert [len(s) - 52 for s in segments] == [1368, 1368, 1368, 500]
    for k, s in enumerate(segments):
        assert struct.unpack("!H", s[2:4])[0] == len(s)
        assert ref_sum(s[:20]) == 0xFFFF, "IPv4 header checksum"
        assert struct.unpack("!H", s[4:6])[0] == 7 + k, "IP ID increments per segment"
        assert struct.unpack("!I", s[24:28])[0] == 1000 + k * 1368
        assert tcp_checksum_ok(s), f"TCP checksum of segment {k}"
    assert b"".join(s[52:] for s in segments) == payload
    assert [s[33] for s in segments] == [0x10, 0x10, 0x10, 0x18], "PSH only on the last segment"


def test_ipv6_super_packet_splits_into_valid_segments() -> None:
    payload = os.urandom(1000 * 4)
    segments = gso.segment_tcp(super6(payload), 1000)
    assert len(segments) == 4
    for s in segments:
        assert struct.unpack("!H", s[4:6])[0] == len(s) - 40
        assert tcp_checksum_ok(s)
    assert b"".join(s[72:] for s in segments) == payload


def test_segments_regroup_into_the_original_stream() -> None:
    payload = os.urandom(1368 * 6)
    merged = gro.coalesce(gso.segment_tcp(super4(payload, flags=0x10), 1368))
    assert len(merged) == 1 and merged[0][10 + 52 :] == payload


def test_from_tun_completes_a_partial_checksum_on_a_single_packet() -> None:
    packet = bytearray(super4(b"hello world"))
    pseudo = ref_sum(SRC4 + DST4 + struct.pack("!BBH", 0, 6, len(packet) - 20))
    packet[36:38] = struct.pack("!H", pseudo)  # what the kernel leaves for CHECKSUM_PARTIAL
    header = struct.pack("=BBHHHH", gro.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 20, 16)
    (out,) = gso.from_tun(header + bytes(packet))
    assert tcp_checksum_ok(out)


def test_from_tun_segments_a_tso_read() -> None:
    payload = os.urandom(3000)
    header = struct.pack("=BBHHHH", 1, gro.VIRTIO_NET_HDR_GSO_TCPV4, 52, 1400, 20, 16)
    out = gso.from_tun(header + super4(payload))
    assert [len(s) - 52 for s in out] == [1400, 1400, 200]
    assert all(tcp_checksum_ok(s) for s in out)


def test_from_tun_passes_a_plain_packet_unchanged() -> None:
    packet = super4(b"x")
    assert gso.from_tun(bytes(10) + packet) == [packet]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01" * 9,
        struct.pack("=BBHHHH", 1, 1, 0, 0, 0, 0) + b"x" * 60,
        struct.pack("=BBHHHH", 0, 3, 0, 1000, 0, 0) + b"x" * 60,
    ],
)
def test_malformed_reads_raise_segmentation_error(raw: bytes) -> None:
    with pytest.raises(gso.SegmentationError):
        gso.from_tun(raw)


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=2000))
def test_random_super_packets_raise_only_segmentation_error(body: bytes, mss: int) -> None:
    with contextlib.suppress(gso.SegmentationError):
        gso.segment_tcp(body, mss)


def test_ipv4_options_longer_than_the_packet_are_refused() -> None:
    packet = bytearray(super4(b"x" * 10))
    packet[0] = 0x4F  # IHL 15: 60 bytes of IPv4 header claimed
    with pytest.raises(gso.SegmentationError):
        gso.segment_tcp(bytes(packet[:62]), 1000)
