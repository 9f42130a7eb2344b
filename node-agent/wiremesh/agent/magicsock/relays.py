"""The DERP relay connections of one agent: the home region's, and others connected on demand to
reach a peer's home. Runs on magicsock's event loop; packets that arrive go to a RelayHandler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any, Protocol

from nacl.public import PrivateKey

from wiremesh.agent import bypass
from wiremesh.core.derp.connection import PacketReceived
from wiremesh.core.magicsock import Relay, choose_home_region
from wiremesh.core.magicsock.derpmap import Region

log = logging.getLogger("wiremesh.agent.magicsock")

DERP_CONNECT_TIMEOUT = 5.0
DERP_RETRY = 2.0  # a region whose connection failed is not tried again for this long
REGION_DOWN_FOR = 15.0  # a relay that was lost is not chosen as home for this long
RELAY_BACKLOG = 32  # packets held per region while it is being connected
RELAY_PING_INTERVAL = 4.0
RELAY_PING_TIMEOUT = 3.0


class RelayHandler(Protocol):
    def relayed(self, region: int, src: bytes, data: bytes) -> None:
        """A packet from peer `src` through `region`'s relay."""
        ...

    async def relay_closed(self, region: int, lost: bool) -> None:
        """`region`'s connection ended; `lost` unless we are stopping."""
        ...


class RelayPool:
    def __init__(self, node_private: PrivateKey, handler: RelayHandler, drops: Counter[str]) -> None:
        self.node_private = node_private
        self.handler = handler
        self.drops = drops
        self.counters: Counter[str] = Counter()
        self.regions: dict[int, Region] = {}
        self.clients: dict[int, Any] = {}  # region -> DerpClient
        self.region_down: dict[int, float] = {}  # region -> not before (monotonic)
        self.stopping = False
        self._connecting: dict[int, asyncio.Task[Any]] = {}
        self._backlog: dict[int, list[tuple[Relay, bytes]]] = {}
        self._readers: set[asyncio.Task[None]] = set()

    def connected(self) -> list[int]:
        return sorted(r for r, c in self.clients.items() if not c.closed)

    def down(self, now: float) -> set[int]:
        return {r for r, until in self.region_down.items() if until > now}

    def client(self, region: int | None) -> Any:
        client = self.clients.get(region) if region is not None else None
        return client if client is not None and not client.closed else None

    def send(self, dest: Relay, data: bytes, home: int | None) -> None:
        """Send through `dest`'s region, connecting it if needed (a few packets wait for that);
        failing that, through our home relay, where the peer may be too."""
        client = self.client(dest.region)
        if client is None:
            self.connect_soon(dest.region)
            if dest.region in self._connecting:
                # Hold a few packets (a handshake, a CallMeMaybe) until the relay is connected,
                # rather than losing them and waiting for WireGuard's 5 s retry.
                queue = self._backlog.setdefault(dest.region, [])
                if len(queue) < RELAY_BACKLOG:
                    queue.append((dest, data))
                    return
            client = self.client(home)
            if client is None:
                self.drops["relay_unavailable"] += 1
                return
        try:
            client.send_nowait(dest.node_key, data)
        except Exception:
            self.drops["relay_send_failed"] += 1

    def connect_soon(self, region: int) -> None:
        if region in self._connecting or region not in self.regions or self.stopping:
            return
        if self.region_down.get(region, 0.0) > time.monotonic():
            return
        self._connecting[region] = asyncio.ensure_future(self.connect(region))

    async def connect(self, region_id: int) -> Any:
        """The region's client, connecting it first if needed; None if that fails."""
        client = self.client(region_id)
        if client is not None:
            return client
        pending = self._connecting.get(region_id)
        if pending is not None and pending is not asyncio.current_task():
            with contextlib.suppress(Exception):
                return await asyncio.shield(pending)
            return None
        from wiremesh.agent.derpclient import DerpClient

        region = self.regions.get(region_id)
        if region is None:
            return None
        try:
            client = await DerpClient.connect(
                region.relay[0], region.relay[1], self.node_private, timeout=DERP_CONNECT_TIMEOUT
            )
        except Exception as exc:
            log.info("relay_connect_failed region=%s error=%s", region_id, exc)
            self.region_down[region_id] = time.monotonic() + DERP_RETRY
            return None
        finally:
            if self._connecting.get(region_id) is asyncio.current_task():
                del self._connecting[region_id]
            backlog = self._backlog.pop(region_id, [])
        self.clients[region_id] = client
        for dest, data in backlog:
            self.send(dest, data, None)
        self.region_down.pop(region_id, None)
        self.counters["relay_connects"] += 1
        log.info("relay_connected region=%s", region_id)
        reader = asyncio.create_task(self._read(region_id, client))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return client

    async def _read(self, region: int, client: Any) -> None:
        try:
            while True:
                event = await client.recv()
                if isinstance(event, PacketReceived):
                    self.handler.relayed(region, event.src, event.packet)
        except Exception as exc:
            if not self.stopping:
                self.counters["relay_lost"] += 1
                log.warning("relay_lost region=%s error=%s", region, exc)
        finally:
            if self.clients.get(region) is client:
                del self.clients[region]
        if not self.stopping:
            self.region_down[region] = time.monotonic() + REGION_DOWN_FOR
        await self.handler.relay_closed(region, lost=not self.stopping)

    async def elect_home(self, latency: dict[int, float], current: int | None) -> int | None:
        """The region to call home, connected: the fastest (choose_home_region's hysteresis
        included) or, if it cannot be reached, the next one that can; None to keep `current`."""
        down = self.down(time.monotonic())
        home = choose_home_region(latency, current, down)
        if home is None:
            candidates = [r for r in self.regions if r not in down] or list(self.regions)
            home = current if current in candidates else (min(candidates) if candidates else None)
        if home is None:
            return None
        if await self.connect(home) is not None or len(self.regions) <= 1:
            return home
        self.region_down[home] = time.monotonic() + REGION_DOWN_FOR
        for other in sorted(self.regions, key=lambda r: latency.get(r, 1e9)):
            if other != home and other not in down and await self.connect(other) is not None:
                return other
        return None

    async def latency(self, region: Region) -> float | None:
        """Round trip to the region's relay: a DERP ping if connected, else a TCP connect."""
        client = self.client(region.id)
        try:
            if client is None:
                started = time.monotonic()
                _, writer = await asyncio.wait_for(bypass.open_connection(*region.relay), 2.0)
                writer.close()
                return time.monotonic() - started
            return float(await client.ping(2.0))
        except Exception:
            return None

    async def watchdog(self) -> None:
        """Ping every connected relay: a NAT that forgot our TCP connection (rebinding) drops the
        relay's FIN, so a dead relay can look connected until we send something."""
        while not self.stopping:
            await asyncio.sleep(RELAY_PING_INTERVAL)
            for region, client in list(self.clients.items()):
                if client.closed:
                    continue
                try:
                    await client.ping(RELAY_PING_TIMEOUT)
                except Exception as exc:
                    log.info("relay_unresponsive region=%s error=%r", region, exc)
                    with contextlib.suppress(Exception):
                        await client.close()

    async def close(self) -> None:
        self.stopping = True
        for task in [*self._connecting.values(), *self._readers]:
            task.cancel()
        for client in list(self.clients.values()):
            with contextlib.suppress(Exception):
                await client.close()
        self.clients.clear()
