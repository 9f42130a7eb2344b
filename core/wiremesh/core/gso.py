"""Software segmentation of TUN "super-packets" (TSO) and completion of partial checksums.

With IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4|TSO6) the kernel hands us a TCP send of up to
64 KiB as one packet with a virtio_net_hdr (gso_size = MSS) and leaves checksums for us to
finish (VIRTIO_NET_HDR_F_NEEDS_CSUM). One read then replaces dozens, and the local TCP stack does
its per-packet work once per super-packet. Every segment we produce carries complete, valid IP
and TCP checksums, because the peer may be any WireGuard implementation writing to a plain TUN.

Ones'-complement sums are byte-order independent up to a final byte swap, and 2^16 = 1 mod
0xFFFF, which is what lets numpy (when installed) sum all full-size segments of a super-packet in
one vectorised call; without numpy a pure-Python fallback gives the same answers, more slowly.
Pure functions, no I/O.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from wiremesh.core.gro import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR_LEN,
)

_native_segment: Any = None
_native_tun_packets: Any = None
if os.environ.get("WIREMESH_NATIVE", "1") != "0":
    try:  # optional: the native kernel (native/wgkernel)
        import wiremesh_wgkernel

        _native_segment = wiremesh_wgkernel.segment_tcp
        _native_tun_packets = wiremesh_wgkernel.tun_packets
    except ImportError:
        pass

# With the native kernel, segmenting costs less than the reads TSO saves: the Engine turns TSO on.
NATIVE = _native_segment is not None

np: Any
try:  # optional: vectorised checksums; everything works without it
    import numpy

    np = numpy
except ImportError:  # pragma: no cover - depends on the environment
    np = None

VIRTIO_NET_HDR_GSO_ECN = 0x80
TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80
PROTO_TCP = 6
PROTO_UDP = 17

_vnet = struct.Struct("=BBHHHH")
_u16 = struct.Struct("!H")
_u32 = struct.Struct("!I")


class SegmentationError(ValueError):
    """The kernel's packet does not look like what its virtio_net_hdr says."""


