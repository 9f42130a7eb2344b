"""Receive-side coalescing of decrypted TCP segments into one TUN write (software GRO).

A TUN opened with IFF_VNET_HDR takes a struct virtio_net_hdr before each packet. With it we can
hand the kernel one large TCP packet marked as GSO (gso_size = the segments' payload size) in
place of a run of consecutive segments of the same flow, so the TCP stack does its per-packet work
once per run rather than once per segment. This is the same merge the kernel's own GRO performs
on a NIC: same addresses, ports, ACK, window and options; consecutive sequence numbers; only the
ACK flag (PSH allowed on the last segment); equal payload sizes except a shorter last one.

The merged packet carries a valid IPv4 header checksum and, in the TCP checksum field, the
pseudo-header sum with VIRTIO_NET_HDR_F_NEEDS_CSUM, exactly as the kernel's own TSO packets do;
the kernel completes it if the packet is forwarded. Pure functions, no I/O.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Callable

# UDP receive offload (linux/udp.h); Python has no constants for these.
SOL_UDP = 17
UDP_GRO = 104
VNET_HDR_LEN = 10
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4

PLAIN_HEADER = bytes(VNET_HDR_LEN)  # no offload: the packet is written as it is
MAX_IP_PACKET = 65535
TCP_ACK = 0x10
TCP_PSH = 0x08
PROTO_TCP = 6

# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (host byte order: tun's default
# on a little-endian machine, and what virtio "legacy" headers use).
_vnet = struct.Struct("=BBHHHH")
_ip4_words = struct.Struct("!10H")
_u16 = struct.Struct("!H")


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_header_checksum(header: bytes | bytearray) -> int:
    """Checksum for a 20-byte IPv4 header whose checksum field is zero."""
    return ~_fold(sum(_ip4_words.unpack(header))) & 0xFFFF


def _pseudo4(packet: bytes, tcp_length: int) -> int:
    s = int.from_bytes(packet[12:14], "big") + int.from_bytes(packet[14:16], "big")
    s += int.from_bytes(packet[16:18], "big") + int.from_bytes(packet[18:20], "big")
    return _fold(s + PROTO_TCP + tcp_length)


def _pseudo6(packet: bytes, tcp_length: int) -> int:
    s = sum(struct.unpack("!16H", packet[8:40]))
    return _fold(s + (tcp_length >> 16) + (tcp_length & 0xFFFF) + PROTO_TCP)


def coalesce_python(packets: list[bytes]) -> list[bytes]:
    """Turn decrypted IP packets into TUN writes (each prefixed with a virtio_net_hdr)."""
    out: list[bytes] = []
    append = out.append
    n = len(packets)
    i = 0
    while i < n:
        p = packets[i]
        if i + 1 == n:
            append(PLAIN_HEADER + p)
            break
        # The first segment of a run fixes everything the others must match; compare slices of
        # the candidates against it rather than building a key per packet.
        size = len(p)
        if size < 40:
            append(PLAIN_HEADER + p)
            i += 1
            continue
        if p[0] == 0x45:
            t = 20
            if size < 40 or p[9] != PROTO_TCP or p[6] & 0x3F or p[7]:
                append(PLAIN_HEADER + p)
                i += 1
                continue
            same_ip = p[8:10] + p[12:20]  # TTL, protocol, addresses
            tos = p[1]
        elif p[0] >> 4 == 6:
            t = 40
            if size < 60 or p[6] != PROTO_TCP:
                append(PLAIN_HEADER + p)
                i += 1
                continue
            same_ip = p[0:4] + p[6:8] + p[8:40]
            tos = -1
        else:
            append(PLAIN_HEADER + p)
            i += 1
            continue
        doff = (p[t + 12] >> 4) * 4
        hl = t + doff
        mss = size - hl
        if doff < 20 or mss <= 0 or p[t + 13] != TCP_ACK:
            append(PLAIN_HEADER + p)
            i += 1
            continue
        ports = p[t : t + 4]
        ack_off = p[t + 8 : t + 13]  # ACK number and data offset
        window = p[t + 14 : t + 16]
        options = p[t + 20 : hl]
        next_seq = (int.from_bytes(p[t + 4 : t + 8], "big") + mss) & 0xFFFFFFFF
        total = size
        last_flags = TCP_ACK
        j = i + 1
        while j < n:
            q = packets[j]
            length = len(q) - hl
            if length <= 0 or length > mss or total + length > MAX_IP_PACKET:
                break
            flags = q[t + 13]
            if flags != TCP_ACK and flags != TCP_ACK | TCP_PSH:
                break
            if t == 20:
                if q[0] != 0x45 or q[1] != tos or q[6] & 0x3F or q[7] or q[8:10] + q[12:20] != same_ip:
                    break
            elif q[0:4] + q[6:8] + q[8:40] != same_ip:
                break
            if (
                q[t : t + 4] != ports
                or q[t + 8 : t + 13] != ack_off
                or q[t + 14 : t + 16] != window
                or q[t + 20 : hl] != options
                or int.from_bytes(q[t + 4 : t + 8], "big") != next_seq
            ):
                break
            total += length
            next_seq = (next_seq + length) & 0xFFFFFFFF
            last_flags = flags
            j += 1
            if length < mss or flags & TCP_PSH:
                break  # a short or pushed segment ends a run, as in the kernel's GRO
        if j - i == 1:
            append(PLAIN_HEADER + p)
            i += 1
            continue
        append(_merge(packets, i, j, hl, mss, total, last_flags))
        i = j
    return out


def _merge(packets: list[bytes], i: int, j: int, hl: int, mss: int, total: int, last_flags: int) -> bytes:
    first = packets[i]
    head = bytearray(first[:hl])
    if first[0] == 0x45:
        t = 20
        head[2:4] = _u16.pack(total)
        head[10:12] = b"\x00\x00"
        head[10:12] = _u16.pack(ipv4_header_checksum(head[:20]))
        pseudo = _pseudo4(first, total - 20)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
    else:
        t = 40
        head[4:6] = _u16.pack(total - 40)
        pseudo = _pseudo6(first, total - 40)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
    head[t + 13] = last_flags
    head[t + 16 : t + 18] = _u16.pack(pseudo)
    vnet = _vnet.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hl, mss, t, 16)
    return b"".join([vnet, head, *[q[hl:] for q in packets[i:j]]])


def split_udp_gro(data: bytes, ancdata: list[tuple[int, int, bytes]]) -> list[bytes]:
    """The datagrams of one recvmsg. With UDP_GRO the kernel hands over several datagrams of one
    flow at once, split at the segment size it reports in the control message."""
    segment = 0
    for level, kind, cdata in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            segment = int.from_bytes(cdata[:4], sys.byteorder)
    if segment and len(data) > segment:
        return [data[k : k + segment] for k in range(0, len(data), segment)]
    return [data]


def _native_coalesce() -> Callable[[list[bytes]], list[bytes]] | None:
    """The native kernel's coalesce (native/wgkernel: the same bytes, without the interpreter
    lock), unless absent or WIREMESH_NATIVE=0."""
    if os.environ.get("WIREMESH_NATIVE", "1") == "0":
        return None
    try:
        import wiremesh_wgkernel as native
    except ImportError:
        return None
    fast: Callable[[list[bytes]], list[bytes]] = native.coalesce

    def coalesce_native(packets: list[bytes]) -> list[bytes]:
        return fast([p if type(p) is bytes else bytes(p) for p in packets])

    return coalesce_native


coalesce: Callable[[list[bytes]], list[bytes]] = _native_coalesce() or coalesce_python
