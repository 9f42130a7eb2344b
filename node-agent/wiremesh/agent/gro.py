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

import struct

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


def _segment_info(p: bytes) -> tuple[bytes, int, int, int, int] | None:
    """(flow key, seq, header length, payload length, flags) for a mergeable TCP segment."""
    n = len(p)
    if n < 40:
        return None
    first = p[0]
    if first == 0x45:  # IPv4 without options
        if p[9] != PROTO_TCP or p[6] & 0x3F or p[7]:  # not TCP, or a fragment
            return None
        t = 20
        key = p[1:2] + p[8:9] + p[12:24]
    elif first >> 4 == 6:
        if n < 60 or p[6] != PROTO_TCP:
            return None
        t = 40
        key = p[0:4] + p[7:8] + p[8:44]
    else:
        return None
    doff = (p[t + 12] >> 4) * 4
    hl = t + doff
    if doff < 20 or n <= hl:
        return None
    flags = p[t + 13]
    if flags != TCP_ACK and flags != TCP_ACK | TCP_PSH:
        return None
    # ACK number, data offset, window and options must match; the checksum may not.
    key += p[t + 8 : t + 13] + p[t + 14 : t + 16] + p[t + 20 : hl]
    return key, int.from_bytes(p[t + 4 : t + 8], "big"), hl, n - hl, flags


def coalesce(packets: list[bytes]) -> list[bytes]:
    """Turn decrypted IP packets into TUN writes (each prefixed with a virtio_net_hdr)."""
    out: list[bytes] = []
    append = out.append
    n = len(packets)
    i = 0
    while i < n:
        p = packets[i]
        info = _segment_info(p)
        if info is None or info[4] & TCP_PSH or i + 1 == n:
            append(PLAIN_HEADER + p)
            i += 1
            continue
        key, seq, hl, mss, _ = info
        next_seq = (seq + mss) & 0xFFFFFFFF
        total = len(p)
        j = i + 1
        last_flags = TCP_ACK
        while j < n:
            q = packets[j]
            qi = _segment_info(q)
            if (
                qi is None
                or qi[0] != key
                or qi[1] != next_seq
                or qi[3] > mss
                or total + qi[3] > MAX_IP_PACKET
            ):
                break
            total += qi[3]
            next_seq = (next_seq + qi[3]) & 0xFFFFFFFF
            last_flags = qi[4]
            j += 1
            if qi[3] < mss or last_flags & TCP_PSH:
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
