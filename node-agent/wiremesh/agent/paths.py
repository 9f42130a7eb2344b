"""The one interface between the Engine (WireGuard's data plane) and path selection.

WireGuard hands the Engine an opaque endpoint with every datagram it sends to a peer. In static
mode an endpoint is a (host, port) address; in mesh mode it is magicsock's object for the peer,
and only path selection knows whether the peer is reached directly (and at which address) or
through a relay. The Engine asks it through `Paths`, per run of datagrams, never per
packet where a run will do; nothing else passes between them, and path selection never touches
the WireGuard Device.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Protocol

Address = tuple[str, int]


class Paths(Protocol):
    def resolve_direct(self, endpoint: Hashable) -> Address | None:
        """The address the Engine's own socket reaches `endpoint` at right now, or None (the
        datagrams then go to send_to_peer one by one). Asked once per run of datagrams."""
        ...

    def send_to_peer(self, data: bytes, endpoint: Hashable) -> None:
        """Send a datagram to an endpoint that is not an address (a relay, a probe socket, or
        a direct path the Engine did not batch)."""
        ...

    def source_endpoint(self, address: Address) -> Hashable:
        """The endpoint WireGuard should see datagrams from `address` come from: a peer's
        endpoint object where the address is a path proven to that peer, else the address."""
        ...

    def receive_other(self, data: bytes, address: Address) -> bool:
        """A datagram on the WireGuard socket that is not WireGuard (disco, STUN); False when
        not taken (the Device then counts it as the garbage it is)."""
        ...

    def wireguard_event(self, event: object) -> None:
        """An event of the WireGuard Device (handshakes, endpoints seen), after it happened."""
        ...


class StaticPaths:
    """Static mode: every endpoint is an address; other datagrams and events have no taker."""

    def __init__(self) -> None:
        self.unknown_endpoints = 0

    def resolve_direct(self, endpoint: Hashable) -> Address | None:
        return endpoint if type(endpoint) is tuple else None

    def send_to_peer(self, data: bytes, endpoint: Hashable) -> None:
        self.unknown_endpoints += 1

    def source_endpoint(self, address: Address) -> Hashable:
        return address

    def receive_other(self, data: bytes, address: Address) -> bool:
        return False

    def wireguard_event(self, event: object) -> None:
        pass
