"""The MeshNode resource's pure side: which coord node it is, what must change in coord to match
its spec, and the status that describes the node. No Kubernetes or HTTP calls here."""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from typing import Any

SECRET_PREFIX = "meshnode-"
SECRET_KEY = "authkey"  # the Secret key the agent reads its pre-auth key from


@dataclasses.dataclass(frozen=True, slots=True)
class Desired:
    """A MeshNode spec, normalised."""

    name: str
    hostname: str
    user: str
    tags: tuple[str, ...]
    ephemeral: bool
    advertise_routes: tuple[str, ...]
    approved_routes: tuple[str, ...]

    @classmethod
    def from_resource(cls, name: str, spec: dict[str, Any]) -> Desired:
        def strings(key: str) -> tuple[str, ...]:
            value = spec.get(key) or []
            return tuple(dict.fromkeys(str(v) for v in value)) if isinstance(value, list) else ()

        return cls(
            name=name,
            hostname=str(spec.get("hostname") or name),
            user=str(spec.get("user") or "default"),
            tags=tuple(sorted(strings("tags"))),
            ephemeral=bool(spec.get("ephemeral", False)),
            advertise_routes=strings("advertiseRoutes"),
            approved_routes=strings("approvedRoutes"),
        )


def secret_name(meshnode: str) -> str:
    # MeshNode names are DNS subdomains (<= 253); the prefix and suffix keep within that.
    return f"{SECRET_PREFIX}{meshnode}-authkey"[:253]


def secret_data(desired: Desired, auth_key: str, login_server: str) -> dict[str, str]:
    """What the agent consumes (as files or environment): the key and how to join with it."""
    return {
        SECRET_KEY: auth_key,
        "hostname": desired.hostname,
        "advertise-routes": ",".join(desired.advertise_routes),
        "login-server": login_server,
    }


def key_ids(status: Any) -> set[int]:
    """The pre-auth keys that vouch for this MeshNode's node: the one the operator issued last
    (status.authKeyId) and the one the bound node registered with (status.nodeAuthKeyId)."""
    out = set()
    for field in ("authKeyId", "nodeAuthKeyId"):
        value = status.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            out.add(value)
    return out


def find_node(
    nodes: Iterable[dict[str, Any]], known_id: int | None, keys: set[int], claimed: set[int]
) -> dict[str, Any] | None:
    """The coord node that is this MeshNode: one that registered with a pre-auth key issued for
    this MeshNode (`keys`). The node recorded in status while it still carries such a key, else
    the newest unexpired one no other MeshNode claims. Never by hostname: a node names itself,
    so another node of the same user could take a worker's hostname (and with it the worker's
    tags and routes); only the holder of the MeshNode's own key can register with it."""
    nodes = [n for n in nodes if n.get("auth_key_id") in keys]
    if known_id is not None:
        for node in nodes:
            if node.get("id") == known_id:
                return node
    candidates = [n for n in nodes if n.get("id") not in claimed and not n.get("expired")]
    return max(candidates, key=lambda n: int(n.get("id") or 0), default=None)


@dataclasses.dataclass(frozen=True, slots=True)
class Changes:
    """What coord must be told so the node matches the spec."""

    tags: tuple[str, ...] | None = None  # new tag set, or None for no change
    approve: tuple[str, ...] = ()  # prefixes to approve (the node advertises them already)
    unapprove: tuple[str, ...] = ()  # approved in coord but no longer in the spec: withdrawn
    waiting_routes: tuple[str, ...] = ()  # approved in spec but not (yet) advertised by the node

    @property
    def empty(self) -> bool:
        return self.tags is None and not self.approve and not self.unapprove


