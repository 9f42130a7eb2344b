"""The in-memory mesh: every node's record, its peer entry serialised once, who sees whom.

A change to one node costs work proportional to the nodes that see it: its peer entry is
rebuilt and serialised once, and each affected stream is only marked dirty. Streams build
their delta from the cached bytes when they next write, so a burst of changes coalesces
into one frame per stream.

Subnet prefixes approved on several nodes are elected (routes.py): only the primary carries
one in its allowed IPs, so a change of primary rebuilds both routers' entries (`take_entries_changed`).

Visibility is a hook (`_can_see` / `_candidates`): coord runs `PolicyMesh` (policy_store.py),
whose visible-peer sets come from the ACL policy compiler. The base class keeps two static
modes for tests of the incremental machinery: "all" (everyone sees everyone) and "user"
(nodes see their own user's nodes; tagged nodes see and are seen by everyone).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable

from wiremesh.coord.routes import RouteElection
from wiremesh.coord.store import NodeRecord
from wiremesh.core.netmap import Node

VISIBILITY_MODES = ("all", "user")


def peer_entry(record: NodeRecord, election: RouteElection | None = None) -> Node:
    """The node as its peers see it: its approved routes are in its allowed IPs only where it is
    the primary router (all of them without an election)."""
    addresses = (f"{record.ipv4}/32", f"{record.ipv6}/128")
    routed = tuple(r for r in record.approved_routes if election is None or election.is_primary(record.id, r))
    return Node(
        id=record.id,
        name=record.name,
        hostname=record.hostname,
        user=record.user,
        node_key=record.node_key,
        disco_key=record.disco_key,
        addresses=addresses,
        allowed_ips=addresses + routed,
        endpoints=record.endpoints,
        home_relay=record.home_relay,
        online=record.online,
        last_seen=record.last_seen,
        key_expiry=record.key_expiry,
        tags=record.tags,
        advertised_routes=record.advertised_routes,
        approved_routes=record.approved_routes,
        ephemeral=record.ephemeral,
        expired=record.expired,
    )


class Mesh:
    def __init__(self, visibility: str = "all") -> None:
        if visibility not in VISIBILITY_MODES:
            raise ValueError(f"visibility must be one of {VISIBILITY_MODES}")
        self.visibility = visibility
        self.records: dict[int, NodeRecord] = {}
        self.entries: dict[int, bytes] = {}  # node id -> its peer entry as JSON bytes
        self._by_user: dict[str, set[int]] = defaultdict(set)
        self._tagged: set[int] = set()
        self.election = RouteElection()
        # Other nodes whose peer entries an election moved a prefix to or from, since last taken.
        self.entries_changed: set[int] = set()

    def __len__(self) -> int:
        return len(self.records)

    def get(self, node_id: int) -> NodeRecord | None:
        return self.records.get(node_id)

    def by_node_key(self, node_key: str) -> NodeRecord | None:
        for record in self.records.values():
            if record.node_key == node_key:
                return record
        return None

    def _can_see(self, viewer: NodeRecord, peer: NodeRecord) -> bool:
        if viewer.id == peer.id or peer.expired:
            return False
        if self.visibility == "all":
            return True
        return viewer.user == peer.user or bool(viewer.tags) or bool(peer.tags)

    def _candidates(self, record: NodeRecord) -> Iterable[int]:
        """A superset of the nodes that may see `record` (or that it may see)."""
        if self.visibility == "all" or record.tags:
            return self.records.keys()
        return self._by_user[record.user] | self._tagged

    def viewers(self, record: NodeRecord) -> list[int]:
        """Ids of the nodes whose netmaps include `record`."""
        if record.expired:
            return []
        out = []
        for node_id in self._candidates(record):
            other = self.records.get(node_id)
            if other is not None and self._can_see(other, record):
                out.append(node_id)
        return out

    def peers_of(self, node_id: int) -> list[int]:
        record = self.records.get(node_id)
        if record is None:
            return []
        out = []
        for other_id in self._candidates(record):
            other = self.records.get(other_id)
            if other is not None and self._can_see(record, other):
                out.append(other_id)
        out.sort()
        return out

    def can_see(self, viewer_id: int, peer_id: int) -> bool:
        viewer, peer = self.records.get(viewer_id), self.records.get(peer_id)
        return viewer is not None and peer is not None and self._can_see(viewer, peer)

    def upsert(self, record: NodeRecord) -> set[int]:
        """Store the record; returns the nodes whose netmaps must change (old and new viewers)."""
        old = self.records.get(record.id)
        affected = set(self.viewers(old)) if old is not None else set()
        if old is not None:
            self._unindex(old)
        self.records[record.id] = record
        self._by_user[record.user].add(record.id)
        if record.tags:
            self._tagged.add(record.id)
        self._elect(record.id, old.approved_routes if old is not None else ())
        self._serialise(record)
        affected.update(self.viewers(record))
        if old is not None and (
            old.tags != record.tags or old.user != record.user or old.expired != record.expired
        ):
            # What this node itself may see changed too: its own netmap must be rebuilt.
            affected.add(record.id)
        return affected

    def remove(self, node_id: int) -> set[int]:
        old = self.records.get(node_id)
        if old is None:
            return set()
        affected = set(self.viewers(old))
        self._unindex(old)
        del self.records[node_id]
        self.entries.pop(node_id, None)
        self._elect(node_id, old.approved_routes)
        return affected

    def _serialise(self, record: NodeRecord) -> None:
        entry = peer_entry(record, self.election).to_json()
        self.entries[record.id] = json.dumps(entry, separators=(",", ":")).encode()

    def _elect(self, node_id: int, old_routes: tuple[str, ...]) -> None:
        """Re-elect the prefixes the node routes (or routed); other routers that gained or lost
        a prefix get their entries rebuilt and are noted in entries_changed."""
        for other in self.election.update(self.records, node_id, old_routes):
            record = self.records.get(other)
            if other != node_id and record is not None:
                self._serialise(record)
                self.entries_changed.add(other)

    def take_entries_changed(self) -> set[int]:
        changed, self.entries_changed = self.entries_changed, set()
        return changed

    def primary_routes(self, node_id: int) -> tuple[str, ...]:
        record = self.records.get(node_id)
        if record is None:
            return ()
        return tuple(r for r in record.approved_routes if self.election.is_primary(node_id, r))

    def _unindex(self, record: NodeRecord) -> None:
        self._by_user[record.user].discard(record.id)
        if not self._by_user[record.user]:
            del self._by_user[record.user]
        self._tagged.discard(record.id)

    def self_entry(self, node_id: int) -> bytes:
        return self.entries[node_id]
