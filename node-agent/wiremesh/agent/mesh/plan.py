"""What the Engine should look like for one netmap: pure, netmap and `now` in, the wanted
interface addresses, routes, WireGuard peers and packet-filter rules out. Everything the agent
decides lives here; applier.py applies it to the Engine."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Hashable, Iterable, Mapping
from typing import Any

from wiremesh.agent import exitnode
from wiremesh.core import crypto
from wiremesh.core.netmap import NetworkMap, Node
from wiremesh.core.policy.model import is_exit_route
from wiremesh.core.wireguard import PeerConfig

log = logging.getLogger("wiremesh.agent.mesh")

MESH_ROUTES = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
PERSISTENT_KEEPALIVE = 25


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What the Engine should look like for one netmap."""

    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    peers: tuple[PeerConfig, ...] = ()
    packet_filter: tuple[Mapping[str, Any], ...] = ()
    next_expiry: float | None = None  # when a peer's key expires and the plan must be redone
    exit: exitnode.ExitChoice = exitnode.NO_EXIT  # the exit node in use (exitnode.py)
    lan_rules: tuple[str, ...] = ()  # connected subnets sent to the exit node (no LAN access)


def peer_usable(node: Node, now: float) -> bool:
    """Coord hides expired nodes, but a key can expire between two netmaps: check both."""
    return not node.expired and (node.key_expiry is None or node.key_expiry > now)


def parse_endpoint(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host, int(port)


def choose_endpoint(endpoints: Iterable[str]) -> tuple[str, int] | None:
    """The first usable endpoint. Agents list the address of their default-route interface
    first; path discovery (disco) replaces this guess where it runs."""
    for text in endpoints:
        endpoint = parse_endpoint(text)
        if endpoint is not None:
            return endpoint
    return None


def _valid_prefixes(prefixes: Iterable[str]) -> tuple[str, ...]:
    out = []
    for prefix in prefixes:
        try:
            out.append(str(ipaddress.ip_network(prefix, strict=False)))
        except ValueError:
            log.warning("netmap_prefix_ignored prefix=%r", prefix[:64])
    return tuple(dict.fromkeys(out))


def plan(
    netmap: NetworkMap | None,
    now: float,
    *,
    running: bool = True,
    own_routes: Iterable[str] = (),
    accept_routes: bool = False,
    endpoints: Mapping[str, Hashable] | None = None,
    exit_node: str = "",
    lan_prefixes: Iterable[str] = (),
    allow_lan: bool = False,
) -> Plan:
    """The Engine configuration for `netmap` at `now`; `running=False` is `wiremesh down`.

    Peers' approved subnet routes are routed into the tunnel only with `accept_routes` (as
    Tailscale's --accept-routes), and never our own (`own_routes`): we are their router. They stay
    in the peer's allowed IPs either way, so replies from those subnets are accepted.

    `endpoints` (node key -> WireGuard endpoint) overrides the first-listed-endpoint guess, for
    a path selector such as magicsock that hands out its own endpoint objects.

    `exit_node` selects a peer as the exit node (exitnode.py: only it keeps exit routes in its
    allowed IPs, and the default routes go into the mesh's table); `lan_prefixes` are the host's
    connected subnets, sent to the exit node too unless `allow_lan`.
    """
    if netmap is None:
        return Plan()
    addresses = _valid_prefixes(netmap.self_node.addresses)
    if not running:
        return Plan(addresses=addresses)
    own = set(_valid_prefixes(own_routes))
    choice = exitnode.choose([n for n in netmap.peers if peer_usable(n, now)], exit_node)
    peers: list[PeerConfig] = []
    routes: list[str] = list(MESH_ROUTES)
    seen_keys: set[bytes] = set()
    next_expiry: float | None = None
    for node in netmap.peers:
        if not peer_usable(node, now):
            continue
        try:
            key = crypto.decode_key(node.node_key)
        except ValueError:
            log.warning("netmap_peer_ignored peer=%s reason=bad_node_key", node.name)
            continue
        if key in seen_keys:
            continue
        seen_keys.add(key)
        allowed = exitnode.peer_allowed_ips(node, _valid_prefixes(node.allowed_ips), choice)
        chosen = (endpoints or {}).get(node.node_key)
        peers.append(
            PeerConfig(
                public_key=key,
                allowed_ips=allowed,
                endpoint=chosen or choose_endpoint(node.endpoints),
                persistent_keepalive=PERSISTENT_KEEPALIVE,
                roam=chosen is None,  # path selection keeps the peers it chose endpoints for
            )
        )
        if accept_routes:
            for prefix in _valid_prefixes(node.approved_routes):
                # Exit routes only through the exit node selected (below), never by accepting routes.
                if (
                    prefix in allowed
                    and prefix not in own
                    and prefix not in routes
                    and not is_exit_route(prefix)
                ):
                    routes.append(prefix)
        if node.key_expiry is not None:
            next_expiry = node.key_expiry if next_expiry is None else min(next_expiry, node.key_expiry)
    peers.sort(key=lambda p: p.public_key)
    routes.extend(r for r in exitnode.routes(choice) if r not in own)
    return Plan(
        addresses=addresses,
        routes=tuple(routes),
        peers=tuple(peers),
        packet_filter=tuple(netmap.packet_filter),
        next_expiry=next_expiry,
        exit=choice,
        lan_rules=tuple(lan_prefixes) if choice.active and not allow_lan else (),
    )
