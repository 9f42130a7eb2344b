"""Fixtures for the relay tests: a real nats-server, a key registry stand-in speaking the
registry's NATS subjects, and in-process relay replicas on loopback."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from relay_helpers import RegistryStandIn, StartRelay, free_port

from wiremesh.derp.server import DerpService, build_parser
from wiremesh.lab.support import nats_server_binary


@pytest.fixture
def nats_url(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-l", str(tmp_path / "nats.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nats-server did not start") from None
                time.sleep(0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def registry(nats_url: str) -> AsyncIterator[RegistryStandIn]:
    nc = await nats.connect(nats_url)
    stand_in = RegistryStandIn(nc)
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await nc.close()


@pytest.fixture
async def start_relay(tmp_path: Path) -> AsyncIterator[StartRelay]:
    services: list[DerpService] = []

    async def start(*extra: str, key_file: Path | None = None, wait_synced: bool = True) -> DerpService:
        n = len(services)
        argv = [
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--key-file",
            str(key_file or tmp_path / f"derp{n}.key"),
            *extra,
        ]
        args = build_parser().parse_args(argv)
        service = DerpService(args)
        services.append(service)
        await asyncio.wait_for(service.start(), 20)
        if wait_synced and "--nats" in extra and "--allow-keys-file" not in extra:
            deadline = time.monotonic() + 10
            while not service.authority.synced and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        return service

    try:
        yield start
    finally:
        for service in services:
            await service.stop()
