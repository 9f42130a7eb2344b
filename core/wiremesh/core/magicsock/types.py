"""Values the magicsock core takes and gives: destinations, peer descriptions, events."""

from __future__ import annotations

import dataclasses

from wiremesh.core.disco import Endpoint

Address = tuple[str, int]

PRIMARY_SOCKET = 0  # the UDP socket shared with WireGuard; other numbers are birthday probe sockets


@dataclasses.dataclass(frozen=True, slots=True)
class Direct:
    """Straight over UDP to `address`, from our socket number `socket`."""

    address: Address
    socket: int = PRIMARY_SOCKET

    def __str__(self) -> str:
        host, port = self.address
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return text if self.socket == PRIMARY_SOCKET else f"{text} (probe socket {self.socket})"


@dataclasses.dataclass(frozen=True, slots=True)
class Relay:
    """Through the DERP relay of `region`, addressed to the peer's node key."""

    region: int
    node_key: bytes

    def __str__(self) -> str:
        return f"relay region {self.region}"


Destination = Direct | Relay


@dataclasses.dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the netmap says about a peer that magicsock needs."""

    node_key: bytes
    disco_key: bytes | None
    endpoints: tuple[Endpoint, ...] = ()
    home_region: int | None = None


# ----------------------------------------------------------------------------- events


@dataclasses.dataclass(frozen=True, slots=True)
class PathChanged:
    """The peer's WireGuard traffic now goes `direct` (None: through the relay)."""

    node_key: bytes
    direct: Direct | None
    latency: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class AddressConfirmed:
    """A Pong proved that `direct` reaches the peer: WireGuard from it belongs to that peer."""

    node_key: bytes
    direct: Direct


@dataclasses.dataclass(frozen=True, slots=True)
class OpenProbeSockets:
    """Birthday probe: open `count` extra UDP sockets for this peer, then call
    `probe_sockets_opened` with their numbers."""

    node_key: bytes
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class CloseProbeSockets:
    """Close the peer's probe sockets except those in `keep`."""

    node_key: bytes
    keep: tuple[int, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class PingResult:
    """An answer to a ping started with `ping()`: how long it took and which path it used."""

    node_key: bytes
    tx_id: bytes
    via: Destination
    latency: float


@dataclasses.dataclass(frozen=True, slots=True)
class MappingChanged:
    """A peer saw us come from `observed`, not the STUN endpoint we publish: our NAT rebound.
    The adapter should re-run STUN now (and so send fresh CallMeMaybes)."""

    published: Address
    observed: Address


Event = PathChanged | AddressConfirmed | OpenProbeSockets | CloseProbeSockets | PingResult | MappingChanged
