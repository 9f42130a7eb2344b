"""Build raw IPv4/IPv6 packets for the packet-filter tests (checksums are left zero: the
filter does not look at them)."""

from __future__ import annotations

import ipaddress
import struct

TCP, UDP, ICMP4, ICMP6 = 6, 17, 1, 58
SYN, ACK = 0x02, 0x10


def transport(proto: int, sport: int = 0, dport: int = 0, flags: int = SYN) -> bytes:
    if proto == TCP:
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    if proto == UDP:
        return struct.pack("!HHHH", sport, dport, 8, 0) + b"data"
    return struct.pack("!HH", sport, dport) + b"\x00" * 8


def icmp_echo(version: int, request: bool, ident: int, seq: int = 1) -> bytes:
    kind = (8 if request else 0) if version == 4 else (128 if request else 129)
    return struct.pack("!BBHHH", kind, 0, 0, ident, seq) + b"ping"


def ip(src: str, dst: str, proto: int, payload: bytes, frag_offset: int = 0) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            1,
            frag_offset & 0x1FFF,
            64,
            proto,
            0,
            s.packed,
            d.packed,
        )
        return header + payload
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, s.packed, d.packed)
    return header + payload


def packet(src: str, dst: str, proto: int, sport: int = 0, dport: int = 0, flags: int = SYN) -> bytes:
    """A TCP/UDP/other packet; for ICMP an echo request (ident = sport)."""
    version = ipaddress.ip_address(src).version
    if proto in (ICMP4, ICMP6):
        return ip(src, dst, proto, icmp_echo(version, True, sport))
    return ip(src, dst, proto, transport(proto, sport, dport, flags))
