"""Requests and responses carried inside the control channel (JSON, frozen dataclasses).

Validation lives here so coord and its tests share it: hostnames, endpoints and route
prefixes are checked and bounded before anything touches storage.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any, TypeVar

from wiremesh.core import bus
from wiremesh.core.control.channel import ControlError

MAX_ENDPOINTS = 32
MAX_ROUTES = 64
MAX_HOSTNAME = 63
MAX_TAGS = 32
MAX_TAG_LEN = 64
T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class LoginRequest:
    node_key: str
    disco_key: str
    hostname: str
    auth_key: str = ""  # needed for a new machine, or when the node key expired
    advertised_routes: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ()
    # Tags the node asks for (`wiremeshd --advertise-tags`); coord grants those its user owns
    # per the policy's tagOwners and names the others in LoginResponse.refused_tags.
    request_tags: tuple[str, ...] = ()
    # Interactive (OIDC) login: `followup` is the id of a login coord started for this machine
    # (from LoginResponse.auth_url), asked about until the user has signed in; `force_reauth`
    # asks for a new sign-in even when the node is logged in (`wiremesh up --force-reauth`).
    followup: str = ""
    force_reauth: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class LoginResponse:
    error: str = ""
    node_id: int = 0
    name: str = ""
    user: str = ""
    tags: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    key_expiry: float | None = None
    ephemeral: bool = False
    refused_tags: tuple[str, ...] = ()  # requested tags coord did not grant
    tags_error: str = ""  # why, for the user ("tag:x: not owned by alice in tagOwners")
    # Set (and node_id 0) while an interactive login waits for the user to sign in there; ask
    # again with LoginRequest.followup = login_id.
    auth_url: str = ""
    login_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class MapRequest:
    node_key: str
    endpoints: tuple[str, ...] | None = None  # None = keep what coord has
    keepalive: float = 15.0  # seconds between keepalive frames on an idle stream


@dataclasses.dataclass(frozen=True, slots=True)
class UpdateRequest:
    node_key: str
    endpoints: tuple[str, ...] | None = None
    advertised_routes: tuple[str, ...] | None = None
    hostname: str | None = None
    home_relay: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class LogoutRequest:
    node_key: str


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    error: str = ""


def encode(message: Any) -> bytes:
    return bus.encode(message)


def decode(cls: type[T], data: bytes) -> T:
    try:
        return bus.decode(cls, data)
    except ValueError as exc:
        raise ControlError(str(exc).replace("malformed bus message", "malformed request")) from None


def stream_frame(kind: str, body: dict[str, Any] | None = None) -> bytes:
    """A netmap stream frame: {"type": "netmap"|"delta"|"keepalive"|"error", ...}."""
    out: dict[str, Any] = {"type": kind}
    if body:
        out.update(body)
    return json.dumps(out, separators=(",", ":")).encode()


def check_key(text: str, what: str) -> str:
    from wiremesh.core import crypto

    try:
        crypto.decode_key(text)
    except ValueError:
        raise ControlError(f"invalid {what}: not a base64 32-byte key") from None
    return text


def check_hostname(name: str) -> str:
    name = name.strip().lower()
    if not name or len(name) > MAX_HOSTNAME:
        raise ControlError(f"invalid hostname: 1 to {MAX_HOSTNAME} characters")
    cleaned = "".join(c if (c.isascii() and c.isalnum()) or c == "-" else "-" for c in name).strip("-")
    if not cleaned:
        raise ControlError("invalid hostname: no letters or digits")
    return cleaned


def check_endpoints(endpoints: tuple[str, ...]) -> tuple[str, ...]:
    if len(endpoints) > MAX_ENDPOINTS:
        raise ControlError(f"too many endpoints (at most {MAX_ENDPOINTS})")
    out = []
    for ep in endpoints:
        host, sep, port = ep.rpartition(":")
        try:
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError
            ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ControlError(f"invalid endpoint {ep[:64]!r}: expected ip:port or [ip6]:port") from None
        out.append(ep)
    return tuple(dict.fromkeys(out))


def check_routes(routes: tuple[str, ...]) -> tuple[str, ...]:
    if len(routes) > MAX_ROUTES:
        raise ControlError(f"too many routes (at most {MAX_ROUTES})")
    out = []
    for route in routes:
        try:
            out.append(str(ipaddress.ip_network(route, strict=True)))
        except ValueError:
            raise ControlError(f"invalid route {route[:64]!r}: expected a prefix like 10.0.0.0/24") from None
    return tuple(dict.fromkeys(out))


def tag_syntax_ok(tag: str) -> bool:
    """`tag:name`, name of ASCII letters, digits, - and _, at most MAX_TAG_LEN in all: the one
    rule coord and the key registry both apply."""
    name = tag.removeprefix("tag:")
    return (
        tag.startswith("tag:")
        and bool(name)
        and len(tag) <= MAX_TAG_LEN
        and all((c.isascii() and c.isalnum()) or c in "-_" for c in name)
    )


def check_tags(tags: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Tags as `tag:name` (letters, digits, - and _), at most MAX_TAGS; duplicates dropped."""
    if len(tags) > MAX_TAGS:
        raise ControlError(f"too many tags (at most {MAX_TAGS})")
    for tag in tags:
        if not tag_syntax_ok(tag):
            raise ControlError(
                f"invalid tag {tag[:64]!r}: tags look like tag:name (letters, digits, - and _)"
            )
    return tuple(dict.fromkeys(tags))
