"""Software GRO: runs of TCP segments become one virtio_net_hdr GSO write (wiremesh.core.gro)."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given
from hypothesis import strategies as st

from wiremesh.core import gro

SRC4, DST4 = ipaddress.IPv4Address("10.99.0.1").packed, ipaddress.IPv4Address("10.99.0.2").packed
SRC6, DST6 = ipaddress.IPv6Address("fd00::1").packed, ipaddress.IPv6Address("fd00::2").packed
TS_OPTION = b"\x01\x01\x08\x0a" + bytes(range(8))


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def tcp_header(seq: int, flags: int, sport: int = 5201, ack: int = 777) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, 40000, seq, ack, 8 << 4, flags, 500, 0, 0) + TS_OPTION


def seg4(seq: int, payload: bytes, flags: int = 0x10, sport: int = 5201, proto: int = 6) -> bytes:
    tcp = tcp_header(seq, flags, sport)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 1, 0x4000, 64, proto, 0, SRC4, DST4
        )
    )
    ip[10:12] = struct.pack("!H", gro.ipv4_header_checksum(ip))
    return bytes(ip) + tcp + payload


def seg6(seq: int, payload: bytes, flags: int = 0x10) -> bytes:
    tcp = tcp_header(seq, flags)
    ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64, SRC6, DST6)
    return ip + tcp + payload


def vnet(packet: bytes) -> tuple[int, int, int, int, int, int]:
    return struct.unpack("=BBHHHH", packet[:10])


def run4(count: int, size: int = 1000, start: int = 5000) -> list[bytes]:
    return [seg4(start + k * size, bytes([k]) * size) for k in range(count)]


def test_consecutive_segments_become_one_gso_packet() -> None:
    out = gro.coalesce(run4(5))
    assert len(out) == 1
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet(out[0])
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (1, 1, 52, 1000, 20, 16)
    packet = out[0][10:]
    assert struct.unpack("!H", packet[2:4])[0] == len(packet) == 52 + 5000
    assert (
        gro.ipv4_header_checksum(packet[:10] + b"\x00\x00" + packet[12:20])
        == struct.unpack("!H", packet[10:12])[0]
    )
    assert packet[52:] == b"".join(bytes([k]) * 1000 for k in range(5))
    assert struct.unpack("!I", packet[24:28])[0] == 5000  # the first segment's sequence number


def test_tcp_checksum_field_holds_the_pseudo_header_sum() -> None:
    packet = gro.coalesce(run4(3))[0][10:]
    words = struct.unpack("!4H", SRC4 + DST4)
    expected = fold(sum(words) + 6 + (len(packet) - 20))
    assert struct.unpack("!H", packet[36:38])[0] == expected


def test_a_gap_in_sequence_numbers_splits_the_run() -> None:
    packets = [*run4(2), seg4(5000 + 3 * 1000, b"x" * 1000), seg4(5000 + 4 * 1000, b"y" * 1000)]
    out = gro.coalesce(packets)
    assert [vnet(p)[1] for p in out] == [1, 1]
    assert [len(p) - 10 for p in out] == [52 + 2000, 52 + 2000]


def test_push_ends_a_run_and_is_kept_on_the_merged_packet() -> None:
    packets = [*run4(2), seg4(7000, b"p" * 1000, flags=0x18), seg4(8000, b"q" * 1000)]
    out = gro.coalesce(packets)
    assert len(out) == 2
    assert out[0][10 + 33] == 0x18 and len(out[0]) - 10 == 52 + 3000
    assert vnet(out[1])[1] == gro.VIRTIO_NET_HDR_GSO_NONE


def test_a_shorter_segment_ends_a_run() -> None:
    packets = [*run4(2), seg4(7000, b"s" * 10), seg4(7010, b"t" * 1000)]
    out = gro.coalesce(packets)
    assert len(out) == 2 and len(out[0]) - 10 == 52 + 2010


def test_different_flows_are_not_merged() -> None:
    packets = [seg4(5000, b"a" * 100, sport=1), seg4(5100, b"b" * 100, sport=2)]
    assert [p[10:] for p in gro.coalesce(packets)] == packets


def test_non_tcp_and_control_segments_pass_through_with_a_plain_header() -> None:
    udp = seg4(0, b"u" * 100, proto=17)
    syn = seg4(1, b"", flags=0x02)
    fin = seg4(2, b"f" * 10, flags=0x11)
    out = gro.coalesce([udp, syn, fin])
    assert out == [gro.PLAIN_HEADER + udp, gro.PLAIN_HEADER + syn, gro.PLAIN_HEADER + fin]


def test_ipv6_segments_merge_with_tcpv6_gso() -> None:
    out = gro.coalesce([seg6(100 + k * 500, b"z" * 500) for k in range(4)])
    assert len(out) == 1
    flags, gso_type, hdr_len, gso_size, csum_start, _ = vnet(out[0])
    assert (flags, gso_type, hdr_len, gso_size, csum_start) == (1, 4, 72, 500, 40)
    assert struct.unpack("!H", out[0][10 + 4 : 10 + 6])[0] == 32 + 2000


def test_merged_size_stays_within_one_ip_packet() -> None:
    out = gro.coalesce(run4(60, size=1400))
    assert all(len(p) - 10 <= 65535 for p in out)
    assert sum(len(p) - 10 - 52 for p in out) == 60 * 1400


@given(st.lists(st.binary(max_size=200), max_size=20))
def test_arbitrary_packets_never_raise_and_keep_a_header_each(packets: list[bytes]) -> None:
    out = gro.coalesce(packets)
    assert len(out) <= len(packets)
    assert all(len(p) >= 10 for p in out)
