"""Replicas of one region over NATS: shared presence with leases and cross-replica forwarding.

Presence (the logic is the sans-I/O `PresenceTable` in presence.py; this is its adapter):
each replica publishes numbered deltas when a client connects or leaves, a beat every
`interval` seconds, and its full set when any replica asks on DERP_PRESENCE_SYNC, all on
`wiremesh.derp.{region}.lease.{beat,delta,full}`. One wildcard subscription receives them, so
a replica's messages are applied in the order it sent them. A replica silent for `lease`
seconds is expired: the keys it held are gone, clients here that talked to them get PeerGone,
and later sends to them are dropped and counted as `peer_lease_expired`.

Forwarding: packets for a key connected elsewhere are published on that replica's
DERP_FORWARD subject, several per NATS message: records of `u32 BE length | src key | dst
key | packet` (length counts keys and packet).

The hot path never awaits: forward() and announce() append to an outbox that one task
drains; packets queued for the same replica meanwhile travel in one NATS message, because
per-message cost in nats-py, not bytes, is what limits cross-replica throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from typing import Any

from wiremesh.core import bus
from wiremesh.core.derp import frames
from wiremesh.core.derp.frames import PeerGoneReason
from wiremesh.derp import presence
from wiremesh.derp.keyauth import KeyAuthority, encode_key
from wiremesh.derp.presence import KeyGone, LocalReplaced, PresenceTable, ReplicaExpired, SyncNeeded
from wiremesh.derp.relay import Relay

log = logging.getLogger("wiremesh.derp.mesh")

MAX_OUTBOX = 65536  # packets waiting for NATS; beyond this, forwards are dropped and counted
# Packet bytes waiting for NATS (plus at most the batch being published): a count alone would
# let 65536 packets of 64 KiB (4 GiB) pile up while NATS is slow or away.
DEFAULT_MAX_OUTBOX_BYTES = 16 << 20
MAX_BATCH_BYTES = 512 << 10  # well under NATS's default 1 MiB max payload
MAX_TALKERS = 4096  # clients here remembered per remote key, to tell them it is gone
LEASE_SUBJECT = bus.DERP_LEASE
_KINDS: dict[str, type[presence.Message]] = {
    "beat": presence.PresenceBeat,
    "delta": presence.PresenceDelta,
    "full": presence.PresenceFull,
}
_RECORD = struct.Struct("!I")


class Mesh:
    def __init__(
        self,
        nc: Any,
        relay: Relay,
        region: str,
        replica: str,
        *,
        interval: float = presence.DEFAULT_INTERVAL,
        lease: float = presence.DEFAULT_LEASE,
        max_outbox_bytes: int = DEFAULT_MAX_OUTBOX_BYTES,
    ) -> None:
        if interval <= 0 or lease <= interval:
            raise ValueError("the presence lease must be longer than the beat interval")
        self.nc = nc
        self.relay = relay
        self.region = region
        self.replica = replica
        self.interval = interval
        self.table = PresenceTable(region, replica, lease=lease)
        self.remote = self.table.remote  # node key -> replica that has it (the same dict)
        self.peer_gone_sent = 0
        self.malformed = 0
        # remote key -> clients here that sent to it or received from it
        self._talkers: dict[bytes, set[bytes]] = {}
        self._lease_subjects = {kind: LEASE_SUBJECT.format(region=region, kind=kind) for kind in _KINDS}
        self._sync_subject = bus.DERP_PRESENCE_SYNC.format(region=region)
        self._outbox: list[tuple[str, bytes]] = []
        self._full_queued = False
        self._forwards: dict[str, list[bytes]] = {}  # replica -> flat records (4 parts each)
        self._forward_count = 0
        self._forward_bytes = 0
        self.max_outbox_bytes = max_outbox_bytes
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._stopped = False

    async def start(self) -> None:
        lease_all = LEASE_SUBJECT.format(region=self.region, kind="*")
        self._subs.append(await self.nc.subscribe(lease_all, cb=self._on_lease))
        self._subs.append(await self.nc.subscribe(self._sync_subject, cb=self._on_sync))
        fwd = bus.DERP_FORWARD.format(region=self.region, replica=self.replica)
        self._subs.append(await self.nc.subscribe(fwd, cb=self._on_forward))
        # The outbox drain first: stop() ends the lease ticker before it and the drain after it.
        self._tasks.append(asyncio.create_task(self._drain(), name="derp-mesh-outbox"))
        self._tasks.append(asyncio.create_task(self._tick(), name="derp-mesh-lease"))
        await self.nc.publish(self._sync_subject, self.replica.encode())
        await self.nc.flush()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        # No beat may follow the goodbye, or the others would take us for alive again.
        for task in self._tasks[1:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for key in list(self.relay.clients):
            self.announce(key, False)
        self._enqueue(self._lease_subjects["beat"], bus.encode(self.table.goodbye()))
        await self._drain_once()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        for task in self._tasks[:1]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def abandon(self) -> None:
        """Stop at once, without goodbyes (after stop() could not finish)."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()

    # --- outgoing ---------------------------------------------------------------------

    def announce(self, key: bytes, present: bool) -> None:
        if present:
            delta = self.table.connect(key, time.time())
            self._talkers.pop(key, None)  # it lives here now; local unregister tells its peers
        else:
            delta = self.table.disconnect(key, time.time())
        self._enqueue(self._lease_subjects["delta"], bus.encode(delta))

    def lapsed(self, key: bytes) -> bool:
        return key in self.table.lapsed

    def forward(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Send to the replica that has `dst`; False if no replica has it."""
        replica = self.remote.get(dst)
        if replica is None:
            return False
        talkers = self._talkers.get(dst)
        if talkers is None:
            talkers = self._talkers[dst] = set()
        if len(talkers) < MAX_TALKERS:
            talkers.add(src)
        size = 4 + 64 + len(packet)
        if self._forward_count >= MAX_OUTBOX or self._forward_bytes + size > self.max_outbox_bytes:
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
        self._forward_bytes += size
        self._wake.set()
        return True

    @property
    def outbox_bytes(self) -> int:
        """Packet bytes waiting for NATS (not counting the batch being published)."""
        return self._forward_bytes

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
        self._forward_bytes = 0
        return out

    async def _drain_once(self) -> None:
        while self._outbox or self._forwards:
            # Presence first, so a peer learns where a key is before packets for it arrive.
            batch, self._outbox = self._outbox, []
            self._full_queued = False
            batch += self._take_forwards()
            try:
                for subject, payload in batch:
                    await self.nc.publish(subject, payload)
            except Exception as exc:
                self.relay.stats.drops["mesh_publish_failed"] += len(batch)
                log.warning("NATS publish failed: %s", exc)

    # --- leases -----------------------------------------------------------------------

    async def _tick(self) -> None:
        clock = self.relay.clock
        next_beat = clock()
        while True:
            now = clock()
            if now >= next_beat:
                self._enqueue(self._lease_subjects["beat"], bus.encode(self.table.beat()))
                next_beat = now + self.interval
            self._handle(self.table.expire(now))
            wake = next_beat
            deadline = self.table.next_deadline()
            if deadline is not None:
                wake = min(wake, deadline)
            await asyncio.sleep(max(0.01, wake - clock()))

    def _handle(self, events: list[presence.Event]) -> None:
        relay = self.relay
        for event in events:
            if isinstance(event, KeyGone):
                self._tell_gone(event.key)
            elif isinstance(event, ReplicaExpired):
                log.warning(
                    "replica %s silent for %.1f s: its lease expired with %d node keys",
                    event.replica,
                    self.table.lease,
                    event.keys,
                )
            elif isinstance(event, SyncNeeded):
                log.info("presence of replica %s out of step; asking for its full set", event.replica)
                self._enqueue(self._sync_subject, self.replica.encode())
            elif isinstance(event, LocalReplaced):
                proto = relay.clients.pop(event.key, None)
                if proto is not None:
                    log.info(
                        "node key %s connected to replica %s more recently; closing ours",
                        encode_key(event.key),
                        event.replica,
                    )
                    self.announce(event.key, False)
                    # Out of the table already, so closing it tells no peer that the key left.
                    proto.close("replaced_elsewhere")
        relay.flush()

    def _tell_gone(self, key: bytes) -> None:
        talkers = self._talkers.pop(key, None)
        if not talkers:
            return
        gone = frames.encode(frames.PeerGone(key, PeerGoneReason.DISCONNECTED))
        clients = self.relay.clients
        for talker in talkers:
            proto = clients.get(talker)
            if proto is None:
                continue
            proto.write_frame(gone)
            self.peer_gone_sent += 1
            if len(proto.told_gone) < 4096:
                proto.told_gone.add(key)  # told once; no NOT_HERE again on its next send

    # --- incoming ---------------------------------------------------------------------

    async def _on_lease(self, msg: Any) -> None:
        kind = msg.subject.rpartition(".")[2]
        cls = _KINDS.get(kind)
        if cls is None:
            self.malformed += 1
            return
        try:
            message = bus.decode(cls, msg.data)
            events = self.table.receive(message, self.relay.clock())
        except ValueError as exc:
            self.malformed += 1
            log.warning("malformed presence %s message: %s", kind, exc)
            return
        self._handle(events)

    async def _on_sync(self, msg: Any) -> None:
        if msg.data.decode(errors="replace") == self.replica or self._full_queued:
            return
        # Queued behind any deltas not yet sent, so the snapshot arrives after them, in order.
        self._full_queued = True
        for full in self.table.full_set():
            self._enqueue(self._lease_subjects["full"], bus.encode(full))

    async def _on_forward(self, msg: Any) -> None:
        data = msg.data
        view = memoryview(data)
        offset, end = 0, len(data)
        relay = self.relay
        remote, talkers_of = self.remote, self._talkers
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
            src = bytes(view[start : start + 32])
            dst = bytes(view[start + 32 : start + 64])
            if src in remote:
                # The receiver learns the sender is gone if the sender's replica dies.
                talkers = talkers_of.get(src)
                if talkers is None:
                    talkers = talkers_of[src] = set()
                if len(talkers) < MAX_TALKERS:
                    talkers.add(dst)
            relay.deliver_from_mesh(src, dst, bytes(view[start + 64 : stop]))
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
