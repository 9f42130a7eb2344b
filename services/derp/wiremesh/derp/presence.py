"""Replica presence with leases, sans-I/O: which replica of a region holds which node key.

Every replica keeps one `PresenceTable`. Its own changes come in as `connect`/`disconnect`
and go out as numbered `PresenceDelta` messages; every `interval` it sends a `PresenceBeat`
carrying its incarnation (random per process start) and its current generation (how many
deltas it has sent). What others hear comes in through `receive(message, now)`; time passes
through `expire(now)`. Out come `Event`s for the adapter and `lookup(key)` for forwarding.

Why leases: a replica killed without a clean shutdown sends no "absent" deltas, so its keys
would stay listed forever. A replica not heard from for `lease` seconds (3 missed beats by
default) loses everything it held, and the clients that talked to those keys are told.

Why generations: NATS is at-most-once. A beat or delta whose generation does not follow the
last one applied means a message was lost; the table asks (SyncNeeded) for that replica's
full set (`PresenceFull`, in chunks) and replaces what it held with it. A replica seen for the
first time at generation 0 (or delta 1) needs no sync: every incarnation starts empty.

Newest connection wins, across replicas too: deltas carry the wall-clock time the client
connected. A remote "present" for a key connected here that is newer than ours says the
client moved: `LocalReplaced` tells the adapter to drop ours quietly. The key index points
at whoever announced last, so the old replica's later departure or lease expiry leaves the
key where it now lives. Clock skew between replicas only matters for a key connected to two
replicas within the skew of each other; ties break by replica id, so exactly one side wins.
"""

from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict

from wiremesh.derp.keyauth import decode_key, encode_key

DEFAULT_INTERVAL = 2.0  # seconds between beats
DEFAULT_LEASE = 3 * DEFAULT_INTERVAL  # silent this long = gone
FULL_SET_CHUNK = 4096  # keys per PresenceFull message: ~190 KB of JSON, under NATS's 1 MiB
MAX_KEYS_PER_REPLICA = 1 << 18  # a peer claiming more is truncated (and logged by the adapter)
MAX_LAPSED = 4096  # keys remembered as lost to an expired lease, to label later drops
MAX_ID_LEN = 128  # replica ids and incarnations


# --- wire messages (JSON via wiremesh.core.bus.encode/decode) ----------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceBeat:
    region: str
    replica: str
    incarnation: str
    generation: int  # deltas sent by this incarnation so far
    count: int  # keys held now (for logs and a cheap sanity check)
    leaving: bool = False  # a clean shutdown: forget this replica now, not at its lease's end


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceDelta:
    region: str
    replica: str
    incarnation: str
    generation: int  # this delta's number: the previous one's + 1
    node_key: str
    present: bool
    at: float  # unix seconds the connection was made (present) or closed


@dataclasses.dataclass(frozen=True, slots=True)
class PresenceFull:
    region: str
    replica: str
    incarnation: str
    generation: int  # the snapshot's generation: the deltas it already includes
    part: int  # chunk number from 0
    last: bool
    keys: tuple[str, ...] = ()


Message = PresenceBeat | PresenceDelta | PresenceFull


# --- events ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class KeyGone:
    """No replica holds `key` any more; clients that talked to it should be told."""

    key: bytes
    replica: str  # the replica that held it
    reason: str  # "left" | "lease_expired" | "restarted" | "resynced"


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaExpired:
    replica: str
    keys: int


@dataclasses.dataclass(frozen=True, slots=True)
class SyncNeeded:
    """Ask `replica` (and everyone, it is one subject) for a full set."""

    replica: str


@dataclasses.dataclass(frozen=True, slots=True)
class LocalReplaced:
    """A newer connection for a key connected here exists on `replica`: drop ours."""

    key: bytes
    replica: str


Event = KeyGone | ReplicaExpired | SyncNeeded | LocalReplaced


# --- the table ---------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class _Peer:
    incarnation: str
    generation: int | None  # last applied; None = out of step, waiting for a full set
    last_heard: float
    keys: set[bytes] = dataclasses.field(default_factory=set)
    # a full set being assembled: (incarnation, generation, next part, keys so far)
    pending: tuple[str, int, int, set[bytes]] | None = None


