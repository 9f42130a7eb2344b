"""Mesh mode: log in to coord, follow the netmap, keep the Engine configured to match it.

    wiremeshd --login-server URL --auth-key KEY --state-dir DIR --tun IFNAME

Three layers:
- `plan()` is pure: netmap + `now` (+ up/down) in, the wanted interface addresses, routes,
  WireGuard peers and packet-filter rules out. Everything the agent decides lives here.
- `MeshAgent` is the long-running controller (asyncio): it logs in with the keys from the state
  directory, streams the netmap (the control client reconnects with backoff and resyncs in full),
  and after every netmap change applies the difference between the new plan and the applied one
  to the Engine, so a removed or expired peer leaves the Device at once. When coord or NATS is
  away nothing is torn down: the data plane keeps the last netmap.
- `run()` is the daemon mode: Engine, local API on a unix socket, metrics, signals.

The auth key is only offered until the first successful login of the process: a node that coord
later deletes or expires stays cut off (NeedsLogin) instead of silently re-registering.

Coord's key is pinned (`coord_pin`): `--coord-key`, else the one state.json kept from the first
successful login, else the fingerprint the pre-auth key carries; learning it from `GET /key` with
nothing to check it against is allowed over https:// (TLS vouches for the server) or with
`--insecure-learn-coord-key` (a lab), and refused over plain http://.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import ipaddress
import logging
import os
import pathlib
import signal
import socket
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from wiremesh.agent import netconf, subnetrouter
from wiremesh.agent.control import (
    ControlClient,
    ControlRefused,
    ControlUnavailable,
    LoginRequired,
    LoginResult,
)
from wiremesh.agent.state import Keys, Persisted, StateDir, StateError
from wiremesh.core import crypto
from wiremesh.core.control import coordkey
from wiremesh.core.control.channel import ControlError
from wiremesh.core.control.messages import check_tags
from wiremesh.core.netmap import NetworkMap, Node
from wiremesh.core.packetfilter import Filter
from wiremesh.core.policy.model import FilterRule
from wiremesh.core.wireguard import PeerConfig

log = logging.getLogger("wiremesh.agent.mesh")
T = TypeVar("T")

DEFAULT_MESH_MTU = 1280
DEFAULT_STATE_DIR = "/var/lib/wiremesh"
SOCKET_NAME = "wiremeshd.sock"
MESH_ROUTES = ("100.64.0.0/10", "fd7a:115c:a1e0::/48")
PERSISTENT_KEEPALIVE = 25
STREAM_KEEPALIVE = 5.0  # coord sends a frame at least this often; a silent stream is noticed in ~3x
ENDPOINT_CHECK_INTERVAL = 10.0
RELOGIN_INTERVAL = 10.0
MAX_BACKOFF = 5.0
MAX_AUTH_KEY_BYTES = 256
EXIT_CONFIG = 2
EXIT_RUNTIME = 1


class BackendState(enum.StrEnum):
    STARTING = "Starting"
    NEEDS_LOGIN = "NeedsLogin"
    RUNNING = "Running"
    STOPPED = "Stopped"
    LOGGED_OUT = "LoggedOut"


class MeshError(Exception):
    """A local API request that cannot be done now; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ----------------------------------------------------------------------------- the pure part


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What the Engine should look like for one netmap."""

    addresses: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    peers: tuple[PeerConfig, ...] = ()
    packet_filter: tuple[Mapping[str, Any], ...] = ()
    next_expiry: float | None = None  # when a peer's key expires and the plan must be redone


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
) -> Plan:
    """The Engine configuration for `netmap` at `now`; `running=False` is `wiremesh down`.

    Peers' approved subnet routes are routed into the tunnel only with `accept_routes` (as
    Tailscale's --accept-routes), and never our own (`own_routes`): we are their router. They stay
    in the peer's allowed IPs either way, so replies from those subnets are accepted.

    `endpoints` (node key -> WireGuard endpoint) overrides the first-listed-endpoint guess, for
    a path selector such as magicsock that hands out its own endpoint objects.
    """
    if netmap is None:
        return Plan()
    addresses = _valid_prefixes(netmap.self_node.addresses)
    if not running:
        return Plan(addresses=addresses)
    own = set(_valid_prefixes(own_routes))
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
        allowed = _valid_prefixes(node.allowed_ips)
        peers.append(
            PeerConfig(
                public_key=key,
                allowed_ips=allowed,
                endpoint=(endpoints or {}).get(node.node_key) or choose_endpoint(node.endpoints),
                persistent_keepalive=PERSISTENT_KEEPALIVE,
            )
        )
        if accept_routes:
            for prefix in _valid_prefixes(node.approved_routes):
                if prefix in allowed and prefix not in own and prefix not in routes:
                    routes.append(prefix)
        if node.key_expiry is not None:
            next_expiry = node.key_expiry if next_expiry is None else min(next_expiry, node.key_expiry)
    peers.sort(key=lambda p: p.public_key)
    return Plan(
        addresses=addresses,
        routes=tuple(routes),
        peers=tuple(peers),
        packet_filter=tuple(netmap.packet_filter),
        next_expiry=next_expiry,
    )


# ----------------------------------------------------------------------------- endpoints


def local_endpoints(listen_port: int, exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """ip:port for every global address of this namespace except loopback and `exclude` (the
    TUN), the addresses of the interface holding the default route first."""
    from pyroute2 import IPRoute

    skip = set(exclude) | {"lo"}
    first: set[int] = set()
    found: list[tuple[int, str]] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family in (socket.AF_INET, socket.AF_INET6):
            for route in ipr.get_default_routes(family=family):
                oif = route.get_attr("RTA_OIF")
                if oif is not None:
                    first.add(int(oif))
        for msg in ipr.get_addr():
            if names.get(msg["index"]) in skip:
                continue
            addr = msg.get_attr("IFA_ADDRESS")
            if addr is None:
                continue
            ip = ipaddress.ip_address(addr)
            if ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            text = f"[{ip}]:{listen_port}" if ip.version == 6 else f"{ip}:{listen_port}"
            rank = (0 if msg["index"] in first else 2) + (0 if ip.version == 4 else 1)
            found.append((rank, text))
    found.sort(key=lambda item: item[0])  # stable: keeps kernel order within a rank
    return tuple(dict.fromkeys(text for _, text in found))[:16]


# ----------------------------------------------------------------------------- the controller


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
    listen_port: int = 0
    socket_path: str = ""
    mtu: int = DEFAULT_MESH_MTU
    metrics_listen: str | None = None
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


class MeshAgent:
    """Keeps one Engine configured from coord's netmap; serves the local API's requests."""

    def __init__(
        self,
        config: MeshConfig,
        state_dir: StateDir,
        keys: Keys,
        engine: Any,
        *,
        client: ControlClient | None = None,
        clock: Callable[[], float] = time.time,
        endpoints: Callable[[], tuple[str, ...]] | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.keys = keys
        self.engine = engine
        self.clock = clock
        self.persisted = state_dir.load()
        if client is None:
            pin = coord_pin(config, self.persisted)
            client = ControlClient(
                config.login_server,
                keys.machine,
                server_public_key=pin.key,
                server_key_fingerprint=pin.fingerprint,
            )
        self.client = client
        self.backend_state = BackendState.STARTING
        self.netmap: NetworkMap | None = None
        self.applied = Plan()
        self.filter = Filter(allow_all=True)
        self.filter_errors = 0
        self.netmaps_received = 0
        self.last_error = ""
        self.endpoints: tuple[str, ...] = ()
        # Optional path selector seam: usable peers -> {node key: WireGuard endpoint}.
        self.peer_endpoints: Callable[[Sequence[Node]], Mapping[str, Hashable]] | None = None
        self._endpoint_source = endpoints or (
            lambda: local_endpoints(engine.listen_port, exclude=(config.tun,))
        )
        self._auth_key = config.auth_key
        self._auth_key_usable = bool(config.auth_key)
        self.advertise_tags = config.advertise_tags
        self.refused_tags: tuple[str, ...] = ()  # what coord did not grant at the last login, and why
        self.tags_error = ""
        self._logged_in = False
        self._apply_failed = False
        self._kick = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mesh-netlink")

    # ---- lifecycle

    async def run(self) -> None:
        """Until stop(): the control loop and the ticker."""
        self.endpoints = await self._discover_endpoints()
        if self.persisted.addresses and self.persisted.want_running:
            # Restarting with a known identity: take our addresses before coord answers.
            await self._blocking(self._set_addresses, self.persisted.addresses)
        self._tasks = [
            asyncio.create_task(self._control_loop(), name="mesh-control"),
            asyncio.create_task(self._ticker(), name="mesh-ticker"),
        ]
        try:
            await self._stopped.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.client.aclose()
            self._executor.shutdown(wait=True)

    def stop(self) -> None:
        self._stopped.set()

    # ---- control

    async def _login(self) -> None:
        auth_key = self._auth_key if self._auth_key_usable else ""
        try:
            result = await self._login_request(auth_key)
        except LoginRequired as exc:
            if not auth_key or "new node key" not in str(exc):
                raise
            # Coord does not take an expired node key back: re-authenticate under a fresh one.
            await self._rotate_node_key()
            result = await self._login_request(auth_key)
        self._auth_key_usable = False
        self._logged_in = True
        self.last_error = ""
        self.refused_tags, self.tags_error = result.refused_tags, result.tags_error
        if result.refused_tags:
            log.warning("tags_refused tags=%s reason=%r", ",".join(result.refused_tags), result.tags_error)
        server_key = self.client.server_public_key
        self.persisted = dataclasses.replace(
            self.persisted,
            login_server=self.config.login_server,
            node_id=result.node_id,
            name=result.name,
            addresses=tuple(result.addresses),
            # Pinned from now on: the key this login was sealed to and answered under.
            coord_key=crypto.encode_key(server_key) if server_key else self.persisted.coord_key,
        )
        self._save()
        log.info(
            "logged_in node_id=%d name=%s addresses=%s",
            result.node_id,
            result.name,
            ",".join(result.addresses),
        )
        self.backend_state = BackendState.RUNNING if self.persisted.want_running else BackendState.STOPPED
        await self._blocking(self._set_addresses, result.addresses)

    async def _login_request(self, auth_key: str) -> LoginResult:
        return await self.client.login(
            self.keys.node_public,
            self.keys.disco_public,
            self.config.hostname or _default_hostname(),
            auth_key=auth_key,
            advertised_routes=self.config.advertise_routes,
            endpoints=self.endpoints,
            request_tags=self.advertise_tags,
        )

    async def _rotate_node_key(self) -> None:
        """A new WireGuard key for this node (the machine key, and so the node, stay)."""
        key = crypto.generate_private_key()
        await self._blocking(self.state_dir.replace_node_key, key)
        self.keys = dataclasses.replace(self.keys, node=key)
        await self._blocking(self.engine.set_private_key, key)
        log.info("node_key_rotated node_key=%s", self.keys.node_public)

    async def _control_loop(self) -> None:
        backoff = 0.2
        while True:
            delay = backoff
            try:
                if not self._logged_in:
                    await self._login()
                backoff = 0.2
                async for netmap in self.client.netmaps(
                    self.keys.node_public,
                    endpoints=lambda: self.endpoints,
                    keepalive=STREAM_KEEPALIVE,
                    max_backoff=MAX_BACKOFF,
                ):
                    self.netmap = netmap
                    self.netmaps_received += 1
                    self._remember_self(netmap.self_node)
                    await self.apply()
            except LoginRequired as exc:
                await self._cut_off(str(exc))
                delay = RELOGIN_INTERVAL
            except ControlRefused as exc:
                self.last_error = str(exc)
                log.warning("control_refused status=%d error=%r", exc.status, str(exc))
                backoff = min(backoff * 2, MAX_BACKOFF)
            except ControlUnavailable as exc:
                self.last_error = str(exc)
                log.info("control_unavailable error=%r", str(exc))
                backoff = min(backoff * 2, MAX_BACKOFF)
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), delay)

    def _remember_self(self, me: Node) -> None:
        """Keep state.json in step when coord renames us (addresses are stable for a node's life)."""
        if (me.name, me.addresses) != (self.persisted.name, self.persisted.addresses):
            self.persisted = dataclasses.replace(self.persisted, name=me.name, addresses=tuple(me.addresses))
            self._save()

    async def _cut_off(self, reason: str) -> None:
        """Coord no longer accepts this node (deleted, expired): drop every peer at once."""
        log.warning("login_required reason=%r", reason)
        self._logged_in = False
        self.last_error = reason
        self.backend_state = BackendState.NEEDS_LOGIN
        self.netmap = None
        await self._blocking(self._apply_plan, Plan(addresses=self.applied.addresses))

    async def _ticker(self) -> None:
        last_endpoint_check = self.clock()
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            expiry = self.applied.next_expiry
            if self._apply_failed or (expiry is not None and now >= expiry):
                await self.apply()
            if now - last_endpoint_check >= ENDPOINT_CHECK_INTERVAL:
                last_endpoint_check = now
                await self._check_endpoints()

    async def _check_endpoints(self) -> None:
        endpoints = await self._discover_endpoints()
        if endpoints == self.endpoints:
            return
        self.endpoints = endpoints
        if not self._logged_in:
            return
        try:
            await self.client.update(self.keys.node_public, endpoints=endpoints)
            log.info("endpoints_updated endpoints=%s", ",".join(endpoints))
        except (ControlUnavailable, ControlRefused) as exc:
            # The next stream reconnect reports them anyway.
            log.info("endpoint_update_failed error=%r", str(exc))

    async def _discover_endpoints(self) -> tuple[str, ...]:
        try:
            return await self._blocking(self._endpoint_source)
        except Exception as exc:
            log.warning("endpoint_discovery_failed error=%r", str(exc))
            return self.endpoints

    # ---- applying

    @property
    def running(self) -> bool:
        return self.persisted.want_running and self.backend_state is not BackendState.LOGGED_OUT

    async def apply(self) -> None:
        """Bring the Engine in line with the current netmap (only what changed is touched)."""
        now = self.clock()
        chosen: Mapping[str, Hashable] | None = None
        if self.peer_endpoints is not None and self.netmap is not None:
            usable = [p for p in self.netmap.peers if peer_usable(p, now)]
            chosen = self.peer_endpoints(usable)
        wanted = plan(
            self.netmap,
            now,
            running=self.running,
            own_routes=self.config.advertise_routes,
            accept_routes=self.config.accept_routes,
            endpoints=chosen,
        )
        await self._blocking(self._apply_plan, wanted)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the one netlink worker thread: pyroute2 cannot run inside a running event
        loop, and one worker keeps every reconfiguration in order."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _apply_plan(self, wanted: Plan) -> None:
        old = self.applied
        try:
            if wanted.peers != old.peers:
                self.engine.set_peers(wanted.peers)
            if wanted.packet_filter != old.packet_filter:
                self._install_filter(wanted.packet_filter)
            if wanted.addresses and wanted.addresses != old.addresses:
                self._set_addresses(wanted.addresses)
            if wanted.routes != old.routes:
                self.engine.set_routes(wanted.routes)
        except (OSError, ValueError, netconf.NetconfError) as exc:
            self.last_error = f"applying the netmap failed: {exc}"
            log.error("apply_failed error=%r", str(exc))
            # Forget what was applied: the ticker redoes every step a second later.
            self.applied = Plan()
            self._apply_failed = True
            return
        self.applied = wanted
        self._apply_failed = False
        if wanted.peers != old.peers:
            log.info("peers_configured count=%d routes=%s", len(wanted.peers), ",".join(wanted.routes))

    def _set_addresses(self, addresses: Iterable[str]) -> None:
        try:
            self.engine.set_addresses(tuple(addresses))
        except (OSError, ValueError, netconf.NetconfError) as exc:
            self.last_error = f"setting addresses failed: {exc}"
            log.error("addresses_failed error=%r", str(exc))

    def _install_filter(self, packet_filter: tuple[Mapping[str, Any], ...]) -> None:
        if not packet_filter:
            # No policy: allow all, and keep the packet path free of per-packet hooks.
            self.filter.set_rules((), allow_all=True)
            self.engine.inbound_filter = None
            self.engine.outbound_hook = None
            return
        try:
            rules = [FilterRule.from_dict(dict(rule)) for rule in packet_filter]
        except (ValueError, TypeError) as exc:
            # Fail closed: a policy we cannot read admits no new inbound flows.
            self.filter_errors += 1
            log.error("packet_filter_invalid error=%r action=deny_new_inbound", str(exc))
            rules = []
        self.filter.set_rules(rules, allow_all=False)
        inbound, outbound = self.filter.hooks()
        # Outbound first, so no reply to a flow we open is judged before it is noted.
        self.engine.outbound_hook = outbound
        self.engine.inbound_filter = inbound
        log.info("packet_filter_installed rules=%d", len(rules))

    def _save(self) -> None:
        try:
            self.state_dir.save(self.persisted)
        except OSError as exc:
            log.error("state_save_failed error=%r", str(exc))

    # ---- the local API's requests

    def status(self) -> dict[str, Any]:
        engine_status = self.engine.status()
        engine_peers = engine_status.get("peers", {})
        netmap = self.netmap
        now = self.clock()
        peers = []
        if netmap is not None:
            for node in netmap.peers:
                if not peer_usable(node, now):
                    continue
                live = engine_peers.get(node.node_key, {})
                peers.append(
                    {
                        "id": node.id,
                        "name": node.name,
                        "hostname": node.hostname,
                        "user": node.user,
                        "tags": list(node.tags),
                        "node_key": node.node_key,
                        "addresses": [a.split("/")[0] for a in node.addresses],
                        "allowed_ips": list(node.allowed_ips),
                        "online": node.online,
                        "last_seen": node.last_seen,
                        "endpoint": live.get("endpoint"),
                        "active": node.node_key in engine_peers,
                        "rx_bytes": live.get("rx_bytes", 0),
                        "tx_bytes": live.get("tx_bytes", 0),
                        "last_handshake_seconds_ago": live.get("last_handshake_seconds_ago"),
                    }
                )
        me = netmap.self_node if netmap is not None else None
        return {
            "backend_state": str(self.backend_state),
            "error": self.last_error,
            "login_server": self.config.login_server,
            "interface": self.config.tun,
            "listen_port": engine_status.get("listen_port"),
            "netmap_version": netmap.version if netmap is not None else None,
            "self": {
                "id": self.persisted.node_id,
                "name": me.name if me else self.persisted.name,
                "hostname": me.hostname if me else (self.config.hostname or _default_hostname()),
                "user": me.user if me else "",
                "tags": list(me.tags) if me else [],
                "advertised_tags": list(self.advertise_tags),
                "refused_tags": list(self.refused_tags),
                "tags_error": self.tags_error,
                "node_key": self.keys.node_public,
                "addresses": [a.split("/")[0] for a in self.persisted.addresses],
                "online": self._logged_in and netmap is not None,
                "endpoints": list(self.endpoints),
                "advertised_routes": list(self.config.advertise_routes),
                "approved_routes": list(me.approved_routes) if me else [],
                "accept_routes": self.config.accept_routes,
                "key_expiry": me.key_expiry if me else None,
            },
            "peers": peers,
            "packet_filter": {
                "rules": len(self.filter.rules),
                "allow_all": self.filter.allow_all,
                "drops": dict(self.filter.drops),
                "errors": self.filter_errors,
            },
            "drops": engine_status.get("drops", {}),
        }

    def ip(self) -> list[str]:
        if self.backend_state is BackendState.LOGGED_OUT:
            raise MeshError(409, "logged out: start wiremeshd again with an auth key")
        addresses = [a.split("/")[0] for a in self.persisted.addresses]
        if not addresses:
            raise MeshError(503, "no addresses yet: not logged in (see `wiremesh status`)")
        return addresses

    async def up(self, auth_key: str = "", advertise_tags: Sequence[str] | None = None) -> dict[str, Any]:
        """Resume forwarding; with `auth_key`, re-authenticate a node coord cut off (expired);
        with `advertise_tags`, ask coord for these tags (at once when logged in)."""
        if self.backend_state is BackendState.LOGGED_OUT:
            raise MeshError(409, "logged out: start wiremeshd again with an auth key")
        if len(auth_key) > MAX_AUTH_KEY_BYTES:
            raise MeshError(400, f"auth key longer than {MAX_AUTH_KEY_BYTES} bytes")
        if advertise_tags is not None:
            try:
                self.advertise_tags = check_tags(list(advertise_tags))
            except ControlError as exc:
                raise MeshError(400, str(exc)) from None
        if auth_key:
            self._auth_key, self._auth_key_usable = auth_key, True
        self.persisted = dataclasses.replace(self.persisted, want_running=True)
        self._save()
        if self._logged_in and advertise_tags is not None:
            # A login under the same node key is idempotent; coord answers with the tags granted.
            try:
                await self._login()
            except ControlUnavailable as exc:
                raise MeshError(503, f"coord unreachable: {exc}") from exc
            except ControlRefused as exc:
                raise MeshError(502, f"coord refused the login: {exc}") from exc
        if self._logged_in:
            self.backend_state = BackendState.RUNNING
        else:
            self._kick.set()  # try to log in again now rather than at the next retry
        await self.apply()
        log.info("up")
        return self.status()

    async def up_with_auth_key(self, auth_key: str) -> dict[str, Any]:
        return await self.up(auth_key)

    async def up_with_tags(self, auth_key: str, advertise_tags: Sequence[str]) -> dict[str, Any]:
        return await self.up(auth_key, advertise_tags)

    async def down(self) -> dict[str, Any]:
        if self.backend_state is BackendState.LOGGED_OUT:
            raise MeshError(409, "logged out")
        self.persisted = dataclasses.replace(self.persisted, want_running=False)
        self._save()
        if self._logged_in:
            self.backend_state = BackendState.STOPPED
        await self.apply()
        log.info("down")
        return self.status()

    async def logout(self) -> dict[str, Any]:
        if self.backend_state is BackendState.LOGGED_OUT:
            return self.status()
        if self._logged_in:
            try:
                await self.client.logout(self.keys.node_public)
            except ControlUnavailable as exc:
                raise MeshError(503, f"coord unreachable, still logged in: {exc}") from exc
            except LoginRequired:
                pass  # coord already forgot us: nothing left to deregister
            except ControlRefused as exc:
                raise MeshError(502, f"coord refused the logout: {exc}") from exc
        for task in self._tasks:
            if task.get_name() == "mesh-control":
                task.cancel()
        self.backend_state = BackendState.LOGGED_OUT
        self._logged_in = False
        self.netmap = None
        await self._blocking(self._apply_plan, Plan())
        await self._blocking(self._set_addresses, ())
        self.applied = Plan()
        self.persisted = Persisted()
        self.state_dir.remove()
        log.info("logged_out state_removed=%s", self.state_dir.path)
        return self.status()


def _default_hostname() -> str:
    name = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isalnum() or c == "-" else "-" for c in name).strip("-")
    return cleaned[:63] or "node"


