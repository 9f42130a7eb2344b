"""Replicas of one region over NATS: shared presence and cross-replica forwarding.

Each replica announces the node keys connected to it on DERP_PRESENCE; the others keep a
map key -> replica. A packet for a key connected elsewhere is published on that replica's
DERP_FORWARD subject as `src key | dst key | packet`. A replica that starts (or restarts)
asks the others to re-announce on DERP_PRESENCE_SYNC.

The hot path never awaits: forward() and announce() append to an outbox that one task
drains with nats-py's buffered publish, so a batch of packets costs one flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from wiremesh.core import bus
from wiremesh.derp.keyauth import KeyAuthority, decode_key, encode_key
from wiremesh.derp.relay import Relay

log = logging.getLogger("wiremesh.derp.mesh")

MAX_OUTBOX = 65536  # messages waiting for NATS; beyond this, forwards are dropped and counted


class Mesh:
    def __init__(self, nc: Any, relay: Relay, region: str, replica: str) -> None:
        self.nc = nc
        self.relay = relay
        self.region = region
        self.replica = replica
        self.remote: dict[bytes, str] = {}  # node key -> replica that has it
        self._presence_subject = bus.DERP_PRESENCE.format(region=region)
        self._sync_subject = bus.DERP_PRESENCE_SYNC.format(region=region)
        self._outbox: list[tuple[str, bytes]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subs: list[Any] = []

    async def start(self) -> None:
        self._subs.append(await self.nc.subscribe(self._presence_subject, cb=self._on_presence))
        self._subs.append(await self.nc.subscribe(self._sync_subject, cb=self._on_sync))
        fwd = bus.DERP_FORWARD.format(region=self.region, replica=self.replica)
        self._subs.append(await self.nc.subscribe(fwd, cb=self._on_forward))
        self._task = asyncio.create_task(self._drain(), name="derp-mesh-outbox")
        await self.nc.publish(self._sync_subject, self.replica.encode())
        await self.nc.flush()

    async def stop(self) -> None:
        for key in list(self.relay.clients):
            self.announce(key, False)
        await self._drain_once()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- outgoing ---------------------------------------------------------------------

    def announce(self, key: bytes, present: bool) -> None:
        message = bus.DerpPresence(self.region, self.replica, encode_key(key), present)
        self._enqueue(self._presence_subject, bus.encode(message))

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Send to the replica that has `dst`; False if no replica has it."""
        replica = self.remote.get(dst)
        if replica is None:
            return False
        if len(self._outbox) >= MAX_OUTBOX:
            self.relay.stats.drops["mesh_backlog"] += 1
            return True
        self._enqueue(bus.DERP_FORWARD.format(region=self.region, replica=replica), src + dst + packet)
        return True

    def _enqueue(self, subject: str, payload: bytes) -> None:
        self._outbox.append((subject, payload))
        self._wake.set()

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drain_once()

    async def _drain_once(self) -> None:
        while self._outbox:
            batch, self._outbox = self._outbox, []
            try:
                for subject, payload in batch:
                    await self.nc.publish(subject, payload)
            except Exception as exc:
                self.relay.stats.drops["mesh_publish_failed"] += len(batch)
                log.warning("NATS publish failed: %s", exc)

    # --- incoming ---------------------------------------------------------------------

    async def _on_presence(self, msg: Any) -> None:
        try:
            presence = bus.decode(bus.DerpPresence, msg.data)
            key = decode_key(presence.node_key)
        except ValueError as exc:
            log.warning("malformed presence message: %s", exc)
            return
        if presence.replica == self.replica or presence.region != self.region:
            return
        if presence.present:
            self.remote[key] = presence.replica
        elif self.remote.get(key) == presence.replica:
            del self.remote[key]

    async def _on_sync(self, msg: Any) -> None:
        if msg.data.decode(errors="replace") == self.replica:
            return
        for key in list(self.relay.clients):
            self.announce(key, True)

    async def _on_forward(self, msg: Any) -> None:
        data = msg.data
        if len(data) < 64:
            self.relay.stats.drops["mesh_malformed"] += 1
            return
        self.relay.deliver_from_mesh(data[:32], data[32:64], data[64:])


async def follow_registry(nc: Any, authority: KeyAuthority, *, timeout: float = 5.0) -> list[Any]:
    """Subscribe to key events, then fetch the full list (retrying until the registry answers)."""

    async def on_added(msg: Any) -> None:
        try:
            authority.apply_added(bus.decode(bus.NodeKeyEvent, msg.data))
        except ValueError as exc:
            log.warning("malformed %s: %s", bus.NODE_KEY_ADDED, exc)

    async def on_removed(msg: Any) -> None:
        try:
            authority.apply_removed(bus.decode(bus.NodeKeyEvent, msg.data))
        except ValueError as exc:
            log.warning("malformed %s: %s", bus.NODE_KEY_REMOVED, exc)

    subs = [
        await nc.subscribe(bus.NODE_KEY_ADDED, cb=on_added),
        await nc.subscribe(bus.NODE_KEY_REMOVED, cb=on_removed),
    ]
    authority.begin_sync()
    delay = 0.2
    while True:
        try:
            reply = await nc.request(bus.NODE_KEY_LIST, bus.encode(bus.NodeKeyListRequest()), timeout=timeout)
            authority.apply_list(bus.decode(bus.NodeKeyList, reply.data))
            log.info("key registry lists %d node keys", len(authority))
            return subs
        except ValueError as exc:
            log.warning("malformed node key list: %s", exc)
        except Exception as exc:
            log.warning("key registry not answering (%s); retrying", type(exc).__name__)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)
