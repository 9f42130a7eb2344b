"""Network map models: what coord tells one node about itself and the peers it may see.

A netmap is sent whole when a stream starts (and after every reconnect: full resync),
then kept current with `MapDelta`s. Everything here is JSON-serialisable through
`to_json()` / `from_json()`; peer entries are plain data so coord can serialise each
peer once and send the same bytes to every node that sees it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

JSON = dict[str, Any]


class NetmapError(ValueError):
    """A netmap or delta on the wire did not have the expected shape."""


@dataclasses.dataclass(frozen=True, slots=True)
class Node:
    """One node as others see it (and as it sees itself)."""

    id: int
    name: str  # unique name in the tailnet (hostname, suffixed if taken)
    hostname: str
    user: str
    node_key: str
    disco_key: str
    addresses: tuple[str, ...]  # "100.64.0.1/32", "fd7a:115c:a1e0::1/128"
    allowed_ips: tuple[str, ...]  # its addresses plus its approved routes
    endpoints: tuple[str, ...] = ()  # "ip:port" / "[ip6]:port"
    home_relay: int | None = None  # DERP region id, once a relay is chosen
    online: bool = False
    last_seen: float | None = None
    key_expiry: float | None = None  # unix seconds; None = never expires
    tags: tuple[str, ...] = ()
    advertised_routes: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()
    ephemeral: bool = False
    expired: bool = False

    def to_json(self) -> JSON:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Node:
        if not isinstance(raw, dict):
            raise NetmapError("node entry is not an object")
        try:
            return cls(
                id=_int(raw["id"]),
                name=str(raw["name"]),
                hostname=str(raw["hostname"]),
                user=str(raw["user"]),
                node_key=str(raw["node_key"]),
                disco_key=str(raw["disco_key"]),
                addresses=_strs(raw.get("addresses", [])),
                allowed_ips=_strs(raw.get("allowed_ips", [])),
                endpoints=_strs(raw.get("endpoints", [])),
                home_relay=None if raw.get("home_relay") is None else _int(raw["home_relay"]),
                online=bool(raw.get("online", False)),
                last_seen=_opt_float(raw.get("last_seen")),
                key_expiry=_opt_float(raw.get("key_expiry")),
                tags=_strs(raw.get("tags", [])),
                advertised_routes=_strs(raw.get("advertised_routes", [])),
                approved_routes=_strs(raw.get("approved_routes", [])),
                ephemeral=bool(raw.get("ephemeral", False)),
                expired=bool(raw.get("expired", False)),
            )
        except KeyError as exc:
            raise NetmapError(f"node entry lacks {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkMap:
    version: int
    self_node: Node
    peers: tuple[Node, ...] = ()
    derp_map: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # filled by the relay issue
    packet_filter: tuple[Mapping[str, Any], ...] = ()  # empty = allow all; filled by the ACL issue
    dns: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # wiremesh.core.dnsconfig, as JSON

    def peer(self, node_id: int) -> Node | None:
        for peer in self.peers:
            if peer.id == node_id:
                return peer
        return None

    def peer_by_key(self, node_key: str) -> Node | None:
        for peer in self.peers:
            if peer.node_key == node_key:
                return peer
        return None

    def to_json(self) -> JSON:
        return {
            "version": self.version,
            "self": self.self_node.to_json(),
            "peers": [p.to_json() for p in self.peers],
            "derp_map": dict(self.derp_map),
            "packet_filter": [dict(r) for r in self.packet_filter],
            "dns": dict(self.dns),
        }

    @classmethod
    def from_json(cls, raw: Any) -> NetworkMap:
        if not isinstance(raw, dict):
            raise NetmapError("netmap is not an object")
        try:
            peers = raw.get("peers", [])
            if not isinstance(peers, list):
                raise NetmapError("peers is not a list")
            return cls(
                version=_int(raw["version"]),
                self_node=Node.from_json(raw["self"]),
                peers=tuple(Node.from_json(p) for p in peers),
                derp_map=_obj(raw.get("derp_map", {})),
                packet_filter=tuple(_obj(r) for r in _list(raw.get("packet_filter", []))),
                dns=_obj(raw.get("dns", {})),
            )
        except KeyError as exc:
            raise NetmapError(f"netmap lacks {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class MapDelta:
    """What changed since the previous netmap on the same stream."""

    version: int
    self_node: Node | None = None
    peers_changed: tuple[Node, ...] = ()  # added or updated, whole entries
    peers_removed: tuple[int, ...] = ()
    derp_map: Mapping[str, Any] | None = None
    packet_filter: tuple[Mapping[str, Any], ...] | None = None

    def apply(self, netmap: NetworkMap) -> NetworkMap:
        if self.version <= netmap.version:
            raise NetmapError(f"delta version {self.version} does not follow {netmap.version}")
        gone = set(self.peers_removed) | {p.id for p in self.peers_changed}
        peers = [p for p in netmap.peers if p.id not in gone]
        peers.extend(self.peers_changed)
        peers.sort(key=lambda p: p.id)
        return NetworkMap(
            version=self.version,
            self_node=self.self_node or netmap.self_node,
            peers=tuple(peers),
            derp_map=netmap.derp_map if self.derp_map is None else self.derp_map,
            packet_filter=netmap.packet_filter if self.packet_filter is None else self.packet_filter,
            dns=netmap.dns,
        )

    def to_json(self) -> JSON:
        out: JSON = {"version": self.version}
        if self.self_node is not None:
            out["self"] = self.self_node.to_json()
        if self.peers_changed:
            out["peers_changed"] = [p.to_json() for p in self.peers_changed]
        if self.peers_removed:
            out["peers_removed"] = list(self.peers_removed)
        if self.derp_map is not None:
            out["derp_map"] = dict(self.derp_map)
        if self.packet_filter is not None:
            out["packet_filter"] = [dict(r) for r in self.packet_filter]
        return out

    @classmethod
    def from_json(cls, raw: Any) -> MapDelta:
        if not isinstance(raw, dict):
            raise NetmapError("delta is not an object")
        try:
            return cls(
                version=_int(raw["version"]),
                self_node=Node.from_json(raw["self"]) if "self" in raw else None,
                peers_changed=tuple(Node.from_json(p) for p in _list(raw.get("peers_changed", []))),
                peers_removed=tuple(_int(i) for i in _list(raw.get("peers_removed", []))),
                derp_map=_obj(raw["derp_map"]) if "derp_map" in raw else None,
                packet_filter=(
                    tuple(_obj(r) for r in _list(raw["packet_filter"])) if "packet_filter" in raw else None
                ),
            )
        except KeyError as exc:
            raise NetmapError(f"delta lacks {exc}") from exc


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise NetmapError(f"expected an integer, got {type(value).__name__}")
    return value


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise NetmapError(f"expected a number, got {type(value).__name__}")
    return float(value)


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise NetmapError(f"expected a list, got {type(value).__name__}")
    return value


def _strs(value: Any) -> tuple[str, ...]:
    items = _list(value)
    if not all(isinstance(v, str) for v in items):
        raise NetmapError("expected a list of strings")
    return tuple(items)


def _obj(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise NetmapError(f"expected an object, got {type(value).__name__}")
    return value