def changes(desired: Desired, node: dict[str, Any], manage_tags: bool = True) -> Changes:
    current_tags = tuple(sorted(str(t) for t in node.get("tags") or []))
    tags = desired.tags if manage_tags and desired.tags != current_tags else None
    advertised = set(node.get("advertised_routes") or [])
    approved = set(node.get("approved_routes") or [])
    approve = tuple(p for p in desired.approved_routes if p in advertised and p not in approved)
    waiting = tuple(p for p in desired.approved_routes if p not in advertised)
    # The spec is the whole truth about approvals, as it is about tags: an approval it does not
    # list (dropped from approvedRoutes, or given by hand in coord) is withdrawn; except one the
    # policy's autoApprovers make (coord would make it again at the node's next advertisement).
    automatic = set(node.get("auto_approved_routes") or [])
    unapprove = tuple(sorted(p for p in approved if p not in desired.approved_routes and p not in automatic))
    return Changes(tags=tags, approve=approve, unapprove=unapprove, waiting_routes=waiting)


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(float(ts), datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def path_summary(node: dict[str, Any]) -> str:
    """How peers reach the node, as far as coord knows (the chosen path per peer lives on the
    agents): its home relay and how many direct endpoints it published."""
    if node.get("expired"):
        return "expired"
    if not node.get("online"):
        return "offline"
    relay = node.get("home_relay")
    endpoints = node.get("endpoints") or []
    parts = [f"relay {relay}" if relay is not None else "no relay"]
    parts.append(f"{len(endpoints)} endpoint{'s' if len(endpoints) != 1 else ''}")
    return ", ".join(parts)


def node_status(node: dict[str, Any]) -> dict[str, Any]:
    """Status fields from coord's admin view of a node."""
    return {
        "nodeId": node.get("id"),
        "hostname": node.get("hostname"),
        "name": node.get("name"),
        "addresses": {"ipv4": node.get("ipv4") or "", "ipv6": node.get("ipv6") or ""},
        "nodeKey": node.get("node_key"),
        "online": bool(node.get("online")),
        "lastSeen": rfc3339(node.get("last_seen")),
        "expired": bool(node.get("expired")),
        "path": path_summary(node),
        "homeRelay": node.get("home_relay"),
        "endpoints": [str(e) for e in (node.get("endpoints") or [])][:32],
        "advertisedRoutes": list(node.get("advertised_routes") or []),
        "approvedRoutes": list(node.get("approved_routes") or []),
        "nodeAuthKeyId": node.get("auth_key_id"),
    }


def gone_status() -> dict[str, Any]:
    """The node left coord (deleted by an admin, or an ephemeral node that went away), or no
    longer carries a key of this MeshNode (it re-registered with another)."""
    return {
        "nodeId": None,
        "online": False,
        "path": "not registered",
        "addresses": None,
        "nodeKey": None,
        "endpoints": None,
        "nodeAuthKeyId": None,
    }


NODE_LABEL = "wiremesh.dev/cluster-node"  # on MeshNodes that mirror a cluster Node


def mirror_name(node_name: str) -> str:
    return node_name[:253]


def node_hostname(node_name: str) -> str:
    """A mesh hostname from a Node name (a DNS subdomain: dots and up to 253 characters)."""
    label = "".join(c if c.isalnum() or c == "-" else "-" for c in node_name.lower())[:63].strip("-")
    return label or "node"


def pod_cidrs(node_spec: dict[str, Any]) -> tuple[str, ...]:
    cidrs = node_spec.get("podCIDRs") or ([node_spec["podCIDR"]] if node_spec.get("podCIDR") else [])
    return tuple(dict.fromkeys(str(c) for c in cidrs))


def mirror_spec(
    node_name: str,
    node_spec: dict[str, Any],
    tags: tuple[str, ...],
    approve_routes: bool = True,
    extra_routes: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The MeshNode for a cluster Node: it advertises the Node's pod CIDRs (and `extra_routes`,
    the cluster's Service CIDR, which every node can reach). With `approve_routes` they are
    approved at once (the cluster vouches for its own nodes), which is what lets laptops reach
    pods; without, the spec leaves `approvedRoutes` to an admin (the operator then never writes
    that field, so an approval given by hand stays)."""
    routes = list(dict.fromkeys((*pod_cidrs(node_spec), *extra_routes)))
    spec: dict[str, Any] = {
        "hostname": node_hostname(node_name),
        "tags": list(tags),
        "advertiseRoutes": routes,
    }
    if approve_routes:
        spec["approvedRoutes"] = routes
    return spec
