"""Pieces of `wiremesh status` that depend only on data (no controller state): a peer's entry and
the exit node's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from wiremesh.agent import exitnode
from wiremesh.core.netmap import Node


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
