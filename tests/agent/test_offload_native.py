"""The native kernel's TCP segmentation and coalescing (native/wgkernel) make exactly the bytes
of the Python ones in gso.py and gro.py, for well-formed input and for anything else."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gro_coalesce import seg4, seg6
from test_gso_segment import super4, super6

from wiremesh.core import gro, gso

try:
    import wiremesh_wgkernel as native
except ImportError:  # pragma: no cover - `make venv` builds it wherever cargo is installed
    native = None

pytestmark = pytest.mark.skipif(
    native is None and os.environ.get("WIREMESH_NATIVE") == "0",
    reason="WIREMESH_NATIVE=0 asks for the Python kernel alone",
)


def test_the_native_kernel_is_built() -> None:
    assert native is not None, "native/wgkernel is not installed: run make venv (needs cargo)"


def segments_both_ways(packet: bytes, mss: int) -> None:
    assert native is not None
    try:
        expected = gso.segment_tcp_python(packet, mss)
    except gso.SegmentationError as exc:
        with pytest.raises(ValueError, match=str(exc).split("(")[0].strip()):
            native.segment_tcp(packet, mss)
        return
    assert native.segment_tcp(packet, mss) == expected


@settings(max_examples=150, deadline=None)
@given(
    size=st.integers(0, 20000),
    mss=st.integers(1, 9000),
    flags=st.sampled_from([0x10, 0x18, 0x19, 0x98, 0x11]),
    v6=st.booleans(),
    seq=st.integers(0, 2**32 - 1),
)
def test_segmentation_matches(size: int, mss: int, flags: int, v6: bool, seq: int) -> None:
    payload = os.urandom(size)
    segments_both_ways(super6(payload, flags, seq) if v6 else super4(payload, flags, seq), mss)


@settings(max_examples=150, deadline=None)
@given(junk=st.binary(max_size=200), mss=st.integers(0, 1500))
def test_segmentation_of_garbage_fails_alike(junk: bytes, mss: int) -> None:
    segments_both_ways(junk, mss)


segment = st.tuples(
    st.sampled_from(["v4", "v6", "v4-other-port", "udp", "junk"]),
    st.integers(-3, 3),  # sequence gap in units of the size
    st.integers(1, 1400),
    st.sampled_from([0x10, 0x18, 0x11, 0x12]),
)


def build(spec: list[tuple[str, int, int, int]]) -> list[bytes]:
    packets, seq = [], 1000
    for kind, gap, size, flags in spec:
        payload = bytes([size & 0xFF]) * size
        if kind == "v4":
            packets.append(seg4(seq, payload, flags))
        elif kind == "v6":
            packets.append(seg6(seq, payload, flags))
        elif kind == "v4-other-port":
            packets.append(seg4(seq, payload, flags, sport=6000))
        elif kind == "udp":
            packets.append(seg4(seq, payload, flags, proto=17))
        else:
            packets.append(payload[:60])
        seq = (seq + size * (1 if gap == 0 else gap)) % 2**32
    return packets


@settings(max_examples=200, deadline=None)
@given(st.lists(segment, max_size=40))
def test_coalescing_matches(spec: list[tuple[str, int, int, int]]) -> None:
    assert native is not None
    packets = build(spec)
    assert native.coalesce(packets) == gro.coalesce_python(packets)


def test_a_long_run_merges_the_same_way() -> None:
    assert native is not None
    packets = [seg4(5000 + k * 1380, bytes([k]) * 1380) for k in range(40)]
    writes = native.coalesce(packets)
    assert writes == gro.coalesce_python(packets) and len(writes) < 3


def tun_read(packet: bytes, flags: int, gso_type: int, gso_size: int, start: int, offset: int) -> bytes:
    return struct.pack("=BBHHHH", flags, gso_type, 0, gso_size, start, offset) + packet


tun_reads = st.lists(
    st.one_of(
        # a TCP segment or UDP datagram with its checksum left to us (CHECKSUM_PARTIAL)
        st.builds(
            lambda size, udp, start: tun_read(
                seg4(7, b"q" * size, proto=17 if udp else 6), 1, 0, 0, start, 6 if udp else 16
            ),
            st.integers(0, 1400),
            st.booleans(),
            st.sampled_from([20, 0, 5000]),  # the right one, and offsets inside and outside
        ),
        # a plain packet
        st.builds(lambda size: tun_read(seg6(9, b"p" * size), 0, 0, 0, 0, 0), st.integers(0, 200)),
        # a TSO super-packet, ECN bit or not, and an unknown gso_type
        st.builds(
            lambda size, kind, mss: tun_read(super4(b"s" * size), 0, kind, mss, 20, 16),
            st.integers(0, 9000),
            st.sampled_from([1, 0x81, 4, 3]),
            st.integers(0, 1500),
        ),
        st.binary(max_size=30),
    ),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(tun_reads)
def test_tun_reads_become_the_same_packets(reads: list[bytes]) -> None:
    assert native is not None
    assert native.tun_packets(reads) == gso.tun_packets_python(reads)