class MeshCollector:
    """Scrape-time metrics of the controller and the packet filter (nothing on the packet path)."""

    def __init__(self, agent: MeshAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agent = self.agent
        drops = CounterMetricFamily(
            "wiremesh_filter_drops", "Inbound packets the ACL packet filter dropped", labels=["reason"]
        )
        for reason, count in agent.filter.drops.items():
            drops.add_metric([reason], count)
        yield drops
        yield CounterMetricFamily(
            "wiremesh_filter_accepted",
            "Inbound packets the ACL packet filter let through",
            value=agent.filter.accepted,
        )
        yield GaugeMetricFamily(
            "wiremesh_filter_rules", "Packet-filter rules in force", value=len(agent.filter.rules)
        )
        yield GaugeMetricFamily(
            "wiremesh_filter_flows", "Flows tracked for replies", value=agent.filter.flow_count
        )
        yield CounterMetricFamily(
            "wiremesh_netmaps_received", "Netmaps (full or delta) applied", value=agent.netmaps_received
        )
        yield GaugeMetricFamily(
            "wiremesh_mesh_peers", "WireGuard peers configured", value=len(agent.applied.peers)
        )
        state = GaugeMetricFamily("wiremesh_backend_state", "1 for the current state", labels=["state"])
        for member in BackendState:
            state.add_metric([str(member)], 1.0 if agent.backend_state is member else 0.0)
        yield state


# ----------------------------------------------------------------------------- wiremeshd mesh mode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mesh mode", "join a mesh through a coordination server")
    group.add_argument("--login-server", metavar="URL", help="coord's URL, e.g. http://coord:8080")
    group.add_argument(
        "--coord-key",
        metavar="KEY",
        default=os.environ.get("WIREMESH_COORD_KEY", ""),
        help="coord's control public key, pinned (`wiremesh admin coord-key` prints it; default "
        "$WIREMESH_COORD_KEY). Not needed with an auth key from `wiremesh admin authkeys create` (it "
        "carries the key's fingerprint) or once joined (state.json keeps the key of the first login); "
        "give it to accept a coord whose key was replaced",
    )
    group.add_argument(
        "--insecure-learn-coord-key",
        action="store_true",
        help="LAB ONLY: over plain http://, trust whatever key the login server presents at the first "
        "login (anyone on the path could pose as coord)",
    )
    group.add_argument(
        "--auth-key",
        metavar="KEY",
        default=None,
        help="pre-auth key for the first login; 'file:PATH' reads it from a file; "
        "default: $WIREMESH_AUTH_KEY (keeps it out of ps)",
    )
    group.add_argument(
        "--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, help="keys and state (default %(default)s)"
    )
    group.add_argument("--hostname", metavar="NAME", default="", help="name to register (default: host name)")
    group.add_argument(
        "--advertise-routes", metavar="P1,P2", default="", help="subnets to offer the mesh (need approval)"
    )
    group.add_argument(
        "--accept-routes",
        action="store_true",
        help="route the subnets other nodes advertise (and an admin approved) into the mesh;"
        " off by default, as in Tailscale: the host's own routes always win over them",
    )
    group.add_argument(
        "--snat-subnet-routes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as a subnet router, masquerade forwarded traffic: the subnet sees this node's"
        " address on it and peers see its mesh address (default on; --no-snat-subnet-routes"
        " keeps source addresses)",
    )
    group.add_argument(
        "--advertise-tags",
        metavar="TAG1,TAG2",
        default="",
        help="tags to ask coord for (tag:name); granted when this node's user owns them in the"
        " policy's tagOwners, refused ones show in `wiremesh status`",
    )
    group.add_argument("--listen-port", metavar="N", type=int, default=0, help="UDP port (default: any)")
    group.add_argument(
        "--socket", metavar="PATH", default="", help=f"local API socket (default DIR/{SOCKET_NAME})"
    )
    group.add_argument("--mtu", type=int, default=DEFAULT_MESH_MTU, help="TUN MTU (default %(default)s)")


def selected(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "login_server", None))


