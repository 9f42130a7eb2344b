"""Replicas of one region over NATS: shared presence and cross-replica forwarding.

Each replica announces the node keys connected to it on DERP_PRESENCE; the others keep a
map key -> replica. Packets for a key connected elsewhere are published on that replica's
DERP_FORWARD subject, several per NATS message: records of `u32 BE length | src key | dst
key | packet` (length counts keys and packet). A replica that starts (or restarts) asks the
others to re-announce on DERP_PRESENCE_SYNC.

The hot path never awaits: forward() and announce() append to an outbox that one task
drains; packets queued for the same replica meanwhile travel in one NATS message, because
per-message cost in nats-py, not bytes, is what limits cross-replica throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from typing import Any

from wiremesh.core import bus
from wiremesh.derp.keyauth import KeyAuthority, decode_key, encode_key
from wiremesh.derp.relay import Relay

log = logging.getLogger("wiremesh.derp.mesh")

MAX_OUTBOX = 65536  # messages waiting for NATS; beyond this, forwards are dropped and counted
MAX_BATCH_BYTES = 512 << 10  # well under NATS's default 1 MiB max payload
_RECORD = struct.Struct("!I")


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
        self._forwards: dict[str, list[bytes]] = {}  # replica -> flat records (4 parts each)
        self._forward_count = 0
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
        if self._forward_count >= MAX_OUTBOX:
            self.relay.stats.drops["mesh_backlog"] += 1
            return True
        records = self._forwards.get(replica)
        if records is None:
            records = self._forwards[replica] = []
        records.append(_RECORD.pack(64 + len(packet)))
        records.append(src)
        records.append(dst)
        records.append(packet)
        self._forward_count += 1
        self._wake.set()
        return True

    def _enqueue(self, subject: str, payload: bytes) -> None:
        self._outbox.append((subject, payload))
        self._wake.set()

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drain_once()

    def _take_forwards(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        for replica, records in self._forwards.items():
            subject = bus.DERP_FORWARD.format(region=self.region, replica=replica)
            batch: list[bytes] = []
            size = 0
            for i in range(0, len(records), 4):
                record = records[i : i + 4]
                record_len = 4 + 64 + len(record[3])
                if batch and size + record_len > MAX_BATCH_BYTES:
                    out.append((subject, b"".join(batch)))
                    batch, size = [], 0
                batch.extend(record)
                size += record_len
            if batch:
                out.append((subject, b"".join(batch)))
        self._forwards.clear()
        self._forward_count = 0
        return out

    async def _drain_once(self) -> None:
        while self._outbox or self._forwards:
            # Presence first, so a peer learns where a key is before packets for it arrive.
            batch, self._outbox = self._outbox, []
            batch += self._take_forwards()
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
        view = memoryview(data)
        offset, end = 0, len(data)
        relay = self.relay
        while offset < end:
            if end - offset < 4 + 64:
                relay.stats.drops["mesh_malformed"] += 1
                break
            (length,) = _RECORD.unpack_from(data, offset)
            stop = offset + 4 + length
            if length < 64 or stop > end:
                relay.stats.drops["mesh_malformed"] += 1
                break
            start = offset + 4
            relay.deliver_from_mesh(
                bytes(view[start : start + 32]),
                bytes(view[start + 32 : start + 64]),
                bytes(view[start + 64 : stop]),
            )
            offset = stop
        relay.flush()


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
