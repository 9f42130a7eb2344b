"""The mesh-mode controller: log in to coord, follow the netmap, keep the Engine configured to
match it, and serve the local API's requests (up, down, logout, status).

`MeshAgent` (asyncio) logs in with the keys from the state directory, streams the netmap (the
control client reconnects with backoff and resyncs in full), and after every netmap change
applies the difference between the new plan (plan.py) and the applied one to the Engine
(applier.py), so a removed or expired peer leaves the Device at once. When coord or NATS is away nothing is torn
down: the data plane keeps the last netmap.

The auth key is only offered until the first successful login of the process: a node that coord
later deletes or expires stays cut off (NeedsLogin) instead of silently re-registering.

Coord's key is pinned as config.py's `coord_pin` says.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from wiremesh.agent import exitnode, hostnet, netconf
from wiremesh.agent.agentdns import AgentDNS
from wiremesh.agent.control import (
    ControlClient,
    ControlRefused,
    ControlUnavailable,
    LoginRequired,
    LoginResult,
)
from wiremesh.agent.mesh import report
from wiremesh.agent.mesh.applier import PlanApplier
from wiremesh.agent.mesh.config import MAX_AUTH_KEY_BYTES, MeshConfig, coord_pin, default_hostname
from wiremesh.agent.mesh.plan import Plan, peer_usable, plan
from wiremesh.agent.state import Keys, Persisted, StateDir
from wiremesh.agent.svcproxy import ServiceProxy
from wiremesh.core import crypto
from wiremesh.core.control.channel import ControlError
from wiremesh.core.control.messages import check_tags
from wiremesh.core.netmap import NetworkMap, Node
from wiremesh.core.packetfilter import Filter

log = logging.getLogger("wiremesh.agent.mesh")
T = TypeVar("T")

STREAM_KEEPALIVE = 5.0  # coord sends a frame at least this often; a silent stream is noticed in ~3x
ENDPOINT_CHECK_INTERVAL = 10.0
RELOGIN_INTERVAL = 10.0
MAX_BACKOFF = 5.0


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


class MeshPaths(Protocol):
    """What the controller asks of path selection (magicsock, bound in binding.py)."""

    def peer_endpoints(self, netmap: NetworkMap, usable: Sequence[Node]) -> Mapping[str, Hashable]:
        """{node key: WireGuard endpoint} for the peers whose paths it chooses (may be none)."""
        ...

    def endpoints(self) -> tuple[str, ...]:
        """Our endpoints to publish (ip:port)."""
        ...


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
        paths: MeshPaths | None = None,
        dns: AgentDNS | None = None,
        proxy: ServiceProxy | None = None,
    ) -> None:
        self.config = config
        self.state_dir = state_dir
        self.keys = keys
        self.engine = engine
        self.clock = clock
        self.dns = dns  # MagicDNS: kept in step with every netmap
        self.proxy = proxy  # a Service proxy's forwarding rules, likewise
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
        self.applier = PlanApplier(engine, config.tun, dns.addresses if dns is not None else ())
        # One filter for the interface's whole life, on every packet even with no policy, so
        # that the first policy knows which flows were ours and cuts the peers' it does not allow.
        self.filter = Filter(allow_all=True)
        engine.packet_filter = self.filter
        self.netmaps_received = 0
        self.last_error = ""
        self.endpoints: tuple[str, ...] = ()
        # Without path selection, a peer's endpoint is the first one it lists (plan.py).
        self.paths = paths
        self._endpoint_source = (
            paths.endpoints
            if paths is not None
            else (lambda: hostnet.local_endpoints(engine.listen_port, exclude=(config.tun,)))
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._auth_key = config.auth_key
        self._auth_key_usable = bool(config.auth_key)
        self.advertise_tags = config.advertise_tags
        self.refused_tags: tuple[str, ...] = ()  # what coord did not grant at the last login, and why
        self.tags_error = ""
        self.auth_url = ""  # where the user signs in, while an interactive (OIDC) login waits
        self.lan_prefixes: tuple[str, ...] = ()  # the host's connected subnets (exitnode.py)
        if config.exit_node is not None or config.exit_node_allow_lan_access is not None:
            self.persisted = dataclasses.replace(
                self.persisted,
                exit_node=self.persisted.exit_node if config.exit_node is None else config.exit_node,
                exit_node_allow_lan_access=bool(config.exit_node_allow_lan_access),
            )
        self._force_reauth = False
        self._logged_in = False
        self._kick = asyncio.Event()
        self._stopped = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mesh-netlink")

    # ---- lifecycle

    async def run(self) -> None:
        """Until stop(): the control loop and the ticker."""
        self._loop = asyncio.get_running_loop()
        self.endpoints = await self._discover_endpoints()
        await self._check_lan()
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

    def report_paths(self, endpoints: tuple[str, ...], home_relay: int | None) -> None:
        """Path selection found new endpoints or a new home relay: tell coord (any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        async def update() -> None:
            try:
                await self.client.update(self.keys.node_public, endpoints=endpoints, home_relay=home_relay)
                log.info("reported endpoints=%s home_region=%s", ",".join(endpoints), home_relay)
            except Exception as exc:
                log.info("report_failed error=%r", str(exc))

        loop.call_soon_threadsafe(lambda: loop.create_task(update()))

    # ---- control

    async def _login(self) -> None:
        auth_key = self._auth_key if self._auth_key_usable else ""
        try:
            result = await self._login_request(auth_key)
        except LoginRequired as exc:
            if "new node key" not in str(exc):
                raise
            # Coord does not take an expired node key back: re-authenticate under a fresh one.
            await self._rotate_node_key()
            result = await self._login_request(auth_key)
        self._auth_key_usable = False
        self._force_reauth = False
        self.auth_url = ""
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
            self.config.hostname or default_hostname(),
            auth_key=auth_key,
            advertised_routes=self.config.advertise_routes,
            endpoints=self.endpoints,
            request_tags=self.advertise_tags,
            force_reauth=self._force_reauth,
            on_auth_url=self._show_auth_url,
        )

    def _show_auth_url(self, url: str) -> None:
        """An interactive login waits for the user: `wiremesh up` and `status` show where."""
        self.auth_url = url
        if not self._logged_in:
            self.backend_state = BackendState.NEEDS_LOGIN
        log.warning("login_url url=%s hint=open it in a browser and sign in", url)

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
        self.auth_url = ""  # a refused or expired interactive login: the next try gets a new URL
        self.backend_state = BackendState.NEEDS_LOGIN
        self.netmap = None
        await self._blocking(self._apply_plan, Plan(addresses=self.applier.applied.addresses))

    async def _ticker(self) -> None:
        last_endpoint_check = self.clock()
        while True:
            await asyncio.sleep(1.0)
            now = self.clock()
            expiry = self.applier.applied.next_expiry
            if self.applier.failed or (expiry is not None and now >= expiry):
                await self.apply()
            if now - last_endpoint_check >= ENDPOINT_CHECK_INTERVAL:
                last_endpoint_check = now
                await self._check_endpoints()
                await self._check_lan()

    async def _check_lan(self) -> None:
        """Re-read the host's connected subnets (a laptop changes networks); re-plan if they moved."""
        try:
            lan = await self._blocking(netconf.connected_prefixes, (self.config.tun,))
        except (OSError, netconf.NetconfError) as exc:
            log.warning("lan_discovery_failed error=%r", str(exc))
            return
        if lan != self.lan_prefixes:
            self.lan_prefixes = lan
            if self.persisted.exit_node:
                await self.apply()

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
        if self.paths is not None and self.netmap is not None:
            usable = [p for p in self.netmap.peers if peer_usable(p, now)]
            chosen = self.paths.peer_endpoints(self.netmap, usable)
        wanted = plan(
            self.netmap,
            now,
            running=self.running,
            own_routes=self.config.advertise_routes,
            accept_routes=self.config.accept_routes,
            endpoints=chosen,
            exit_node=self.persisted.exit_node,
            lan_prefixes=self.lan_prefixes,
            allow_lan=self.persisted.exit_node_allow_lan_access,
        )
        if wanted.exit != self.applier.applied.exit and wanted.exit.error:
            log.warning("exit_node_unusable error=%r", wanted.exit.error)
        await self._blocking(self._apply_plan, wanted)
        if self.dns is not None:
            await self.dns.update(self.netmap if self.running else None)
        if self.proxy is not None:
            await self._blocking(self.proxy.update, self.netmap if self.running else None)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the one netlink worker thread: pyroute2 cannot run inside a running event
        loop, and one worker keeps every reconfiguration in order."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _apply_plan(self, wanted: Plan) -> None:
        # On the netlink worker; what went wrong becomes status's "error" (last_error).
        if error := self.applier.apply(wanted):
            self.last_error = error

    def _set_addresses(self, addresses: Iterable[str]) -> None:
        if error := self.applier.set_addresses(addresses):
            self.last_error = error

    def _save(self) -> None:
        try:
            self.state_dir.save(self.persisted)
        except OSError as exc:
            log.error("state_save_failed error=%r", str(exc))

    # ---- the local API's requests

    def status(self) -> dict[str, Any]:
        return report.status(
            backend_state=str(self.backend_state),
            error=self.last_error,
            auth_url=self.auth_url,
            config=self.config,
            persisted=self.persisted,
            netmap=self.netmap,
            now=self.clock(),
            engine_status=self.engine.status(),
            node_key=self.keys.node_public,
            logged_in=self._logged_in,
            endpoints=self.endpoints,
            advertised_tags=self.advertise_tags,
            refused_tags=self.refused_tags,
            tags_error=self.tags_error,
            exit_choice=self.applier.applied.exit,
            packet_filter=self.filter,
            filter_errors=self.applier.filter_errors,
            dns=self.dns,
            proxy=self.proxy,
        )

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

    async def set_exit_node(self, selector: str, allow_lan_access: bool) -> dict[str, Any]:
        """`wiremesh up --exit-node NAME|IP [--exit-node-allow-lan-access]` ("" stops using one)."""
        try:
            selector = exitnode.check_selector(selector)
        except ValueError as exc:
            raise MeshError(400, str(exc)) from None
        self.persisted = dataclasses.replace(
            self.persisted, exit_node=selector, exit_node_allow_lan_access=allow_lan_access
        )
        self._save()
        await self._check_lan()
        await self.apply()
        log.info("exit_node_set exit_node=%r allow_lan_access=%s", selector, allow_lan_access)
        return self.status()

    async def up_force_reauth(self) -> dict[str, Any]:
        """Sign in again at the identity provider (`wiremesh up --force-reauth`): the node keeps
        working meanwhile; status shows the login URL until the user has signed in."""
        if self.backend_state is BackendState.LOGGED_OUT:
            raise MeshError(409, "logged out: start wiremeshd again")
        self._force_reauth = True
        if self._logged_in:
            task = asyncio.create_task(self._reauthenticate(), name="mesh-reauth")
            self._tasks.append(task)
            # Answer once coord handed out the login URL (or, without OIDC, once the login is done).
            deadline = self.clock() + 10.0
            while not task.done() and not self.auth_url and self.clock() < deadline:
                await asyncio.wait({task}, timeout=0.1)
        return await self.up()

    async def _reauthenticate(self) -> None:
        try:
            await self._login()
        except (ControlRefused, ControlUnavailable) as exc:
            self.last_error = str(exc)
            self.auth_url = ""
            self._force_reauth = False
            log.warning("reauth_failed error=%r", str(exc))

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
        self.applier.applied = Plan()
        self.persisted = Persisted()
        self.state_dir.remove()
        log.info("logged_out state_removed=%s", self.state_dir.path)
        return self.status()
