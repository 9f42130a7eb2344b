"""Replica presence leases with real parts: nats-server, one relay replica in-process and one as a
process we SIGKILL (no clean shutdown, so no "absent" messages ever leave it)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from nacl.public import PrivateKey
from prometheus_client.parser import text_string_to_metric_families
from relay_helpers import RegistryStandIn, StartRelay, with_bus_credential

from wiremesh.agent.derpclient import DerpClient
from wiremesh.core.derp import frames
from wiremesh.core.derp.connection import Event, PacketReceived
from wiremesh.derp.server import DerpService

pytestmark = pytest.mark.timeout(90)

INTERVAL = "0.5"  # presence beats, seconds
LEASE = 3.0  # six missed beats: a loaded test machine must not expire a live replica
MARGIN = 10.0  # beyond the lease, for a loaded machine


class RelayProcess:
    def __init__(self, proc: subprocess.Popen[str], derp_port: int, admin_port: int) -> None:
        self.proc = proc
        self.derp_port = derp_port
        self.admin_port = admin_port

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


StartProcess = Callable[..., Awaitable[RelayProcess]]


@pytest.fixture
async def relay_process(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[StartProcess]:
    procs: list[subprocess.Popen[str]] = []

    async def start(*extra: str) -> RelayProcess:
        n = len(procs)
        log = (tmp_path / f"derp-process{n}.log").open("w")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "wiremesh.derp.server",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--key-file",
                str(tmp_path / f"process{n}.key"),
                *with_bus_credential(request, extra),
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
        procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        ready = json.loads(line)
        return RelayProcess(proc, ready["derp_ports"][0], ready["admin_port"])

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def next_matching(client: DerpClient, wanted: Callable[[Event], bool], timeout: float) -> Event:
    """The first event that matches, skipping others (keepalives, pings), before the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        event = await client.recv(max(0.01, deadline - time.monotonic()))
        if wanted(event):
            return event


async def metrics(service: DerpService) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{service.admin_port}/metrics")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def two_replicas(
    registry: RegistryStandIn,
    start_relay: StartRelay,
    relay_process: StartProcess,
    nats_url: str,
    lease: float = LEASE,
) -> tuple[DerpService, RelayProcess]:
    common = ["--nats", nats_url, "--region", "eu", "--presence-interval", INTERVAL, "--presence-lease"]
    r1 = await start_relay(*common, str(lease), "--replica-id", "eu-1")
    r2 = await relay_process(*common, str(lease), "--replica-id", "eu-2")
    await eventually(lambda: "eu-2" in r1.mesh.table.peers)
    return r1, r2


async def a_talks_to_b_across(
    r1: DerpService, r2: RelayProcess, a: PrivateKey, b: PrivateKey
) -> tuple[DerpClient, DerpClient]:
    ca = await DerpClient.connect("127.0.0.1", r1.derp_ports[0], a)
    cb = await DerpClient.connect("127.0.0.1", r2.derp_port, b)
    await eventually(lambda: r1.mesh.remote.get(bytes(b.public_key)) == "eu-2")
    await ca.send(bytes(b.public_key), b"across replicas")
    got = await next_matching(cb, lambda e: isinstance(e, PacketReceived), 10)
    assert isinstance(got, PacketReceived) and got.packet == b"across replicas"
    return ca, cb


def peer_gone_for(key: PrivateKey) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, frames.PeerGone) and e.key == bytes(key.public_key)