def read_auth_key(value: str | None) -> str:
    """--auth-key KEY | file:PATH, else $WIREMESH_AUTH_KEY; ValueError with the reason."""
    if value is None:
        value = os.environ.get("WIREMESH_AUTH_KEY", "")
    if value.startswith("file:"):
        path = pathlib.Path(value[5:])
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_AUTH_KEY_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"cannot read the auth key from {path}: {exc.strerror}") from None
        value = raw.decode(errors="replace")
    value = value.strip()
    if len(value) > MAX_AUTH_KEY_BYTES:
        raise ValueError(f"auth key longer than {MAX_AUTH_KEY_BYTES} bytes")
    return value


def config_from_args(args: argparse.Namespace) -> MeshConfig:
    """ValueError with a clear reason for anything malformed."""
    url = str(args.login_server).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--login-server must be an http:// or https:// URL, got {url!r}")
    routes = tuple(r.strip() for r in str(args.advertise_routes).split(",") if r.strip())
    for route in routes:
        netconf.parse_prefix(route)
    try:
        tags = check_tags([t.strip() for t in str(args.advertise_tags).split(",") if t.strip()])
    except ControlError as exc:
        raise ValueError(f"--advertise-tags: {exc}") from None
    if not 0 <= args.listen_port < 65536:
        raise ValueError(f"--listen-port must be 0..65535, got {args.listen_port}")
    if not 1280 <= args.mtu <= 65535:
        raise ValueError(f"--mtu must be 1280..65535, got {args.mtu}")
    coord_key = str(args.coord_key or "").strip()
    if coord_key:
        try:
            crypto.decode_key(coord_key)
        except ValueError:
            raise ValueError(
                f"--coord-key is not a key (want 44 base64 characters): {coord_key[:60]!r}"
            ) from None
    state_dir = str(args.state_dir)
    return MeshConfig(
        login_server=url,
        state_dir=state_dir,
        tun=args.tun,
        auth_key=read_auth_key(args.auth_key),
        hostname=args.hostname,
        advertise_routes=tuple(str(netconf.parse_prefix(r)) for r in routes),
        advertise_tags=tags,
        accept_routes=bool(args.accept_routes),
        snat_subnet_routes=bool(args.snat_subnet_routes),
        listen_port=args.listen_port,
        socket_path=args.socket or str(pathlib.Path(state_dir) / SOCKET_NAME),
        mtu=args.mtu,
        metrics_listen=args.metrics_listen,
        coord_key=coord_key,
        insecure_learn_coord_key=bool(args.insecure_learn_coord_key),
    )