def fold(total: int) -> int:
    """Fold a (possibly huge) sum of 16-bit words to 16 bits, ones'-complement style."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """Folded ones'-complement sum of `data` as big-endian 16-bit words (odd length zero-padded)."""
    if len(data) & 1:
        data = bytes(data) + b"\x00"
    x = int.from_bytes(data, "big")
    bits = len(data) * 8
    # Halving keeps the value congruent mod 0xFFFF because each split is at a multiple of 16 bits.
    while bits > 64:
        half = (bits // 32) * 16
        x = (x >> half) + (x & ((1 << half) - 1))
        bits = max(half, x.bit_length())
    return fold(x)


def segment_sums(payload: bytes | memoryview, mss: int, count: int) -> list[int]:
    """Folded sums of the first `count` full `mss`-byte segments of `payload`."""
    if np is not None and not mss & 1 and count > 1:
        words = np.frombuffer(payload, dtype=">u2", count=count * mss // 2).reshape(count, mss // 2)
        return [fold(int(s)) for s in words.sum(axis=1, dtype=np.uint64).tolist()]
    return [ones_sum(payload[k * mss : (k + 1) * mss]) for k in range(count)]


def parse_vnet(packet: bytes) -> tuple[int, int, int, int, int, int]:
    """(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) from a TUN read."""
    return _vnet.unpack_from(packet, 0)


def complete_checksum(packet: bytes, csum_start: int, csum_offset: int) -> bytes:
    """Finish a CHECKSUM_PARTIAL packet: the field holds the pseudo-header sum, add the rest."""
    where = csum_start + csum_offset
    if csum_start >= len(packet) or where + 2 > len(packet):
        raise SegmentationError("checksum offsets outside the packet")
    value = ~ones_sum(memoryview(packet)[csum_start:]) & 0xFFFF
    if value == 0 and len(packet) > 9 and packet[0] >> 4 == 4 and packet[9] == PROTO_UDP:
        value = 0xFFFF  # UDP sends a computed zero as all ones
    return packet[:where] + _u16.pack(value) + packet[where + 2 :]


def from_tun(raw: bytes) -> list[bytes]:
    """A TUN read (virtio_net_hdr + packet) -> the IP packets to encrypt, checksums complete."""
    if len(raw) < VNET_HDR_LEN:
        raise SegmentationError("read shorter than a virtio_net_hdr")
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = _vnet.unpack_from(raw, 0)
    packet = raw[VNET_HDR_LEN:]
    gso_type &= ~VIRTIO_NET_HDR_GSO_ECN
    if gso_type == VIRTIO_NET_HDR_GSO_NONE:
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [complete_checksum(packet, csum_start, csum_offset)]
        return [packet]
    if gso_type not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) or gso_size == 0:
        raise SegmentationError(f"unsupported gso_type {gso_type} size {gso_size}")
    return segment_tcp(packet, gso_size)


def tun_packets_python(reads: list[bytes]) -> tuple[list[bytes], int]:
    """from_tun for each read: (the IP packets, how many reads were malformed and skipped)."""
    packets: list[bytes] = []
    malformed = 0
    for raw in reads:
        try:
            packets += from_tun(raw)
        except SegmentationError:
            malformed += 1
    return packets, malformed


def tun_packets(reads: list[bytes]) -> tuple[list[bytes], int]:
    """tun_packets_python in one native call when the native kernel is there (bytes only)."""
    if _native_tun_packets is not None:
        try:
            return _native_tun_packets(reads)
        except TypeError:  # a read that is not bytes: the Python path copes
            pass
    return tun_packets_python(reads)


def segment_tcp(packet: bytes, mss: int) -> list[bytes]:
    """Split one TCP super-packet into segments of `mss` payload bytes, as TSO hardware would
    (the native kernel when present: the same bytes, without the interpreter lock)."""
    if _native_segment is not None and type(packet) is bytes:
        try:
            return _native_segment(packet, mss)
        except ValueError as exc:
            raise SegmentationError(str(exc)) from None
    return segment_tcp_python(packet, mss)


def segment_tcp_python(packet: bytes, mss: int) -> list[bytes]:
    """segment_tcp in Python."""
    n = len(packet)
    if n < 40 or mss <= 0:
        raise SegmentationError("super-packet too short")
    version = packet[0] >> 4
    if version == 4:
        t = (packet[0] & 0x0F) * 4
        if t < 20 or packet[9] != PROTO_TCP:
            raise SegmentationError("TSO packet is not IPv4/TCP")
        pseudo = ones_sum(packet[12:20]) + PROTO_TCP
        ip_base = ones_sum(packet[:2] + b"\x00\x00\x00\x00" + packet[6:10] + b"\x00\x00" + packet[12:t])
        ip_id = (packet[4] << 8) | packet[5]
    elif version == 6:
        t = 40
        if packet[6] != PROTO_TCP:
            raise SegmentationError("TSO packet is not IPv6/TCP (extension headers unsupported)")
        pseudo = ones_sum(packet[8:40]) + PROTO_TCP
        ip_base = ip_id = 0
    else:
        raise SegmentationError("not an IP packet")
    if t + 20 > n:
        raise SegmentationError("super-packet shorter than its headers")
    doff = (packet[t + 12] >> 4) * 4
    hl = t + doff
    if doff < 20 or hl > n:
        raise SegmentationError("bad TCP header length")
    payload = memoryview(packet)[hl:]
    total = len(payload)
    if total <= mss:
        # Nothing to split; still finish the checksum the kernel left partial.
        fixed = bytearray(packet)
        fixed[t + 16 : t + 18] = b"\x00\x00"
        fixed[t + 16 : t + 18] = _u16.pack(~fold(pseudo + (n - t) + ones_sum(memoryview(fixed)[t:])) & 0xFFFF)
        if version == 4:
            fixed[10:12] = b"\x00\x00"
            fixed[10:12] = _u16.pack(~ones_sum(fixed[:t]) & 0xFFFF)
        return [bytes(fixed)]
    seq0 = _u32.unpack_from(packet, t + 4)[0]
    flags0 = packet[t + 13]
    # TCP header sum without sequence number, flags and checksum: those vary per segment.
    tcp_base = ones_sum(packet[t : t + 4] + b"\x00\x00\x00\x00" + packet[t + 8 : t + 12])
    tcp_base += packet[t + 12] << 8
    tcp_base += ones_sum(packet[t + 14 : t + 16] + packet[t + 18 : hl])
    full, rest = divmod(total, mss)
    sums = segment_sums(payload, mss, full)
    if rest:
        sums.append(ones_sum(payload[full * mss :]))
    count = len(sums)
    head = bytearray(packet[:hl])
    out: list[bytes] = []
    append = out.append
    for k in range(count):
        seglen = mss if k < full else rest
        last = k == count - 1
        flags = flags0 & ~(TCP_FIN | TCP_PSH) if not last else flags0
        if k:
            flags &= ~TCP_CWR
        seq = (seq0 + k * mss) & 0xFFFFFFFF
        if version == 4:
            length = hl + seglen
            ident = (ip_id + k) & 0xFFFF
            _u16.pack_into(head, 2, length)
            _u16.pack_into(head, 4, ident)
            _u16.pack_into(head, 10, ~fold(ip_base + length + ident) & 0xFFFF)
        else:
            _u16.pack_into(head, 4, doff + seglen)
        _u32.pack_into(head, t + 4, seq)
        head[t + 13] = flags
        csum = fold(pseudo + doff + seglen + tcp_base + flags + (seq >> 16) + (seq & 0xFFFF) + sums[k])
        _u16.pack_into(head, t + 16, ~csum & 0xFFFF)
        start = k * mss
        append(bytes(head) + payload[start : start + seglen])
    return out
