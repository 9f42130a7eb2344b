"""Fixtures for the relay tests: a real nats-server (with the service roles' credentials), a key
registry stand-in speaking the registry's NATS subjects with the registry's credential, and
in-process relay replicas on loopback, each with the relay's credential."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fixtures_services import NatsServer
from relay_helpers import RegistryStandIn, StartRelay, with_bus_credential

from wiremesh.derp.server import DerpService, build_parser


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The URL of a real nats-server admitting only the service roles (fixtures_services)."""
    return nats_server.url


@pytest.fixture
async def registry(nats_server: NatsServer) -> AsyncIterator[RegistryStandIn]:
    nc = await nats_server.connect("keys")
    stand_in = RegistryStandIn(nc)
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await nc.close()


@pytest.fixture
async def start_relay(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[StartRelay]:
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
            *with_bus_credential(request, extra),
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
