"""The mesh agent's configuration (wiremeshd's mesh flags), how it pins coord's key, and the
hostname it registers under without --hostname.

Coord's key is pinned (`coord_pin`): `--coord-key`, else the one state.json kept from the first
successful login, else the fingerprint the pre-auth key carries; learning it from `GET /key` with
nothing to check it against is allowed over https:// (TLS vouches for the server) or with
`--insecure-learn-coord-key` (a lab), and refused over plain http://.
"""

from __future__ import annotations

import dataclasses
import socket

from wiremesh.agent import hostnet
from wiremesh.agent.state import Persisted
from wiremesh.core import crypto
from wiremesh.core.control import coordkey

MAX_AUTH_KEY_BYTES = 256


@dataclasses.dataclass(frozen=True, slots=True)
class MeshConfig:
    login_server: str
    state_dir: str
    tun: str
    auth_key: str = ""
    hostname: str = ""
    advertise_routes: tuple[str, ...] = ()
    advertise_tags: tuple[str, ...] = ()  # asked of coord at login; granted per tagOwners
    accept_routes: bool = False  # route peers' approved subnets into the tunnel
    snat_subnet_routes: bool = True  # a subnet router masquerades what it forwards (subnetrouter.py)
    # The exit node to use (a peer's name or mesh address; "" none); None keeps the saved choice.
    exit_node: str | None = None
    exit_node_allow_lan_access: bool | None = None
    accept_dns: bool = False  # point the host's resolver at MagicDNS (agentdns.py)
    ingress_to: str = ""  # a proxy pod: forward what the mesh sends us to this cluster address (svcproxy.py)
    egress_to: str = ""  # a proxy pod: forward what the cluster sends us to this mesh device
    listen_port: int = 0
    socket_path: str = ""
    mtu: int = hostnet.MIN_MTU
    metrics_listen: str | None = None
    workers: int = 0  # receive worker processes (Engine workers)
    coord_key: str = ""  # --coord-key: coord's control key, pinned
    insecure_learn_coord_key: bool = False  # lab only: learn it over plain http://


@dataclasses.dataclass(frozen=True, slots=True)
class CoordPin:
    key: bytes | None  # pinned: every request is sealed to it
    fingerprint: str | None  # from the pre-auth key: the key from GET /key must match it


def coord_pin(config: MeshConfig, persisted: Persisted) -> CoordPin:
    """How this agent knows coord's key; ValueError (with what to do) if it would have to trust
    plain HTTP for it."""
    if config.coord_key:
        return CoordPin(crypto.decode_key(config.coord_key), None)
    if persisted.coord_key:
        return CoordPin(crypto.decode_key(persisted.coord_key), None)
    _secret, fingerprint = coordkey.split_auth_key(config.auth_key)
    if fingerprint is not None:
        return CoordPin(None, fingerprint)
    if config.login_server.startswith("https://") or config.insecure_learn_coord_key:
        return CoordPin(None, None)
    raise ValueError(
        f"coord's key is not pinned and {config.login_server} is plain http://, where anyone on the path "
        "could pose as coord: give --coord-key KEY (from `wiremesh admin coord-key` or coord's GET /key "
        "read over a trusted path), or an auth key created by this coord (it carries the key's "
        "fingerprint), or use https://; in a lab, --insecure-learn-coord-key"
    )


def default_hostname() -> str:
    """This host's name as a DNS label: what the node registers under without --hostname."""
    name = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-")
    return cleaned[:63] or "node"