async def test_sender_gets_peer_gone_when_the_peers_replica_is_killed(
    registry, start_relay, relay_process, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1, r2 = await two_replicas(registry, start_relay, relay_process, nats_url)
    ca, cb = await a_talks_to_b_across(r1, r2, a, b)
    r2.kill()
    event = await next_matching(ca, peer_gone_for(b), LEASE + MARGIN)
    assert event == frames.PeerGone(bytes(b.public_key), frames.PeerGoneReason.DISCONNECTED)
    assert r1.mesh.remote.get(bytes(b.public_key)) is None
    await ca.close()
    await cb.close()


async def test_sends_to_a_key_lost_with_a_killed_replica_are_dropped_and_counted(
    registry, start_relay, relay_process, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1, r2 = await two_replicas(registry, start_relay, relay_process, nats_url)
    ca, cb = await a_talks_to_b_across(r1, r2, a, b)
    before = await metrics(r1)
    assert before[("derp_mesh_replicas_alive", ())] == 1
    assert before[("derp_mesh_remote_keys", ())] == 1
    r2.kill()
    await next_matching(ca, peer_gone_for(b), LEASE + MARGIN)
    await ca.send(bytes(b.public_key), b"into the void")
    await eventually(lambda: r1.relay.stats.drops["peer_lease_expired"] == 1)
    seen = await metrics(r1)
    assert seen[("derp_packets_dropped_total", (("reason", "peer_lease_expired"),))] == 1
    assert seen[("derp_mesh_leases_expired_total", ())] == 1
    assert seen[("derp_mesh_replicas_alive", ())] == 0
    assert seen[("derp_mesh_remote_keys", ())] == 0
    await ca.close()
    await cb.close()


async def test_a_client_of_the_killed_replica_reconnects_to_the_survivor(
    registry, start_relay, relay_process, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1, r2 = await two_replicas(registry, start_relay, relay_process, nats_url)
    ca, cb = await a_talks_to_b_across(r1, r2, a, b)
    r2.kill()
    await next_matching(ca, peer_gone_for(b), LEASE + MARGIN)
    cb_again = await DerpClient.connect("127.0.0.1", r1.derp_ports[0], b)
    await ca.send(bytes(b.public_key), b"found you")
    got = await next_matching(cb_again, lambda e: isinstance(e, PacketReceived), 10)
    assert isinstance(got, PacketReceived) and got.packet == b"found you"
    for client in (ca, cb, cb_again):
        await client.close()


async def test_a_client_that_reconnects_before_the_lease_runs_out_is_not_expired_with_it(
    registry, start_relay, relay_process, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1, r2 = await two_replicas(registry, start_relay, relay_process, nats_url, lease=6.0)
    ca, cb = await a_talks_to_b_across(r1, r2, a, b)
    r2.kill()
    cb_again = await DerpClient.connect("127.0.0.1", r1.derp_ports[0], b)
    assert r1.mesh.table.replicas_expired == 0, "the lease ran out before the client reconnected"
    await eventually(lambda: r1.mesh.table.replicas_expired == 1, 6.0 + MARGIN)
    await ca.send(bytes(b.public_key), b"still here")
    got = await next_matching(cb_again, lambda e: isinstance(e, PacketReceived), 10)
    assert isinstance(got, PacketReceived) and got.packet == b"still here"
    assert r1.mesh.peer_gone_sent == 0 and r1.mesh.table.keys_expired == 0
    for client in (ca, cb, cb_again):
        await client.close()


# --- both replicas in-process: faster, for what needs no crash --------------------------------


async def in_process_pair(start_relay: StartRelay, nats_url: str) -> tuple[DerpService, DerpService]:
    common = ["--nats", nats_url, "--region", "eu", "--presence-interval", INTERVAL, "--presence-lease"]
    r1 = await start_relay(*common, str(LEASE), "--replica-id", "eu-1")
    r2 = await start_relay(*common, str(LEASE), "--replica-id", "eu-2")
    await eventually(lambda: "eu-2" in r1.mesh.table.peers and "eu-1" in r2.mesh.table.peers)
    return r1, r2


async def test_a_client_moving_to_another_replica_closes_its_old_connection(
    registry, start_relay, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1, r2 = await in_process_pair(start_relay, nats_url)
    ca = await DerpClient.connect("127.0.0.1", r1.derp_ports[0], a)
    old = await DerpClient.connect("127.0.0.1", r2.derp_ports[0], b)
    await eventually(lambda: r1.mesh.remote.get(bytes(b.public_key)) == "eu-2")
    new = await DerpClient.connect("127.0.0.1", r1.derp_ports[0], b)
    await old.wait_closed(10)
    assert r2.relay.stats.closes["replaced_elsewhere"] == 1
    await ca.send(bytes(b.public_key), b"to the newest")
    got = await next_matching(new, lambda e: isinstance(e, PacketReceived), 10)
    assert isinstance(got, PacketReceived) and got.packet == b"to the newest"
    assert r1.mesh.peer_gone_sent == 0
    for client in (ca, old, new):
        await client.close()


async def test_sender_gets_peer_gone_when_the_peer_leaves_another_replica(
    registry, start_relay, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1, r2 = await in_process_pair(start_relay, nats_url)
    ca = await DerpClient.connect("127.0.0.1", r1.derp_ports[0], a)
    cb = await DerpClient.connect("127.0.0.1", r2.derp_ports[0], b)
    await eventually(lambda: r1.mesh.remote.get(bytes(b.public_key)) == "eu-2")
    await ca.send(bytes(b.public_key), b"hi")
    await next_matching(cb, lambda e: isinstance(e, PacketReceived), 10)
    await cb.close()
    event = await next_matching(ca, peer_gone_for(b), 10)
    assert event == frames.PeerGone(bytes(b.public_key), frames.PeerGoneReason.DISCONNECTED)
    await ca.close()


async def test_malformed_presence_message_is_counted_and_ignored(
    registry, start_relay, nats_url, nats_server
) -> None:
    r1, _ = await in_process_pair(start_relay, nats_url)
    nc = await nats_server.connect("derp")  # a replica that sends garbage
    try:
        await nc.publish("wiremesh.derp.eu.lease.delta", b'{"region": "eu", "replica": 7}')
        await nc.publish("wiremesh.derp.eu.lease.beat", b"\xff\x00garbage")
        await nc.flush()
        await eventually(lambda: r1.mesh.malformed == 2)
    finally:
        await nc.close()
    assert "eu-2" in r1.mesh.table.peers


def test_relay_refuses_a_lease_not_longer_than_the_beat_interval(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wiremesh.derp.server",
            "--allow-keys-file",
            str(tmp_path / "none"),
            "--presence-interval",
            "2",
            "--presence-lease",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--presence-lease must be longer" in result.stderr


async def test_a_replica_that_was_cut_off_comes_back_with_its_full_set(
    registry, start_relay, relay_process, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1, r2 = await two_replicas(registry, start_relay, relay_process, nats_url)
    ca, cb = await a_talks_to_b_across(r1, r2, a, b)
    r2.proc.send_signal(signal.SIGSTOP)  # silent past its lease, connections and all kept
    try:
        await next_matching(ca, peer_gone_for(b), LEASE + MARGIN)
    finally:
        r2.proc.send_signal(signal.SIGCONT)
    await eventually(lambda: r1.mesh.remote.get(bytes(b.public_key)) == "eu-2", 2 * LEASE + MARGIN)
    await ca.send(bytes(b.public_key), b"welcome back")
    got = await next_matching(cb, lambda e: isinstance(e, PacketReceived), 10)
    assert isinstance(got, PacketReceived) and got.packet == b"welcome back"
    await ca.close()
    await cb.close()


async def test_a_replica_that_stops_cleanly_is_forgotten_without_waiting_for_its_lease(
    registry, start_relay, nats_url
) -> None:
    r1, r2 = await in_process_pair(start_relay, nats_url)
    await r2.stop()
    await eventually(lambda: "eu-2" not in r1.mesh.table.peers)
    assert r1.mesh.table.replicas_expired == 0
