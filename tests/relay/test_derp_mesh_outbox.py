"""The cross-replica outbox is bounded in bytes: while NATS does not take packets (here: the
nats-server process is stopped with SIGSTOP), a replica queues at most --mesh-outbox-bytes of
them for the other replicas and drops (and counts) the rest, instead of growing without bound."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from fixtures_services import NatsServer
from nacl.public import PrivateKey
from relay_helpers import RegistryStandIn, StartRelay

from wiremesh.agent.derpclient import DerpClient

pytestmark = pytest.mark.timeout(120)
OUTBOX = 1 << 20


async def test_packets_for_another_replica_queue_only_up_to_the_byte_bound(
    nats_server: NatsServer, registry: RegistryStandIn, start_relay: StartRelay
) -> None:
    url = nats_server.url
    assert nats_server.proc is not None
    nats_pid = nats_server.proc.pid
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    common = ("--nats", url, "--region", "eu", "--rate-bytes-per-second", "0")
    r1 = await start_relay(*common, "--replica-id", "eu-1", "--mesh-outbox-bytes", str(OUTBOX))
    r2 = await start_relay(*common, "--replica-id", "eu-2")
    ca = await DerpClient.connect("127.0.0.1", r1.derp_ports[0], a)
    cb = await DerpClient.connect("127.0.0.1", r2.derp_ports[0], b)
    deadline = time.monotonic() + 10
    while bytes(b.public_key) not in r1.mesh.remote:
        assert time.monotonic() < deadline, "replica eu-1 never heard of b"
        await asyncio.sleep(0.02)
    os.kill(nats_pid, signal.SIGSTOP)  # NATS takes nothing more (well within the 6 s lease)
    try:
        packet = os.urandom(60 << 10)
        for _ in range(50):  # 3 MB of packets each round; NATS' client buffers ~2 MB, then blocks
            for _ in range(50):
                ca.send_nowait(bytes(b.public_key), packet)
            await ca._writer.drain()
            await asyncio.sleep(0.01)
            if r1.relay.stats.drops["mesh_backlog"]:
                break
        assert r1.relay.stats.drops["mesh_backlog"] > 0
        assert r1.mesh.outbox_bytes <= OUTBOX
    finally:
        os.kill(nats_pid, signal.SIGCONT)
    await ca.close()
    await cb.close()