class PresenceTable:
    def __init__(
        self,
        region: str,
        replica: str,
        *,
        lease: float = DEFAULT_LEASE,
        incarnation: str | None = None,
    ) -> None:
        if lease <= 0:
            raise ValueError("lease must be positive")
        self.region = region
        self.replica = replica
        self.lease = lease
        self.incarnation = incarnation or os.urandom(8).hex()
        self.generation = 0
        self.local: dict[bytes, float] = {}  # key -> unix time connected here
        self.remote: dict[bytes, str] = {}  # key -> replica to forward to (not for local keys' sake)
        self.peers: dict[str, _Peer] = {}
        self.lapsed: OrderedDict[bytes, None] = OrderedDict()
        self.replicas_expired = 0
        self.keys_expired = 0
        self.truncated = 0  # keys ignored past MAX_KEYS_PER_REPLICA

    # --- our own side ------------------------------------------------------------------

    def connect(self, key: bytes, at: float) -> PresenceDelta:
        self.local[key] = at
        self.lapsed.pop(key, None)
        # Ours is the newest connection for this key; an older one elsewhere is not where it lives.
        self.remote.pop(key, None)
        return self._delta(key, True, at)

    def disconnect(self, key: bytes, at: float) -> PresenceDelta:
        self.local.pop(key, None)
        return self._delta(key, False, at)

    def _delta(self, key: bytes, present: bool, at: float) -> PresenceDelta:
        self.generation += 1
        return PresenceDelta(
            self.region, self.replica, self.incarnation, self.generation, encode_key(key), present, at
        )

    def beat(self) -> PresenceBeat:
        return PresenceBeat(self.region, self.replica, self.incarnation, self.generation, len(self.local))

    def goodbye(self) -> PresenceBeat:
        """The last beat of a clean shutdown (after the deltas for every client leaving)."""
        return PresenceBeat(
            self.region, self.replica, self.incarnation, self.generation, len(self.local), leaving=True
        )

    def full_set(self) -> list[PresenceFull]:
        keys = [encode_key(k) for k in self.local]
        chunks = [keys[i : i + FULL_SET_CHUNK] for i in range(0, len(keys), FULL_SET_CHUNK)] or [[]]
        return [
            PresenceFull(
                self.region,
                self.replica,
                self.incarnation,
                self.generation,
                part,
                part == len(chunks) - 1,
                tuple(chunk),
            )
            for part, chunk in enumerate(chunks)
        ]

    # --- what the others say -------------------------------------------------------------

    def lookup(self, key: bytes) -> str | None:
        return self.remote.get(key)

    def alive(self) -> list[str]:
        return list(self.peers)

    def receive(self, message: Message, now: float) -> list[Event]:
        """Apply one message from the bus. Raises ValueError for a malformed one (nothing changes)."""
        if message.replica == self.replica or message.region != self.region:
            return []
        if len(message.replica) > MAX_ID_LEN or len(message.incarnation) > MAX_ID_LEN:
            raise ValueError("replica id or incarnation too long")
        if isinstance(message, PresenceDelta):
            return self._on_delta(message, decode_key(message.node_key), now)
        if isinstance(message, PresenceFull):
            keys = [decode_key(text) for text in message.keys]
            return self._on_full(message, keys, now)
        return self._on_beat(message, now)

    def _peer(self, replica: str, incarnation: str, now: float, events: list[Event]) -> _Peer:
        """The entry for `replica`, fresh if it is new to us or restarted (its old keys go)."""
        peer = self.peers.get(replica)
        if peer is not None and peer.incarnation == incarnation:
            peer.last_heard = now
            return peer
        if peer is not None:
            # A new process under the same id: what the old one held died with it.
            for key in list(peer.keys):
                self._release(key, replica, "restarted", events)
        # Every incarnation starts empty at generation 0.
        fresh = _Peer(incarnation=incarnation, generation=0, last_heard=now)
        self.peers[replica] = fresh
        return fresh

    def _out_of_step(self, peer: _Peer, replica: str, events: list[Event]) -> None:
        if peer.generation is not None:
            peer.generation = None
            events.append(SyncNeeded(replica))

    def _on_beat(self, beat: PresenceBeat, now: float) -> list[Event]:
        events: list[Event] = []
        if beat.leaving:
            peer = self.peers.pop(beat.replica, None)
            if peer is not None and peer.incarnation == beat.incarnation:
                for key in peer.keys:
                    self._release(key, beat.replica, "left", events)
            elif peer is not None:
                self.peers[beat.replica] = peer  # an older process's goodbye: not about the current one
            return events
        peer = self._peer(beat.replica, beat.incarnation, now, events)
        if peer.generation is None:
            events.append(SyncNeeded(beat.replica))  # still waiting: ask again, once per beat
        elif peer.generation != beat.generation:
            self._out_of_step(peer, beat.replica, events)
        return events

    def _on_delta(self, delta: PresenceDelta, key: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        replica = delta.replica
        peer = self._peer(replica, delta.incarnation, now, events)
        # Apply it even when out of step: it is still the newest word on this key.
        if peer.generation is not None:
            if delta.generation == peer.generation + 1:
                peer.generation = delta.generation
            else:
                self._out_of_step(peer, replica, events)
        if delta.present:
            if not self._hold(peer, key):
                return events
            self.lapsed.pop(key, None)
            self.remote[key] = replica  # the newest announcement wins
            ours = self.local.get(key)
            if ours is not None and (delta.at, replica) > (ours, self.replica):
                events.append(LocalReplaced(key, replica))
        else:
            peer.keys.discard(key)
            self._release(key, replica, "left", events)
        return events

    def _on_full(self, full: PresenceFull, keys: list[bytes], now: float) -> list[Event]:
        events: list[Event] = []
        replica = full.replica
        peer = self._peer(replica, full.incarnation, now, events)
        pending = peer.pending
        if full.part == 0:
            pending = (full.incarnation, full.generation, 0, set())
        elif pending is None or pending[:3] != (full.incarnation, full.generation, full.part):
            peer.pending = None  # a chunk went missing; the next beat asks again
            return events
        incarnation, generation, part, gathered = pending
        for key in keys:
            if len(gathered) >= MAX_KEYS_PER_REPLICA:
                self.truncated += 1
                continue
            gathered.add(key)
        if not full.last:
            peer.pending = (incarnation, generation, part + 1, gathered)
            return events
        peer.pending = None
        for key in peer.keys - gathered:
            peer.keys.discard(key)
            self._release(key, replica, "resynced", events)
        for key in gathered:
            peer.keys.add(key)
            # A snapshot is older news than any delta: only fill in keys nobody else claims.
            if key not in self.remote and key not in self.local:
                self.remote[key] = replica
                self.lapsed.pop(key, None)
        peer.generation = generation
        return events

    def _hold(self, peer: _Peer, key: bytes) -> bool:
        if len(peer.keys) >= MAX_KEYS_PER_REPLICA and key not in peer.keys:
            self.truncated += 1
            return False
        peer.keys.add(key)
        return True

    def _release(self, key: bytes, replica: str, reason: str, events: list[Event]) -> None:
        """`replica` no longer holds `key`: point the index elsewhere, or report the key gone."""
        if self.remote.get(key) != replica:
            return  # it lives somewhere else (or here) by now
        del self.remote[key]
        if key in self.local:
            return
        for name, other in self.peers.items():
            if name != replica and key in other.keys:
                self.remote[key] = name
                return
        events.append(KeyGone(key, replica, reason))

    # --- time ----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        if not self.peers:
            return None
        return min(peer.last_heard for peer in self.peers.values()) + self.lease

    def expire(self, now: float) -> list[Event]:
        events: list[Event] = []
        for replica, peer in list(self.peers.items()):
            if now < peer.last_heard + self.lease:
                continue
            del self.peers[replica]
            self.replicas_expired += 1
            events.append(ReplicaExpired(replica, len(peer.keys)))
            for key in peer.keys:
                before = len(events)
                self._release(key, replica, "lease_expired", events)
                if len(events) > before:
                    self.keys_expired += 1
                    self.lapsed[key] = None
                    if len(self.lapsed) > MAX_LAPSED:
                        self.lapsed.popitem(last=False)
        return events
