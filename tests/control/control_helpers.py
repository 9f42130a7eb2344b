"""Helpers for control-plane tests: simulated agents built on the real client library."""

from __future__ import annotations

import dataclasses

from wiremesh.agent.control import ControlClient, LoginResult, NetmapWatcher
from wiremesh.core import crypto


@dataclasses.dataclass
class SimAgent:
    client: ControlClient
    node_key_private: bytes
    disco_key_private: bytes
    hostname: str
    login_result: LoginResult | None = None
    watcher: NetmapWatcher | None = None

    @property
    def node_key(self) -> str:
        return crypto.encode_key(crypto.public_key(self.node_key_private))

    @property
    def disco_key(self) -> str:
        return crypto.encode_key(crypto.public_key(self.disco_key_private))

    async def login(
        self, auth_key: str = "", routes: tuple[str, ...] = (), tags: tuple[str, ...] = ()
    ) -> LoginResult:
        self.login_result = await self.client.login(
            self.node_key,
            self.disco_key,
            self.hostname,
            auth_key=auth_key,
            advertised_routes=routes,
            request_tags=tags,
        )
        return self.login_result

    def watch(self, keepalive: float = 2.0) -> NetmapWatcher:
        self.watcher = NetmapWatcher(self.client, self.node_key, keepalive=keepalive).start()
        return self.watcher

    def rotate_node_key(self) -> None:
        self.node_key_private = crypto.generate_private_key()

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        await self.client.aclose()


def make_agent(url: str, hostname: str, machine_key: bytes | None = None) -> SimAgent:
    return SimAgent(
        client=ControlClient(url, machine_key or crypto.generate_private_key(), timeout=10),
        node_key_private=crypto.generate_private_key(),
        disco_key_private=crypto.generate_private_key(),
        hostname=hostname,
    )