def run(args: argparse.Namespace) -> int:
    """wiremeshd in mesh mode; returns the exit code."""
    from prometheus_client import CollectorRegistry

    from wiremesh.agent import metrics
    from wiremesh.agent.engine import Engine

    try:
        config = config_from_args(args)
        state_dir = StateDir(config.state_dir)
        keys = state_dir.load_or_create_keys()
        coord_pin(config, state_dir.load())
    except (ValueError, StateError, OSError) as exc:
        log.error("config_invalid error=%r", str(exc))
        return EXIT_CONFIG
    if not config.auth_key and state_dir.load().node_id is None:
        log.warning("no_auth_key hint=first login needs --auth-key, file:PATH or $WIREMESH_AUTH_KEY")
    registry = CollectorRegistry()
    engine = Engine(keys.node, config.tun, listen_port=config.listen_port, mtu=config.mtu, metrics=registry)
    server = None
    routing_subnets = False
    try:
        engine.start()
        if config.advertise_routes:
            routing_subnets = _start_subnet_router(config)
        server = metrics.serve_if_wanted(registry, config.metrics_listen)
        return asyncio.run(_serve(config, state_dir, keys, engine, registry))
    except (OSError, netconf.NetconfError, ValueError) as exc:
        log.error("startup_failed interface=%s error=%r", config.tun, str(exc))
        return EXIT_RUNTIME
    finally:
        if server is not None:
            server.shutdown()
        engine.stop()
        if routing_subnets:
            with contextlib.suppress(subnetrouter.SubnetRouterError):
                subnetrouter.remove(config.tun)


