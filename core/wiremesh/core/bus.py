"""NATS subjects and message models shared by the services.

Every message on the bus is a frozen dataclass encoded as JSON (UTF-8). Keys travel as
base64 strings (the same text form `wiremesh genkey` prints). Agents never speak NATS.

Request/reply subjects answer with a message that carries an `error` field: empty on
success, otherwise a human-readable reason the caller may pass on to its own client.
Which service may publish or subscribe to which subject is wiremesh.core.busauth's table.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

MAX_MESSAGE_BYTES = 1 << 20  # the nats-server default max_payload

# Key registry events (published by keys).
NODE_KEY_ADDED = "wiremesh.keys.nodekey.added"  # NodeKeyEvent: a node key became valid
NODE_KEY_REMOVED = "wiremesh.keys.nodekey.removed"  # NodeKeyEvent: revoked, expired, deleted or rotated away
NODE_KEY_LIST = "wiremesh.keys.nodekey.list"  # request/reply: NodeKeyListRequest -> NodeKeyList
AUTH_KEY_CHANGED = "wiremesh.keys.authkey.changed"  # AuthKeyEvent

# Key registry requests (served by keys, queue group KEYS_QUEUE; coord is the caller).
AUTH_KEY_CREATE = "wiremesh.keys.authkey.create"  # AuthKeyCreate -> AuthKeyReply (secret set once)
AUTH_KEY_LIST = "wiremesh.keys.authkey.list"  # AuthKeyListRequest -> AuthKeyList
AUTH_KEY_EXPIRE = "wiremesh.keys.authkey.expire"  # AuthKeyExpire -> AuthKeyReply
AUTH_KEY_CONSUME = "wiremesh.keys.authkey.consume"  # AuthKeyConsume -> AuthKeyGrant
NODE_KEY_REGISTER = "wiremesh.keys.nodekey.register"  # NodeKeyRegister -> NodeKeyReply
NODE_KEY_EXPIRE = "wiremesh.keys.nodekey.expire"  # NodeKeyExpire -> NodeKeyReply
NODE_KEY_REVOKE = "wiremesh.keys.nodekey.revoke"  # NodeKeyRevoke -> NodeKeyReply
KEYS_QUEUE = "wiremesh-keys"

# Coordination events (published by coord).
NODE_CHANGED = "wiremesh.coord.node.changed"  # NodeChanged: netmaps that include this node are stale
POLICY_CHANGED = "wiremesh.coord.policy.changed"  # PolicyChanged
# raw 32 bytes: the ephemeral key of an agent handshake a replica accepted (shared replay cache)
HANDSHAKE_SEEN = "wiremesh.coord.handshake.seen"

# Relay presence and cross-replica forwarding (published by derp replicas), all under DERP_SUBJECTS.
DERP_SUBJECTS = "wiremesh.derp.>"
# kind: beat | delta | full; the messages are wiremesh.derp.presence's (a lease protocol owned by derp)
DERP_LEASE = "wiremesh.derp.{region}.lease.{kind}"
DERP_FORWARD = "wiremesh.derp.{region}.fwd.{replica}"  # records: u32 BE len | src key | dst key | packet
DERP_PRESENCE_SYNC = "wiremesh.derp.{region}.presence.sync"  # raw bytes: replica id; others re-announce


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyEvent:
    node_key: str
    node_id: int | None = None
    expires_at: float | None = None  # unix seconds; None = never
    reason: str = ""  # for removals: "revoked" | "expired" | "rotated" | "deleted"


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
class AuthKeyInfo:
    """An auth key as listed; never carries the secret."""

    id: int
    prefix: str  # the public part of the key, enough to recognise it
    user: str
    reusable: bool
    ephemeral: bool
    tags: tuple[str, ...]
    created_at: float
    expires_at: float | None
    used_count: int
    expired: bool  # past expiry, explicitly expired, or a one-off key already used


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyCreate:
    user: str
    reusable: bool = False
    ephemeral: bool = False
    tags: tuple[str, ...] = ()
    expires_in: float | None = 3600.0  # seconds from now; None = never


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyReply:
    error: str = ""
    key: AuthKeyInfo | None = None
    secret: str = ""  # the full key, only in the reply to AuthKeyCreate


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyListRequest:
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyList:
    keys: tuple[AuthKeyInfo, ...] = ()
    error: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyExpire:
    auth_key_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyConsume:
    """Validate an auth key and count one use of it, on behalf of `machine_key`.

    With `check_only` the key is validated and nothing is counted or written: coord asks this
    before it spends a database write on a login from a machine it does not know yet."""

    secret: str
    machine_key: str
    check_only: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class AuthKeyGrant:
    error: str = ""  # "unknown auth key" | "auth key expired" | "auth key already used"
    auth_key_id: int = 0
    user: str = ""
    tags: tuple[str, ...] = ()
    ephemeral: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyRegister:
    """Make `node_key` the node's one valid node key (rotating any previous one away)."""

    node_id: int
    machine_key: str
    node_key: str
    disco_key: str
    expires_at: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyExpire:
    node_id: int


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyRevoke:
    node_id: int
    reason: str = "revoked"


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyReply:
    error: str = ""
    node_key: str = ""
    expires_at: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class NodeChanged:
    node_id: int
    change: str  # "added" | "updated" | "removed" | "endpoints" | "online" | "offline"
    origin: str = ""  # replica id that made the change, so it can skip its own echo


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyChanged:
    version: int
    origin: str = ""


T = TypeVar("T")


def encode(message: Any) -> bytes:
    """Encode a bus message dataclass as JSON bytes."""
    return json.dumps(dataclasses.asdict(message), separators=(",", ":")).encode()


def decode(cls: type[T], data: bytes) -> T:
    """Decode JSON bytes into `cls`; raises ValueError on malformed input."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError("malformed bus message: too large")
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed bus message: {exc}") from exc
    return _build(cls, raw)


_PRIMITIVES: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
}


def _build(cls: Any, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"malformed bus message: {cls.__name__} is not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ValueError(f"malformed bus message: unknown fields {sorted(unknown)}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], value, name) for name, value in raw.items()}
    try:
        return cls(**values)
    except TypeError as exc:
        raise ValueError(f"malformed bus message: {exc}") from exc


def _convert(tp: Any, value: Any, name: str) -> Any:
    """Turn a decoded JSON value into the declared field type, rejecting what does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, name)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"malformed bus message: bad {name}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"malformed bus message: {name} is not a list")
        elem = typing.get_args(tp)[0]
        return tuple(_convert(elem, v, name) for v in value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value)
    expected = _PRIMITIVES.get(tp)
    if expected is not None:
        # bool is an int subclass; a JSON true is not a node id.
        if not isinstance(value, expected) or (tp is not bool and isinstance(value, bool)):
            raise ValueError(f"malformed bus message: {name} should be {tp.__name__}")
        return float(typing.cast(float, value)) if tp is float else value
    return value
