"""NATS subjects and message models shared by the services.

Every message on the bus is a frozen dataclass encoded as JSON (UTF-8). Keys travel as
base64 strings (the same text form `wiremesh genkey` prints). Agents never speak NATS.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

# Key registry events (published by keys).
NODE_KEY_ADDED = "wiremesh.keys.nodekey.added"  # NodeKeyEvent: a node key became valid
NODE_KEY_REMOVED = "wiremesh.keys.nodekey.removed"  # NodeKeyEvent: revoked, expired, deleted or rotated away
NODE_KEY_LIST = "wiremesh.keys.nodekey.list"  # request/reply: NodeKeyListRequest -> NodeKeyList
AUTH_KEY_CHANGED = "wiremesh.keys.authkey.changed"  # AuthKeyEvent

# Coordination events (published by coord).
NODE_CHANGED = "wiremesh.coord.node.changed"  # NodeChanged: netmaps that include this node are stale
NODE_ONLINE = "wiremesh.coord.node.online"  # NodePresence
POLICY_CHANGED = "wiremesh.coord.policy.changed"  # PolicyChanged

# Relay presence and cross-replica forwarding (published by derp replicas).
DERP_PRESENCE = "wiremesh.derp.{region}.presence"  # DerpPresence
DERP_FORWARD = "wiremesh.derp.{region}.fwd.{replica}"  # raw bytes: 32-byte src key | 32-byte dst key | packet


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyEvent:
    node_key: str
    node_id: int | None = None
    expires_at: float | None = None  # unix seconds; None = never
    reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyListRequest:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyList:
    keys: tuple[NodeKeyEvent, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyEvent:
    auth_key_id: int
    action: str  # "created" | "expired" | "used"


@dataclasses.dataclass(frozen=True, slots=True)
class NodeChanged:
    node_id: int
    change: str  # "added" | "updated" | "removed" | "endpoints" | "online" | "offline"
    origin: str = ""  # replica id that made the change, so it can skip its own echo


@dataclasses.dataclass(frozen=True, slots=True)
class NodePresence:
    node_id: int
    online: bool
    at: float


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyChanged:
    version: int
    origin: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class DerpPresence:
    region: str
    replica: str
    node_key: str
    present: bool


T = TypeVar("T")


def encode(message: Any) -> bytes:
    """Encode a bus message dataclass as JSON bytes."""
    return json.dumps(dataclasses.asdict(message), separators=(",", ":")).encode()


def decode(cls: type[T], data: bytes) -> T:
    """Decode JSON bytes into `cls`; raises ValueError on malformed input."""
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed bus message: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError("malformed bus message: not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"malformed bus message: unknown fields {sorted(unknown)}")
    if cls is NodeKeyList and "keys" in raw:
        raw["keys"] = tuple(NodeKeyEvent(**k) for k in raw["keys"])
    try:
        return cls(**raw)
    except TypeError as exc:
        raise ValueError(f"malformed bus message: {exc}") from exc
