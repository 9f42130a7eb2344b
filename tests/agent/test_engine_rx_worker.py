"""The Engine's receive worker mode (workers=1) with the real WireGuard Device, between namespaces.

Rekeying is forced by ageing the current session's deadlines in memory instead of waiting
REKEY_AFTER_TIME (120 s) of wall clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest
from agent_netns import call_in, namespace, ping, send_tcp_stream, unique

from wiremesh.agent.engine import Engine, resolve_workers
from wiremesh.agent.paths import StaticPaths
from wiremesh.core import crypto
from wiremesh.core.packetfilter import Filter
from wiremesh.core.wireguard import PeerConfig
from wiremesh.core.wireguard.timers import HANDSHAKE_INITIATION_RATE

pytestmark = pytest.mark.netns

PORT = 40100


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@contextlib.contextmanager
def two_engines(workers: tuple[int, int] = (1, 1)) -> Iterator[tuple[str, str, Engine, Engine]]:
    """Engines a (10.212.0.1, initiator: knows b's endpoint) and b (10.212.0.2) over a veth pair."""
    with namespace("wmwa") as ns_a, namespace("wmwb") as ns_b:
        subprocess.run(
            ["ip", "-n", ns_a, "link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns", ns_b],
            check=True,
        )
        for ns, addr in ((ns_a, "10.211.0.1/24"), (ns_b, "10.211.0.2/24")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", "v0"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "v0", "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        keys = [os.urandom(32), os.urandom(32)]
        pubs = [crypto.public_key(k) for k in keys]
        engines: list[Engine] = []
        try:
            for i, ns in enumerate((ns_a, ns_b)):
                eng = Engine(keys[i], unique("wmw"), listen_port=PORT, workers=workers[i])
                call_in(ns, eng.start)
                engines.append(eng)
                call_in(ns, lambda eng=eng, i=i: eng.set_addresses([f"10.212.0.{i + 1}/24"]))
            engines[0].set_peers(
                [PeerConfig(pubs[1], allowed_ips=("10.212.0.2/32",), endpoint=("10.211.0.2", PORT))]
            )
            engines[1].set_peers([PeerConfig(pubs[0], allowed_ips=("10.212.0.1/32",))])
            yield ns_a, ns_b, engines[0], engines[1]
        finally:
            for eng, ns in zip(engines, (ns_a, ns_b), strict=False):
                call_in(ns, eng.stop)


def tunnel_up(ns: str, address: str) -> bool:
    """The first ping crosses a handshake, and in worker mode the responder's first reply waits
    for its worker's report that the initiator's first packet arrived: under load that can take
    longer than one ping waits. Ping until one answer comes (a warm-up, not the behaviour tested)."""
    return wait_until(lambda: ping(ns, address, count=1).returncode == 0, 30.0)


def only_peer(engine: Engine) -> dict[str, object]:
    return next(iter(engine.status()["peers"].values()))


def test_workers_auto_is_one_receive_worker_with_two_cpus() -> None:
    assert resolve_workers("auto") == (1 if (os.cpu_count() or 1) >= 2 else 0)
    assert resolve_workers("0") == 0
    with pytest.raises(ValueError):
        resolve_workers("3")


def test_ping_both_ways_through_receive_workers() -> None:
    with two_engines() as (ns_a, ns_b, a, b):
        assert ping(ns_a, "10.212.0.2").returncode == 0
        assert ping(ns_b, "10.212.0.1").returncode == 0
        assert a.worker_process is not None and b.worker_process is not None
        # The workers' decrypts reach the Device's counters (and so /metrics) through their stats.
        assert wait_until(lambda: int(only_peer(b)["rx_packets"]) >= 7)  # type: ignore[call-overload]
        assert wait_until(lambda: b.io["udp_receives"] >= 6)


def test_a_tcp_stream_arrives_intact_through_a_receive_worker() -> None:
    data = os.urandom(4 << 20)
    with two_engines() as (ns_a, ns_b, _a, b):
        assert tunnel_up(ns_a, "10.212.0.2")
        received = send_tcp_stream(ns_a, ns_b, "10.212.0.2", data)
        assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()
        assert wait_until(lambda: b.io["tun_writes"] < b.io["tun_packets_written"]), "GRO in the worker"


def test_rekey_hands_the_new_session_to_both_workers() -> None:
    with two_engines() as (ns_a, _ns_b, a, b):
        assert ping(ns_a, "10.212.0.2", count=2).returncode == 0
        # A responder ignores a peer's initiations that come within HANDSHAKE_INITIATION_RATE
        # (20 ms) of the last one (flood protection); the initiator then retries only after
        # REKEY_TIMEOUT (5 s). The first handshake may have completed a moment ago: a rekey forced
        # this soon would be ignored, so wait until it is older than that.
        assert wait_until(
            lambda: float(only_peer(b)["last_handshake_seconds_ago"] or 0.0) > 2 * HANDSHAKE_INITIATION_RATE
        )
        with a.lock:
            peer = next(iter(a.device.peers.values()))
            old = peer.current
            assert old is not None
            # Age the session past REKEY_AFTER_TIME: the next packet sent starts a rekey.
            old.created -= 1000.0
            old.send_rekey_deadline = 0.0
            peer.last_handshake_sent = float("-inf")
        assert ping(ns_a, "10.212.0.2", count=5).returncode == 0
        assert wait_until(lambda: only_peer(a)["handshakes_completed"] == 2)
        assert wait_until(lambda: only_peer(b)["handshakes_completed"] == 2)
        with a.lock:
            new = peer.current
        assert new is not None and new is not old
        b_peer = next(iter(b.device.peers.values()))

        def confirmed() -> bool:
            # b confirms its new (responder) session only when its worker's report of a's
            # first packet in it reaches b's Device: the report follows the handshake counters
            # by a moment (more under load), so it is awaited, not assumed.
            with b.lock:
                current = b_peer.current
                return b_peer.next is None and current is not None and current.remote_index == new.local_index

        assert wait_until(confirmed)
        with b.lock:
            b_current = b_peer.current
        assert b_current is not None and b_current.remote_index == new.local_index
        assert new.local_index in a.exported_sessions and b_current.local_index in b.exported_sessions
        assert ping(ns_a, "10.212.0.2", count=3).returncode == 0


def test_only_one_side_with_a_worker_interoperates() -> None:
    with two_engines(workers=(0, 1)) as (ns_a, ns_b, a, b):
        assert a.worker_process is None and b.worker_process is not None
        assert ping(ns_a, "10.212.0.2").returncode == 0
        assert ping(ns_b, "10.212.0.1").returncode == 0


def test_non_wireguard_datagrams_reach_the_other_handler_from_the_worker() -> None:
    with two_engines() as (ns_a, _ns_b, _a, b):
        got: list[tuple[bytes, tuple[str, int]]] = []

        class Recording(StaticPaths):
            def receive_other(self, data: bytes, address: tuple[str, int]) -> bool:
                got.append((data, address))
                return True

        b.paths = Recording()
        sock = call_in(ns_a, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        try:
            sock.sendto(b"disco-ish payload", ("10.211.0.2", PORT))
            assert wait_until(lambda: bool(got), 5)
        finally:
            sock.close()
        assert got[0][0] == b"disco-ish payload" and got[0][1][0] == "10.211.0.1"


def test_a_replayed_datagram_is_dropped_by_the_worker() -> None:
    with two_engines() as (ns_a, ns_b, _a, b):
        assert tunnel_up(ns_a, "10.212.0.2")
        # Capture one of a's transport datagrams on b's veth, then send it to b again.
        sniffer = call_in(
            ns_b, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
        )
        sniffer.settimeout(5)
        try:
            ping(ns_a, "10.212.0.2", count=1)
            while True:
                frame = sniffer.recv(2048)
                ihl = (frame[0] & 15) * 4
                if frame[9] == 17 and int.from_bytes(frame[ihl + 2 : ihl + 4], "big") == PORT:
                    payload = frame[ihl + 8 :]
                    if payload[:4] == b"\x04\x00\x00\x00" and len(payload) > 32:
                        break
        finally:
            sniffer.close()
        before = b.status()["drops"].get("replay", 0)
        sock = call_in(ns_a, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        try:
            sock.sendto(payload, ("10.211.0.2", PORT))
            assert wait_until(lambda: b.status()["drops"].get("replay", 0) == before + 1, 5)
        finally:
            sock.close()


def test_stop_ends_the_worker_process() -> None:
    with two_engines() as (ns_a, _ns_b, a, _b):
        assert a.worker_process is not None
        proc = a.worker_process
        call_in(ns_a, a.stop)
        assert proc.poll() is not None


def test_the_worker_filters_what_it_decrypts_with_the_engines_rules() -> None:
    with two_engines() as (ns_a, ns_b, _a, b):
        assert tunnel_up(ns_a, "10.212.0.2")
        b.packet_filter = flt = Filter([], allow_all=False)  # nobody may open a flow to b
        assert ping(ns_a, "10.212.0.2", count=2).returncode != 0
        assert wait_until(lambda: flt.drops["no_rule"] >= 2)  # the worker's counts come back
        # A flow b opens is b's: the replies its worker decrypts pass.
        assert ping(ns_b, "10.212.0.1", count=2).returncode == 0
        b.set_filter_rules([], allow_all=True)
        assert ping(ns_a, "10.212.0.2", count=2).returncode == 0
        assert flt.accepted > 0


def test_a_crashed_worker_falls_back_to_receiving_in_process_after_a_fresh_handshake() -> None:
    with two_engines() as (ns_a, _ns_b, a, _b):
        assert tunnel_up(ns_a, "10.212.0.2")
        assert a.worker_process is not None
        a.worker_process.kill()
        assert wait_until(lambda: a.drops["worker_exited"] == 1)
        # The first pings start the new handshake; then the tunnel works without the worker.
        assert wait_until(lambda: ping(ns_a, "10.212.0.2", count=1).returncode == 0, 20)
        assert wait_until(lambda: only_peer(a)["handshakes_completed"] == 2)
        assert ping(ns_a, "10.212.0.2", count=3).returncode == 0
