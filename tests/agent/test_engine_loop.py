"""The Engine's packet loop, TUN <-> UDP, with a pass-through stand-in for the WireGuard Device.

This isolates the I/O adapter (threads, reconfiguration, hooks, drop counting) from the crypto,
which the interop tests cover against wireguard-go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterator

import pytest
from agent_netns import call_in, namespace, ping, send_tcp_stream, unique

from wiremesh.agent import netconf
from wiremesh.agent.engine import Engine
from wiremesh.agent.paths import StaticPaths
from wiremesh.core import gro
from wiremesh.core.wireguard import kernel

pytestmark = pytest.mark.netns

HDR = b"\x04\x00\x00\x00"


@dataclasses.dataclass
class StandInPeer:
    public_key: bytes
    endpoint: Hashable | None
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    last_handshake: float | None = None
    handshakes_completed: int = 0
    handshakes_failed: int = 0


class PassThroughDevice:
    """Frames IP packets as 'type 4' datagrams to the only peer; no crypto."""

    def __init__(self) -> None:
        self.peers: dict[bytes, StandInPeer] = {}
        self.drops: Counter[str] = Counter()
        self.under_load = False

    def set_peer(self, cfg) -> None:
        self.peers[cfg.public_key] = StandInPeer(cfg.public_key, cfg.endpoint)

    def remove_peer(self, key: bytes) -> None:
        del self.peers[key]

    def send(self, packet: bytes, now: float):
        for p in self.peers.values():
            p.tx_packets += 1
            p.tx_bytes += len(packet)
            return HDR + packet, p.endpoint
        self.drops["no_peer"] += 1
        return None

    def receive(self, data: bytes, source: Hashable, now: float):
        if data[:4] != HDR or not self.peers:
            self.drops["not_transport"] += 1
            return None
        p = next(iter(self.peers.values()))
        p.rx_packets += 1
        p.rx_bytes += len(data) - 4
        return data[4:]

    def send_batch(self, packets: list[bytes], now: float):
        results = [self.send(p, now) for p in packets]
        return [r for r in results if r is not None], None in results

    def receive_batch(self, datagrams: list[bytes], source: Hashable, now: float, vnet: bool = False):
        packets = [self.receive(d, source, now) for d in datagrams]
        kept = [p for p in packets if p]
        runs: list[list[bytes]] = []  # runs of one flow, as the Device makes them
        previous = None
        for packet in kept:
            key = kernel.flow_key(packet)
            if key is not None and key == previous:
                runs[-1].append(packet)
            else:
                runs.append([packet])
            previous = key
        flows = [(run[0], len(run), gro.coalesce(run) if vnet else run) for run in runs]
        return flows, not all(packets)

    def send_tso(self, raw: bytes, offset: int, mss: int, now: float):
        return None  # no sessions here: super-packets take the per-packet path

    def datagrams_to_send(self):
        return []

    def handle_timer(self, now: float) -> None:
        pass

    def next_timer(self):
        return None

    def next_event(self):
        return None


@dataclasses.dataclass(frozen=True)
class Cfg:
    public_key: bytes
    endpoint: Hashable | None
    allowed_ips: tuple[str, ...] = ()


@contextlib.contextmanager
def two_engines(
    tso: bool = False, endpoint_a: Hashable | None = None
) -> Iterator[tuple[str, str, Engine, Engine]]:
    """Engines a (10.202.0.1) and b (10.202.0.2) over a veth pair; `endpoint_a` replaces a's
    (host, port) endpoint for b, as magicsock's endpoint objects do."""
    with namespace("wmea") as ns_a, namespace("wmeb") as ns_b:
        subprocess.run(
            ["ip", "-n", ns_a, "link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns", ns_b],
            check=True,
        )
        for ns, addr in ((ns_a, "10.201.0.1/24"), (ns_b, "10.201.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", "v0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "v0", "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        engines = []
        try:
            for ns, me, peer_ip in (
                (ns_a, "10.202.0.1/24", "10.201.0.2"),
                (ns_b, "10.202.0.2/24", "10.201.0.1"),
            ):
                eng = Engine(
                    b"\x00" * 32,
                    unique("wme"),
                    listen_port=40000,
                    mtu=1420,
                    device=PassThroughDevice(),
                    tso=tso,
                )
                call_in(ns, eng.start)
                engines.append(eng)
                call_in(ns, lambda eng=eng, me=me: eng.set_addresses([me]))
                endpoint = endpoint_a if endpoint_a is not None and ns == ns_a else (peer_ip, 40000)
                eng.set_peers([Cfg(b"\x01" * 32, endpoint)])
            yield ns_a, ns_b, engines[0], engines[1]
        finally:
            for eng, ns in zip(engines, (ns_a, ns_b), strict=False):
                call_in(ns, eng.stop)


def test_ping_crosses_two_engines_and_counts_bytes() -> None:
    with two_engines() as (ns_a, _ns_b, a, b):
        assert ping(ns_a, "10.202.0.2").returncode == 0
        peer_a = next(iter(a.status()["peers"].values()))
        assert peer_a["tx_packets"] >= 3 and peer_a["rx_packets"] >= 3
        assert next(iter(b.status()["peers"].values()))["rx_bytes"] >= 3 * 84


class DropAll:
    """A packet filter that delivers nothing and remembers what we sent."""

    rules: tuple[object, ...] = ()
    allow_all = False

    def __init__(self) -> None:
        self.sent = 0

    def admit_flow(self, packet: bytes, count: int, now: float) -> bool:
        return False

    def in_live_flow(self, packet: bytes, now: float) -> bool:
        return False

    def note_outbound_batch(self, packets: list[bytes], now: float) -> list[bytes]:
        self.sent += len(packets)
        return []


class Broken(DropAll):
    def admit_flow(self, packet: bytes, count: int, now: float) -> bool:
        raise RuntimeError("filter bug")


def test_packet_filter_drops_inbound_and_counts() -> None:
    with two_engines() as (ns_a, _ns_b, _a, b):
        b.packet_filter = DropAll()
        assert ping(ns_a, "10.202.0.2", count=2).returncode != 0
        assert b.status()["drops"]["inbound_filter"] >= 2


def test_packet_filter_sees_every_packet_we_send() -> None:
    with two_engines() as (ns_a, _ns_b, a, _b):
        a.packet_filter = flt = DropAll()
        ping(ns_a, "10.202.0.2", count=2)
        assert flt.sent >= 2


class Paths(StaticPaths):
    """Path selection (paths.Paths) for the tests: records other datagrams, resolves and sends as told."""

    def __init__(
        self,
        resolve: Callable[[Hashable], tuple[str, int] | None] = lambda endpoint: None,
        send: Callable[[bytes, Hashable], None] | None = None,
    ) -> None:
        super().__init__()
        self.other: list[tuple[bytes, tuple[str, int]]] = []
        self._resolve = resolve
        self._send = send

    def resolve_direct(self, endpoint: Hashable) -> tuple[str, int] | None:
        return self._resolve(endpoint)

    def send_to_peer(self, data: bytes, endpoint: Hashable) -> None:
        if self._send is not None:
            self._send(data, endpoint)

    def receive_other(self, data: bytes, address: tuple[str, int]) -> bool:
        self.other.append((data, address))
        return True


def test_non_wireguard_datagrams_go_to_path_selection() -> None:
    with two_engines() as (ns_a, _ns_b, _a, b):
        b.paths = paths = Paths()
        got = paths.other
        sock = call_in(ns_a, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        try:
            sock.sendto(b"disco-ish payload", ("10.201.0.2", 40000))
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            sock.close()
        assert got and got[0][0] == b"disco-ish payload" and got[0][1][0] == "10.201.0.1"


def test_stop_removes_the_interface() -> None:
    with two_engines() as (ns_a, _ns_b, a, _b):
        call_in(ns_a, a.stop)
        assert not call_in(ns_a, lambda: netconf.interface_exists(a.tun_name))


def test_a_raising_filter_costs_packets_not_the_data_plane() -> None:
    with two_engines() as (ns_a, _ns_b, _a, b):
        b.packet_filter = Broken()
        assert ping(ns_a, "10.202.0.2", count=2).returncode != 0
        assert b.status()["drops"]["engine_error"] >= 2
        b.packet_filter = None
        assert ping(ns_a, "10.202.0.2", count=2).returncode == 0


@pytest.mark.parametrize("tso", [False, True], ids=["plain", "tso"])
def test_a_tcp_stream_arrives_intact(tso: bool) -> None:
    """Exercises TUN offloads end to end: TSO segmentation (if on), checksums and GRO writes."""
    data = os.urandom(4 << 20)
    with two_engines(tso=tso) as (ns_a, ns_b, a, b):
        received = send_tcp_stream(ns_a, ns_b, "10.202.0.2", data)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert b.io["tun_writes"] < b.io["tun_packets_written"], "segments were coalesced on write"
        if tso:
            assert a.io["tun_reads"] * 2 < b.io["udp_datagrams_received"], (
                "the kernel handed over super-packets"
            )


class PathEndpoint:
    """Stands in for magicsock's PeerEndpoint: hashable by identity, no address of its own."""


def test_runs_to_a_resolved_endpoint_leave_in_udp_segment_batches() -> None:
    ep = PathEndpoint()
    with two_engines(endpoint_a=ep) as (ns_a, ns_b, a, _b):
        # Lone datagrams still go to path selection (as magicsock's do): it sends them direct.
        a.paths = Paths(
            resolve=lambda endpoint: ("10.201.0.2", 40000) if endpoint is ep else None,
            send=lambda data, endpoint: a.send_datagram(data, ("10.201.0.2", 40000)),
        )
        data = os.urandom(2 << 20)
        received = send_tcp_stream(ns_a, ns_b, "10.202.0.2", data)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert a.io["udp_gso_resolved_runs"] > 0
        assert a.io["udp_gso_datagrams"] > 2 * a.io["udp_gso_sends"] > 0


def test_runs_to_an_unresolved_endpoint_go_to_path_selection_one_by_one() -> None:
    ep = PathEndpoint()
    with two_engines(endpoint_a=ep) as (ns_a, ns_b, a, _b):
        relayed = Counter[int]()
        sock_b = ("10.201.0.2", 40000)

        def relay(data: bytes, endpoint: Hashable) -> None:
            relayed[len(data)] += 1
            a.send_datagram(data, sock_b)  # a relay that happens to reach b's socket

        a.paths = Paths(send=relay)
        data = os.urandom(1 << 20)
        received = send_tcp_stream(ns_a, ns_b, "10.202.0.2", data)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert sum(relayed.values()) > len(data) // 1500
        assert a.io["udp_gso_sends"] == 0


def test_a_raising_resolver_costs_batching_not_datagrams() -> None:
    ep = PathEndpoint()
    with two_engines(endpoint_a=ep) as (ns_a, ns_b, a, _b):

        def broken(endpoint: Hashable) -> tuple[str, int] | None:
            raise RuntimeError("resolver bug")

        a.paths = Paths(
            resolve=broken, send=lambda data, endpoint: a.send_datagram(data, ("10.201.0.2", 40000))
        )
        data = os.urandom(1 << 20)
        received = send_tcp_stream(ns_a, ns_b, "10.202.0.2", data)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert a.drops["resolve_direct_error"] > 0
