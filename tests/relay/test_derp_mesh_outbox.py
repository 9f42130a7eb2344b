"""The cross-replica outbox is bounded in bytes: while NATS does not take packets (here: the
nats-server process is stopped with SIGSTOP), a replica queues at most --mesh-outbox-bytes of
them for the other replicas and drops (and counts) the rest, instead of growing without bound."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nacl.public import PrivateKey
from relay_helpers import RegistryStandIn, free_port

from wiremesh.agent.derpclient import DerpClient
from wiremesh.lab.support import nats_server_binary

pytestmark = pytest.mark.timeout(120)
OUTBOX = 1 << 20


@pytest.fixture
def stoppable_nats(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-l", str(tmp_path / "nats.log")]
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "nats-server did not start"
                time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        proc.wait(10)


async def test_packets_for_another_replica_queue_only_up_to_the_byte_bound(
    stoppable_nats, start_relay
) -> None:
    url, nats_proc = stoppable_nats
    nc = await nats.connect(url)
    registry = RegistryStandIn(nc)
    await registry.start()
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
    os.kill(nats_proc.pid, signal.SIGSTOP)  # NATS takes nothing more (well within the 6 s lease)
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
        os.kill(nats_proc.pid, signal.SIGCONT)
    await ca.close()
    await cb.close()
    await nc.close()
