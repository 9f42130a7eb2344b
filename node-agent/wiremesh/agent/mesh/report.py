"""`wiremesh status` in mesh mode, built only from what the controller passes in (this module
holds no state and reads no controller): the whole answer, a peer's entry and the exit node's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from wiremesh.agent import exitnode
from wiremesh.agent.agentdns import AgentDNS
from wiremesh.agent.mesh.config import MeshConfig, default_hostname
from wiremesh.agent.mesh.plan import peer_usable
from wiremesh.agent.state import Persisted
from wiremesh.agent.svcproxy import ServiceProxy
from wiremesh.core.netmap import NetworkMap, Node
from wiremesh.core.packetfilter import Filter


def status(
    *,
    backend_state: str,
    error: str,
    auth_url: str,
    config: MeshConfig,
    persisted: Persisted,
    netmap: NetworkMap | None,
    now: float,
    engine_status: Mapping[str, Any],
    node_key: str,
    logged_in: bool,
    endpoints: Sequence[str],
    advertised_tags: Sequence[str],
    refused_tags: Sequence[str],
    tags_error: str,
    exit_choice: exitnode.ExitChoice,
    packet_filter: Filter,
    filter_errors: int,
    dns: AgentDNS | None,
    proxy: ServiceProxy | None,
) -> dict[str, Any]:
    """`wiremesh status --json`: the controller's state, the Engine's (`engine_status`), and the
    netmap's usable peers at `now`."""
    engine_peers = engine_status.get("peers", {})
    peers = []
    if netmap is not None:
        for node in netmap.peers:
            if not peer_usable(node, now):
                continue
            live = engine_peers.get(node.node_key, {})
            dns_name = dns.dns_name(node.name) if dns else ""
            active = node.node_key in engine_peers
            peers.append(peer_entry(node, live, active, dns_name, exit_choice))
    me = netmap.self_node if netmap is not None else None
    return {
        "backend_state": backend_state,
        "error": error,
        "auth_url": auth_url,
        "login_server": config.login_server,
        "interface": config.tun,
        "listen_port": engine_status.get("listen_port"),
        "netmap_version": netmap.version if netmap is not None else None,
        "self": {
            "id": persisted.node_id,
            "name": me.name if me else persisted.name,
            "dns_name": dns.dns_name(me.name) if dns and me else "",
            "hostname": me.hostname if me else (config.hostname or default_hostname()),
            "user": me.user if me else "",
            "tags": list(me.tags) if me else [],
            "advertised_tags": list(advertised_tags),
            "refused_tags": list(refused_tags),
            "tags_error": tags_error,
            "node_key": node_key,
            "addresses": [a.split("/")[0] for a in persisted.addresses],
            "online": logged_in and netmap is not None,
            "endpoints": list(endpoints),
            "advertised_routes": list(config.advertise_routes),
            "approved_routes": list(me.approved_routes) if me else [],
            "accept_routes": config.accept_routes,
            "exit_node": exit_node_entry(
                persisted.exit_node, persisted.exit_node_allow_lan_access, exit_choice
            ),
            "key_expiry": me.key_expiry if me else None,
        },
        "peers": peers,
        "packet_filter": {
            "rules": len(packet_filter.rules),
            "allow_all": packet_filter.allow_all,
            "drops": dict(packet_filter.drops),
            "errors": filter_errors,
        },
        "drops": engine_status.get("drops", {}),
        "dns": dns.status() if dns is not None else {},
        "proxy": proxy.status() if proxy is not None else {},
    }


def peer_entry(
    node: Node, live: Mapping[str, Any], active: bool, dns_name: str, choice: exitnode.ExitChoice
) -> dict[str, Any]:
    """A peer as `wiremesh status --json` shows it (`live`: the engine's view of its session)."""
    return {
        "id": node.id,
        "name": node.name,
        "dns_name": dns_name,
        "hostname": node.hostname,
        "user": node.user,
        "tags": list(node.tags),
        "node_key": node.node_key,
        "addresses": [a.split("/")[0] for a in node.addresses],
        "allowed_ips": list(node.allowed_ips),
        "online": node.online,
        "last_seen": node.last_seen,
        "endpoint": live.get("endpoint"),
        "active": active,
        "exit_node_option": exitnode.offers_exit(node),
        "exit_node": choice.node is not None and choice.node.id == node.id,
        "rx_bytes": live.get("rx_bytes", 0),
        "tx_bytes": live.get("tx_bytes", 0),
        "last_handshake_seconds_ago": live.get("last_handshake_seconds_ago"),
    }


def exit_node_entry(selected: str, allow_lan_access: bool, choice: exitnode.ExitChoice) -> dict[str, Any]:
    """The exit node this node asked for, the peer it found, and why none carries traffic."""
    return {
        "selected": selected,
        "name": choice.node.name if choice.node else "",
        "allow_lan_access": allow_lan_access,
        "error": choice.error,
    }
