"""Helpers shared by the relay tests (a module with a unique name, so that importing it
never depends on which conftest.py pytest loaded last)."""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nacl.public import PrivateKey

from wiremesh.core import bus
from wiremesh.derp.server import DerpService


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


StartRelay = Callable[..., Awaitable[DerpService]]


def with_bus_credential(request: pytest.FixtureRequest, extra: tuple[str, ...]) -> list[str]:
    """`extra` plus the relay's own NATS credential when it names a bus (looked up only then, so
    relays without NATS start no nats-server)."""
    if "--nats" not in extra or "--nats-credentials" in extra:
        return list(extra)
    server = request.getfixturevalue("nats_server")
    return [*extra, "--nats-credentials", server.credentials("derp")]
