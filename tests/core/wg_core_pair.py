"""Two in-memory WireGuard Devices wired together, for the protocol tests (no sockets, fake clock)."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Hashable

from wiremesh.core import crypto
from wiremesh.core.wireguard import Device, PeerConfig

A_ENDPOINT = ("192.0.2.1", 51820)
B_ENDPOINT = ("192.0.2.2", 51820)
A_V4, B_V4 = "10.0.0.1", "10.0.0.2"
A_V6, B_V6 = "fd00::1", "fd00::2"
START = 1_700_000_000.0


def ipv4_packet(src: str, dst: str, payload: bytes = b"hello", proto: int = 17) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        total,
        0,
        0,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + payload


def ipv6_packet(src: str, dst: str, payload: bytes = b"hello6") -> bytes:
    header = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        len(payload),
        17,
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return header + payload


class Pair:
    """Device `a` (10.0.0.1) and device `b` (10.0.0.2), each configured with the other as a peer."""

    def __init__(self, psk: bytes | None = None, keepalive_a: int = 0, b_knows_endpoint: bool = True) -> None:
        self.now = START
        self.key_a = crypto.generate_private_key()
        self.key_b = crypto.generate_private_key()
        self.pub_a = crypto.public_key(self.key_a)
        self.pub_b = crypto.public_key(self.key_b)
        self.a = Device(self.key_a, self.now)
        self.b = Device(self.key_b, self.now)
        self.a.set_peer(
            PeerConfig(
                self.pub_b, psk, (f"{B_V4}/32", f"{B_V6}/128"), B_ENDPOINT, persistent_keepalive=keepalive_a
            )
        )
        self.b.set_peer(
            PeerConfig(
                self.pub_a, psk, (f"{A_V4}/32", f"{A_V6}/128"), A_ENDPOINT if b_knows_endpoint else None
            )
        )
        self.inbox_a: list[bytes] = []
        self.inbox_b: list[bytes] = []
        self.log: list[tuple[float, Hashable, bytes]] = []  # (time, source endpoint, datagram) moved by pump

    @property
    def peer_b(self):  # a's view of b
        return self.a.peers[self.pub_b]

    @property
    def peer_a(self):  # b's view of a
        return self.b.peers[self.pub_a]

    def device(self, endpoint: Hashable) -> Device:
        return self.b if endpoint == B_ENDPOINT else self.a

    def take(self) -> list[tuple[bytes, Hashable, Hashable]]:
        """All pending datagrams from both sides, as (datagram, destination, source)."""
        out = [(d, ep, A_ENDPOINT) for d, ep in self.a.datagrams_to_send()]
        out += [(d, ep, B_ENDPOINT) for d, ep in self.b.datagrams_to_send()]
        self.log += [(self.now, source, d) for d, _, source in out]
        return out

    def deliver(self, datagram: bytes, destination: Hashable, source: Hashable) -> bytes | None:
        inner = self.device(destination).receive(datagram, source, self.now)
        if inner is not None:
            (self.inbox_b if destination == B_ENDPOINT else self.inbox_a).append(inner)
        return inner

    def pump(self, rounds: int = 10) -> int:
        """Deliver datagrams back and forth until neither side has anything to send."""
        moved = 0
        for _ in range(rounds):
            batch = self.take()
            if not batch:
                return moved
            for datagram, destination, source in batch:
                self.deliver(datagram, destination, source)
                moved += 1
        return moved

    def send_a(self, packet: bytes) -> None:
        result = self.a.send(packet, self.now)
        if result is not None:
            self.deliver(result[0], result[1], A_ENDPOINT)

    def send_b(self, packet: bytes) -> None:
        result = self.b.send(packet, self.now)
        if result is not None:
            self.deliver(result[0], result[1], B_ENDPOINT)

    def connect(self) -> None:
        """Handshake initiated by a (via a first packet), completed and confirmed."""
        self.send_a(ipv4_packet(A_V4, B_V4, b"first"))
        self.pump()

    def advance(self, seconds: float, step: float = 0.5, deliver: bool = True) -> None:
        """Move the clock, running both devices' timers as they fall due."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for device in (self.a, self.b):
                deadline = device.next_timer()
                if deadline is not None and deadline <= self.now:
                    device.handle_timer(self.now)
            if deliver:
                self.pump()


def events(device: Device) -> list[object]:
    out = []
    while (event := device.next_event()) is not None:
        out.append(event)
    return out
