"""Bad datagrams sent at a running wiremeshd are dropped and counted, and the tunnel keeps working.

The test itself is wiremeshd's peer: it runs the core's sans-I/O Device in-process behind a UDP
socket in a lab namespace, so it can hand-craft truncated, replayed and wrongly keyed packets.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from wiremesh.core.wireguard import Device, PeerConfig
from wiremesh.lab import Lab
from wiremesh.lab.demo import WIREMESH, keypair, metric_sum, scrape, start_side
from wiremesh.lab.support import internet_checksum
from wiremesh.lab.support import wait_until as wait_for

pytestmark = pytest.mark.netns

PORT = 51820


def icmp_echo(src: str, dst: str, ident: int, seq: int) -> bytes:
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"wiremesh-test-payload"
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(icmp),
        ident,
        0,
        64,
        1,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    header = header[:10] + struct.pack("!H", internet_checksum(header)) + header[12:]
    return header + icmp


class InProcessPeer:
    """A WireGuard peer made of the core Device and a UDP socket in a lab namespace."""

    def __init__(
        self, lab: Lab, host, private_key: bytes, server_key: bytes, server: tuple[str, int]
    ) -> None:
        self.sock = lab.socket(host)
        self.sock.bind(("0.0.0.0", PORT))
        self.sock.settimeout(0.2)
        self.device = Device(private_key, time.time())
        self.server = server
        self.device.set_peer(
            PeerConfig(public_key=server_key, allowed_ips=("10.99.0.0/24",), endpoint=server)
        )

    def send_packet(self, packet: bytes) -> list[bytes]:
        """Encrypt and send one IP packet; return every datagram that went out for it."""
        sent = []
        result = self.device.send(packet, time.time())
        for data, endpoint in ([result] if result else []) + self.device.datagrams_to_send():
            self.sock.sendto(data, endpoint)
            sent.append(data)
        return sent

    def pump_until_reply(self, timeout: float = 5.0) -> bytes | None:
        """Receive and process datagrams until one decrypts to an IP packet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, source = self.sock.recvfrom(65535)
            except TimeoutError:
                self.device.handle_timer(time.time())
            else:
                packet = self.device.receive(data, source, time.time())
                if packet:
                    return packet
            for out, endpoint in self.device.datagrams_to_send():
                self.sock.sendto(out, endpoint)
        return None

    def ping(self, seq: int) -> bytes | None:
        self.send_packet(icmp_echo("10.99.0.2", "10.99.0.1", 0x77, seq))
        return self.pump_until_reply()


@pytest.fixture
def setup() -> Iterator[tuple[Lab, object, InProcessPeer]]:
    with Lab() as lab:
        server_host, client_host = lab.host("server"), lab.host("client")
        server_priv, _ = keypair()
        client_priv, client_pub = keypair()
        side = start_side(
            lab,
            WIREMESH,
            server_host,
            index=1,
            private_key=server_priv,
            peer_public_key=client_pub,
            peer_endpoint=None,
            metrics_port=9586,
        )
        peer = InProcessPeer(lab, client_host, client_priv, side.public_key, (server_host.address, PORT))
        reply = peer.ping(1)
        assert reply is not None and reply[20] == 0, "echo reply through wiremeshd"  # ICMP type 0
        yield lab, side, peer


def drops(lab: Lab, side, *reasons: str) -> float:
    metrics = scrape(lab, side)
    return sum(metric_sum(metrics, "wiremesh_packets_dropped_total", reason=r) for r in reasons)


def eventually_dropped(lab: Lab, side, at_least: float, *reasons: str) -> None:
    """The daemon handles datagrams asynchronously: poll its metrics until the drops show up."""
    wait_for(lambda: drops(lab, side, *reasons) >= at_least, 5, f"{at_least} drops for {reasons}")


def assert_still_serving(peer: InProcessPeer, seq: int) -> None:
    reply = peer.ping(seq)
    assert reply is not None and reply[20] == 0


def test_garbage_is_dropped_counted_and_survived(setup) -> None:
    lab, side, peer = setup
    for n in (0, 1, 3, 17, 200, 1500):
        peer.sock.sendto(bytes([0x7F]) + os.urandom(n), peer.server)
    peer.sock.sendto(b"\x09\x00\x00\x00" + os.urandom(100), peer.server)
    eventually_dropped(lab, side, 7, "unknown_type", "short")
    assert_still_serving(peer, 2)


def test_truncated_handshake_and_transport_are_dropped(setup) -> None:
    lab, side, peer = setup
    before = drops(lab, side, "short", "wrong_size")
    peer.sock.sendto(b"\x01\x00\x00\x00" + os.urandom(60), peer.server)  # initiation is 148 bytes
    peer.sock.sendto(b"\x02\x00\x00\x00" + os.urandom(20), peer.server)  # response is 92 bytes
    peer.sock.sendto(b"\x04\x00\x00\x00" + os.urandom(10), peer.server)  # shorter than a header + tag
    eventually_dropped(lab, side, before + 3, "short", "wrong_size")
    assert_still_serving(peer, 3)


def test_replayed_transport_packet_is_dropped(setup) -> None:
    lab, side, peer = setup
    sent = peer.send_packet(icmp_echo("10.99.0.2", "10.99.0.1", 0x77, 4))
    assert peer.pump_until_reply() is not None
    before = drops(lab, side, "replay")
    for _ in range(3):
        peer.sock.sendto(sent[-1], peer.server)
    eventually_dropped(lab, side, before + 3, "replay")
    assert_still_serving(peer, 5)


def test_transport_packet_with_wrong_key_fails_authentication(setup) -> None:
    lab, side, peer = setup
    sent = peer.send_packet(icmp_echo("10.99.0.2", "10.99.0.1", 0x77, 6))
    assert peer.pump_until_reply() is not None
    forged = bytearray(sent[-1])
    forged[12:16] = b"\xff\xff\xff\x7f"  # a fresh counter, so it is not a replay ...
    forged[20] ^= 0x55  # ... but ciphertext the session key never produced
    peer.sock.sendto(bytes(forged), peer.server)
    eventually_dropped(lab, side, 1, "decrypt_failed")
    assert_still_serving(peer, 7)


def test_initiation_from_an_unknown_key_is_refused(setup) -> None:
    lab, side, peer = setup
    stranger_key, _ = keypair()
    stranger = Device(stranger_key, time.time())
    stranger.set_peer(
        PeerConfig(public_key=side.public_key, allowed_ips=("10.99.0.0/24",), endpoint=peer.server)
    )
    stranger.send(icmp_echo("10.99.0.3", "10.99.0.1", 1, 1), time.time())
    for data, endpoint in stranger.datagrams_to_send():
        peer.sock.sendto(data, endpoint)
    eventually_dropped(lab, side, 1, "unknown_peer", "handshake_invalid")
    assert_still_serving(peer, 8)
