"""magicsock in mesh mode: the controller's path selection (MeshPaths) and the local API.

Once the netmap carries a relay map, every usable peer's WireGuard endpoint is magicsock's
PeerEndpoint (without one, mesh mode keeps plan.py's first-endpoint guess); our endpoints to
publish are magicsock's (STUN, port-mapped, local); `wiremesh netcheck` and `wiremesh ping` are
answered by it.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

from wiremesh.agent import hostnet
from wiremesh.agent.magicsock import MagicSock, diagnostics
from wiremesh.agent.magicsock.netcheck import fmt
from wiremesh.agent.mesh.controller import MeshAgent
from wiremesh.core import crypto
from wiremesh.core.disco import Endpoint
from wiremesh.core.magicsock import PeerInfo
from wiremesh.core.netmap import NetworkMap, Node


def peer_infos_from_netmap(nodes: Iterable[Node]) -> list[PeerInfo]:
    """PeerInfo for each netmap peer: what mesh mode passes to `MagicSock.set_peers`. Peers
    with an unreadable key are skipped; bad endpoints are ignored."""
    infos = []
    for node in nodes:
        try:
            node_key = crypto.decode_key(node.node_key)
        except ValueError:
            continue
        disco_key = None
        if node.disco_key:
            with contextlib.suppress(ValueError):
                disco_key = crypto.decode_key(node.disco_key)
        eps = []
        for text in node.endpoints:
            host, _, port = str(text).rpartition(":")
            host = host.strip("[]")
            if port.isdigit() and 0 < int(port) < 65536:
                with contextlib.suppress(ValueError):
                    ipaddress.ip_address(host)
                    eps.append(Endpoint((host, int(port))))
        infos.append(PeerInfo(node_key, disco_key, tuple(eps), node.home_relay))
    return infos


class MagicsockPaths:
    """The controller's MeshPaths, answered by a MagicSock."""

    def __init__(self, magicsock: MagicSock) -> None:
        self.magicsock = magicsock

    def peer_endpoints(self, netmap: NetworkMap, usable: Sequence[Node]) -> Mapping[str, Hashable]:
        self.magicsock.set_derp_map(netmap.derp_map or None)
        if not self.magicsock.regions:
            return {}
        endpoints = self.magicsock.set_peers(peer_infos_from_netmap(usable))
        return {crypto.encode_key(key): ep for key, ep in endpoints.items()}

    def endpoints(self) -> tuple[str, ...]:
        ms = self.magicsock
        local = ms.reachability.local_endpoints
        if local:
            return tuple(fmt(ep.address) for ep in local)
        return hostnet.local_endpoints(ms.engine.listen_port, exclude=(ms.engine.tun_name,))


class MeshAPI:
    """The local API backend in mesh mode: the controller's requests, and magicsock's netcheck
    and ping."""

    def __init__(self, agent: MeshAgent, magicsock: MagicSock) -> None:
        self.agent = agent
        self.magicsock = magicsock

    def status(self) -> dict[str, Any]:
        return self.agent.status()

    def ip(self) -> list[str]:
        return self.agent.ip()

    async def up(self) -> dict[str, Any]:
        return await self.agent.up()

    async def up_with_auth_key(self, auth_key: str) -> dict[str, Any]:
        return await self.agent.up(auth_key)

    async def up_with_tags(self, auth_key: str, advertise_tags: Sequence[str]) -> dict[str, Any]:
        return await self.agent.up(auth_key, advertise_tags)

    async def up_force_reauth(self) -> dict[str, Any]:
        return await self.agent.up_force_reauth()

    async def set_exit_node(self, selector: str, allow_lan_access: bool) -> dict[str, Any]:
        return await self.agent.set_exit_node(selector, allow_lan_access)

    async def down(self) -> dict[str, Any]:
        return await self.agent.down()

    async def logout(self) -> dict[str, Any]:
        return await self.agent.logout()

    async def netcheck(self) -> dict[str, Any]:
        return await diagnostics.netcheck(self.magicsock)

    async def ping(self, peer: str) -> dict[str, Any]:
        names: dict[str, bytes] = {}
        netmap = self.agent.netmap
        for node in netmap.peers if netmap is not None else ():
            with contextlib.suppress(ValueError):
                node_key = crypto.decode_key(node.node_key)
                for name in (node.name, node.hostname, *(a.split("/")[0] for a in node.addresses)):
                    names[name] = node_key
        return await diagnostics.ping(self.magicsock, peer, names)