def _start_subnet_router(config: MeshConfig) -> bool:
    """Masquerade and MSS clamping for the subnets we advertise; a failure is logged, not fatal
    (the mesh itself still works, forwarding may not)."""
    forwarding = subnetrouter.forwarding_enabled()
    if not forwarding["ipv4"]:
        log.warning("ip_forwarding_off family=ipv4 hint=sysctl -w net.ipv4.ip_forward=1 to route subnets")
    try:
        subnetrouter.install(config.tun, config.mtu, snat=config.snat_subnet_routes)
    except subnetrouter.SubnetRouterError as exc:
        log.error("subnet_router_rules_failed error=%r", str(exc))
        return False
    return True


async def _serve(config: MeshConfig, state_dir: StateDir, keys: Keys, engine: Any, registry: Any) -> int:
    from wiremesh.agent import metrics
    from wiremesh.agent.localapi import LocalAPIServer
    from wiremesh.agent.magicsock import attach_to_mesh

    # magicsock (NAT traversal, relays) takes over peers' paths once coord sends a relay map.
    magicsock = attach_to_mesh(engine, keys.node, keys.disco)
    agent = MeshAgent(config, state_dir, keys, engine, endpoints=magicsock.endpoint_strings)
    magicsock.bind(agent)
    registry.register(MeshCollector(agent))
    registry.register(metrics.MagicsockCollector(magicsock.magicsock))
    api = LocalAPIServer(magicsock.local_api_backend(agent), config.socket_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    await api.start()
    log.info(
        "ready mode=mesh interface=%s listen_port=%d socket=%s login_server=%s",
        config.tun,
        engine.listen_port,
        config.socket_path,
        config.login_server,
    )
    try:
        await agent.run()
    finally:
        await api.close()
        magicsock.magicsock.stop()
    log.info("shutting_down")
    return 0
