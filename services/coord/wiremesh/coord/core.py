"""Coord's logic around the mesh: logins, netmap streams, admin operations, replica fan-out.

`Coordinator` is the service object the HTTP layer (app.py) calls. It keeps the in-memory
mesh current from three sources: its own changes, NodeChanged events from other replicas
(reloaded from the shared database) and key events from the key registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from sqlalchemy.exc import IntegrityError

from wiremesh.coord import limits, store
from wiremesh.coord.oidc import OidcConfig
from wiremesh.coord.oidc_login import InteractiveLogins, LoginPending
from wiremesh.coord.policy_store import PolicyMesh, PolicyService
from wiremesh.core import bus, crypto, dnsconfig
from wiremesh.core.busauth import BusAccess
from wiremesh.core.control import coordkey
from wiremesh.core.control import messages as cm
from wiremesh.core.control.channel import ControlError, HandshakeRefused, ReplayGuard, ServerCall
from wiremesh.shell import service

log = logging.getLogger("wiremesh.coord")
# How long past its own freshness window a handshake's row is kept: replicas' clocks may disagree
# by this much, and one whose clock runs behind still finds the handshake fresh.
HANDSHAKE_CLOCK_MARGIN = 60.0
# Open netmap streams one node may hold on a replica; a newer one closes the oldest. One is what an
# agent needs; the second covers a reconnect whose old stream coord has not noticed gone yet.
MAX_STREAMS_PER_NODE = 2
MIGRATIONS = str(pathlib.Path(__file__).parent / "migrations")
VERSION_TABLE = "coord_alembic_version"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class CoordConfig:
    database_url: str
    bus: BusAccess
    replica_id: str = "coord"
    admin_key: str = ""
    visibility: str = "all"
    ephemeral_grace: float = 30.0
    node_key_expiry: float | None = 180 * 86400.0  # tagged nodes never expire, as in Tailscale
    keys_timeout: float = 5.0
    heartbeat_interval: float = 10.0
    control_key_file: str = ""
    derp_map_file: str = ""
    dns_config_file: str = ""  # JSON (wiremesh.core.dnsconfig); default: MagicDNS on DEFAULT_DOMAIN
    # Announce accepted handshakes on NATS so other replicas refuse a replay from memory; the
    # database refuses it either way (off only to test exactly that).
    share_handshakes: bool = True
    # Interactive login through an OpenID provider (oidc_login.py); server_url is coord's URL
    # as browsers reach it.
    oidc: OidcConfig | None = None
    server_url: str = ""
    agent_rate: float = limits.DEFAULT_RATE  # agent requests per second per source address; 0: off
    agent_burst: float = limits.DEFAULT_BURST


def create_private_key_file(path: pathlib.Path) -> None:
    """A new private key at `path`, 0600 from its first byte and whole when it appears: written to a
    temporary file created 0600 (whatever the umask), then linked into place, so no reader ever
    sees it loose or half written, and of two processes racing only one key wins (the other's link
    fails and it reads the winner's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (crypto.encode_key(crypto.generate_private_key()) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)


class ClaimRefused(ControlError):
    """The request's handshake could not be claimed (a replay, or no database): answered as is."""


def load_dns_config(path: str) -> dnsconfig.DNSConfig:
    """The DNS configuration from a JSON file ("" = the defaults); ValueError says what is wrong."""
    if not path:
        return dnsconfig.DNSConfig()
    try:
        raw = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the DNS configuration {path}: {exc}") from None
    try:
        return dnsconfig.DNSConfig.from_json(raw)
    except dnsconfig.DNSConfigError as exc:
        raise ValueError(f"DNS configuration {path}: {exc}") from None


class Stream:
    """One agent's open netmap stream on this replica."""

    __slots__ = (
        "call",
        "closed",
        "code",
        "dirty",
        "error",
        "full",
        "keepalive",
        "node_id",
        "opened",
        "self_dirty",
        "wake",
    )
    _opened = 0

    def __init__(self, node_id: int, call: ServerCall, keepalive: float) -> None:
        Stream._opened += 1
        self.opened = Stream._opened  # order of opening, to find a node's oldest stream
        self.node_id = node_id
        self.call = call
        self.keepalive = keepalive
        self.dirty: set[int] = set()
        self.self_dirty = False
        self.full = False
        self.closed = False
        self.error = ""
        self.code = 0
        self.wake = asyncio.Event()

    def close(self, error: str = "", code: int = 403) -> None:
        """End the stream; with `error`, the agent is told why (code 5xx: retry, 4xx: log in again)."""
        self.closed = True
        self.error = error
        self.code = code
        self.wake.set()


class Coordinator:
    def __init__(self, config: CoordConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock
        self.mesh = PolicyMesh(config.visibility)
        self.policy = PolicyService(self)  # the ACL policy: visibility and per-node packet filters
        self.interactive = (
            InteractiveLogins(config.oidc, config.server_url, self._db, clock, self.changed)
            if config.oidc is not None
            else None
        )
        self.streams: dict[int, set[Stream]] = {}
        self.guard = ReplayGuard()
        self.db: service.Database | None = None
        self.nc: NATS | None = None
        self.private_key = b""
        self.public_key = b""
        self.derp_map: dict[str, Any] = {}
        self.dns = dnsconfig.DNSConfig()
        self._dns_json = json.dumps(self.dns.to_json(), separators=(",", ":")).encode()
        self.packet_filter: list[dict[str, Any]] = []
        self._version = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._announcements: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("wiremesh_coord_nodes", "nodes known", registry=r).set_function(lambda: len(self.mesh))
        Gauge("wiremesh_coord_streams", "open netmap streams", registry=r).set_function(
            lambda: sum(len(s) for s in self.streams.values())
        )
        self.logins = Counter("wiremesh_coord_logins", "login attempts", ["outcome"], registry=r)
        self.refused = Counter("wiremesh_coord_refused", "refused agent requests", ["reason"], registry=r)
        self.frames = Counter("wiremesh_coord_frames_sent", "netmap stream frames", ["type"], registry=r)
        self.changes = Counter(
            "wiremesh_coord_changes", "node changes applied", ["change", "source"], registry=r
        )
        self.shared_handshakes = Counter(
            "wiremesh_coord_handshakes_shared", "handshakes announced by replicas (replay cache)", registry=r
        )
        self.handshakes_forgotten = Counter(
            "wiremesh_coord_handshakes_forgotten",
            "stale handshakes deleted from the shared replay table",
            registry=r,
        )
        self.auto_approvals = Counter(
            "wiremesh_coord_routes_auto_approved", "routes approved by the policy's autoApprovers", registry=r
        )
        self.fanout = Histogram(
            "wiremesh_coord_change_fanout",
            "nodes affected by one change",
            buckets=(1, 10, 100, 1000, 10000, 100000),
            registry=r,
        )

    # lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        engine = service.make_engine(self.config.database_url)
        await asyncio.to_thread(service.run_migrations, engine, MIGRATIONS, VERSION_TABLE)
        self.db = service.Database(engine)
        self.private_key = await self._load_control_key()
        self.public_key = crypto.public_key(self.private_key)
        if self.config.derp_map_file:
            self.derp_map = json.loads(pathlib.Path(self.config.derp_map_file).read_text())
        self.dns = load_dns_config(self.config.dns_config_file)
        self._dns_json = json.dumps(self.dns.to_json(), separators=(",", ":")).encode()
        for record in await self.db.run(store.load_all):
            self.mesh.upsert(record)
        await self.policy.load()
        self.nc = await service.wait_for_nats(self.config.bus, self.config.replica_id)
        await self.nc.subscribe(bus.NODE_CHANGED, cb=self._on_node_changed)
        await self.nc.subscribe(bus.NODE_KEY_REMOVED, cb=self._on_node_key_removed)
        if self.config.share_handshakes:
            await self.nc.subscribe(bus.HANDSHAKE_SEEN, cb=self._on_handshake_seen)
        await self.policy.subscribe(self.nc)
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        log.info("coord started", extra={"replica": self.config.replica_id, "nodes": len(self.mesh)})

    def begin_shutdown(self) -> None:
        """Close every stream so agents reconnect elsewhere and uvicorn can finish promptly."""
        self._stopping = True
        for streams in list(self.streams.values()):
            for stream in list(streams):
                stream.close("coord is shutting down", 503)

    async def stop(self) -> None:
        self.begin_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.interactive is not None:
            await self.interactive.aclose()
        if self.db is not None:
            self.db.close()

    def ready(self) -> bool:
        return self.db is not None and self.nc is not None and self.nc.is_connected

    async def _load_control_key(self) -> bytes:
        if self.config.control_key_file:
            path = pathlib.Path(self.config.control_key_file)
            if not path.exists():
                create_private_key_file(path)
            return crypto.decode_key(path.read_text())
        # Replicas share one control key through the database, so an agent may reach any of them.
        fresh = crypto.encode_key(crypto.generate_private_key())
        assert self.db is not None
        try:
            stored = await self.db.run(lambda s: store.set_setting_once(s, "control_private_key", fresh))
        except IntegrityError:  # another replica stored its key first: use that one
            stored = await self.db.run(lambda s: store.get_setting(s, "control_private_key") or "")
        return crypto.decode_key(stored)

    async def _db(self, fn: Callable[[Any], T]) -> T:
        assert self.db is not None
        return await self.db.run(fn)

    def _next_version(self) -> int:
        self._version = max(self._version + 1, time.time_ns() // 1000)
        return self._version

    # applying changes --------------------------------------------------------------------

    def apply(self, record: store.NodeRecord | None, node_id: int, change: str, source: str) -> None:
        """Update the mesh and mark every affected stream dirty."""
        if record is None:
            affected = self.mesh.remove(node_id)
            for stream in list(self.streams.get(node_id, ())):
                stream.close("node deleted; log in again with an auth key")
        else:
            affected = self.mesh.upsert(record)
            for stream in self.streams.get(node_id, ()):
                if record.expired:
                    stream.close("node key expired; log in again")
                elif node_id in affected:
                    stream.full = True
                else:
                    stream.self_dirty = True
                stream.wake.set()
        affected.discard(node_id)
        self.changes.labels(change, source).inc()
        self.fanout.observe(len(affected))
        for viewer in affected:
            for stream in self.streams.get(viewer, ()):
                stream.dirty.add(node_id)
                stream.wake.set()
        # Subnet routers an election moved a prefix to or from (the primary went offline, say).
        for router in self.mesh.take_entries_changed():
            other = self.mesh.get(router)
            if other is None:
                continue
            log.info(
                "primary routes changed",
                extra={"node_id": router, "routes": list(self.mesh.primary_routes(router))},
            )
            for viewer in self.mesh.viewers(other):
                for stream in self.streams.get(viewer, ()):
                    stream.dirty.add(router)
                    stream.wake.set()
            for stream in self.streams.get(router, ()):
                stream.self_dirty = True
                stream.wake.set()
        self.policy.flush_filter_changes()

    async def _publish(self, node_id: int, change: str) -> None:
        if self.nc is None or not self.nc.is_connected:
            return  # other replicas resync from the database when they next reload this node
        with contextlib.suppress(Exception):
            await self.nc.publish(
                bus.NODE_CHANGED,
                bus.encode(bus.NodeChanged(node_id=node_id, change=change, origin=self.config.replica_id)),
            )

    async def changed(self, record: store.NodeRecord | None, node_id: int, change: str) -> None:
        self.apply(record, node_id, change, "local")
        await self._publish(node_id, change)

    async def _on_node_changed(self, msg: Msg) -> None:
        try:
            event = bus.decode(bus.NodeChanged, msg.data)
        except ValueError:
            self.refused.labels("bad_bus_message").inc()
            return
        if event.origin == self.config.replica_id:
            return
        record = await self._db(lambda s: store.load_node(s, event.node_id))
        self.apply(record, event.node_id, event.change, "replica")

    async def _on_handshake_seen(self, msg: Msg) -> None:
        if len(msg.data) == 32:
            self.guard.remember(msg.data, self.clock())
            self.shared_handshakes.inc()

    async def _on_node_key_removed(self, msg: Msg) -> None:
        try:
            event = bus.decode(bus.NodeKeyEvent, msg.data)
        except ValueError:
            self.refused.labels("bad_bus_message").inc()
            return
        if event.reason == "rotated" or event.node_id is None:
            return
        record = self.mesh.get(event.node_id)
        if record is None or record.node_key != event.node_key or record.expired:
            return
        now = self.clock()
        updated = await self._db(
            lambda s: store.update_node(
                s, record.id, expired=True, key_expiry=min(now, record.key_expiry or now)
            )
        )
        self.apply(updated, record.id, "expired", "keys")

    # keys over NATS ----------------------------------------------------------------------

    async def keys_request(self, subject: str, message: Any, reply_cls: type[T]) -> T:
        if self.nc is None or not self.nc.is_connected:
            raise ControlError("key registry unavailable (no NATS connection); try again", 503)
        try:
            reply = await self.nc.request(subject, bus.encode(message), timeout=self.config.keys_timeout)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError):
            raise ControlError("key registry unavailable; try again", 503) from None
        except nats.errors.Error as exc:
            raise ControlError(f"key registry unavailable: {exc}", 503) from None
        try:
            return bus.decode(reply_cls, reply.data)
        except ValueError as exc:
            raise ControlError(f"bad reply from key registry: {exc}", 502) from None

    # agent requests ----------------------------------------------------------------------

    async def open_call(self, body: bytes) -> ServerCall:
        """The request's handshake, decrypted and fresh, or ControlError (403 and why).

        This replica's memory refuses a stale handshake or one it saw already (or heard of over
        NATS); nothing is written. Each handler then claims the handshake (`claim`) once the caller
        is known (its machine key is registered, or it presented a valid auth key) and before it
        acts: so a stranger's requests cost no database write, and the shared database still
        decides, exactly, races between replicas over every request that changes anything.
        """
        try:
            return ServerCall(self.private_key, body, self.clock(), self.guard)
        except ControlError as exc:
            self._count_refusal(exc)
            raise

    def _count_refusal(self, exc: ControlError) -> None:
        reason = str(exc).split(":")[0].split(" ")[0]
        self.refused.labels(
            reason if reason in ("stale", "replayed", "handshake", "malformed", "database") else "other"
        ).inc()

    async def claim(self, call: ServerCall) -> None:
        """Claim the handshake for this replica, or ClaimRefused (403 replayed, 503 no database)."""
        try:
            await self._record_handshake(call)
        except ControlError as exc:
            self._count_refusal(exc)
            raise ClaimRefused(str(exc), exc.status) from None
        if self.config.share_handshakes and self.nc is not None and self.nc.is_connected:
            # Other replicas learn this handshake too, so a replay sent to them is refused
            # from memory, before it costs them a database write.
            task = asyncio.get_running_loop().create_task(self.nc.publish(bus.HANDSHAKE_SEEN, call.ephemeral))
            self._announcements.add(task)
            task.add_done_callback(self._announcements.discard)

    async def _record_handshake(self, call: ServerCall) -> None:
        """Claim the handshake in the shared database before acting on it: a replay that reached
        another replica first (faster than NATS could tell us) loses on the primary key."""
        # A replay is refused as stale on every replica once its timestamp leaves the window.
        expires_at = call.sent_at + self.guard.window + HANDSHAKE_CLOCK_MARGIN
        try:
            fresh = await self._db(lambda s: store.record_handshake(s, call.ephemeral, expires_at))
        except Exception as exc:
            # Without the record a replay could not be refused everywhere: refuse this one instead.
            log.warning("could not record a handshake", extra={"error": str(exc)})
            raise ControlError(
                "database unavailable: coord could not accept the request; try again", 503
            ) from None
        if not fresh:
            raise HandshakeRefused("replayed handshake refused")

    async def login(self, call: ServerCall) -> tuple[int, cm.LoginResponse]:
        try:
            req = cm.decode(cm.LoginRequest, call.payload)
            node_key = cm.check_key(req.node_key, "node key")
            disco_key = cm.check_key(req.disco_key, "disco key")
            hostname = cm.check_hostname(req.hostname)
            routes = cm.check_routes(req.advertised_routes)
            endpoints = cm.check_endpoints(req.endpoints)
            if len(req.auth_key) > 256:
                raise ControlError("auth key too long")
            auth_key, key_fingerprint = coordkey.split_auth_key(req.auth_key)
            if key_fingerprint is not None and not coordkey.matches(self.public_key, key_fingerprint):
                raise ControlError(
                    "this auth key was issued by another coord (its key fingerprint differs)", 401
                )
            req = dataclasses.replace(req, auth_key=auth_key)
            requested = cm.check_tags(req.request_tags)
            record, refused, why = await self._login(
                call, req, node_key, disco_key, hostname, routes, endpoints, requested
            )
        except ClaimRefused:
            raise
        except LoginPending as pending:
            self.logins.labels("pending").inc()
            return 200, cm.LoginResponse(auth_url=pending.auth_url, login_id=pending.login_id)
        except (ControlError, store.StoreError) as exc:
            status = exc.status
            self.logins.labels(f"refused_{status}").inc()
            return status, cm.LoginResponse(error=str(exc))
        self.logins.labels("ok").inc()
        if refused:
            self.refused.labels("tags").inc()
            log.info("requested tags refused", extra={"node_id": record.id, "tags": list(refused)})
        return 200, cm.LoginResponse(
            node_id=record.id,
            name=record.name,
            user=record.user,
            tags=record.tags,
            addresses=(f"{record.ipv4}/32", f"{record.ipv6}/128"),
            key_expiry=record.key_expiry,
            ephemeral=record.ephemeral,
            refused_tags=refused,
            tags_error=why,
        )

    async def _login(
        self,
        call: ServerCall,
        req: cm.LoginRequest,
        node_key: str,
        disco_key: str,
        hostname: str,
        routes: tuple[str, ...],
        endpoints: tuple[str, ...],
        requested: tuple[str, ...],
    ) -> tuple[store.NodeRecord, tuple[str, ...], str]:
        """The node's record, and the requested tags refused with why."""
        machine_key = crypto.encode_key(call.machine_key)
        existing = await self._db(lambda s: store.node_by_machine_key(s, machine_key))
        if existing is not None:
            await self.claim(call)  # a known machine
        elif not req.auth_key:
            if self.interactive is None:
                raise ControlError("unknown machine: an auth key is required to register", 401)
            # An interactive (OIDC) login: the only state a stranger may create is its one pending
            # login (one row per machine key, expiring, capped: oidc_login); its handshake is
            # claimed below, once the user has signed in and the node is about to be registered.
        else:
            # A stranger: its auth key is checked (nothing written) before its handshake is claimed.
            check = await self.keys_request(
                bus.AUTH_KEY_CONSUME,
                bus.AuthKeyConsume(secret=req.auth_key, machine_key=machine_key, check_only=True),
                bus.AuthKeyGrant,
            )
            if check.error:
                raise ControlError(check.error, 401)
            await self.claim(call)
        # Peers find a node's disco messages by its disco key: two nodes must never share one.
        holder = await self._db(lambda s: store.node_id_by_disco_key(s, disco_key))
        if holder is not None and (existing is None or holder != existing.id):
            raise ControlError("disco key already in use by another node: generate a new one", 409)
        now = self.clock()
        grant: bus.AuthKeyGrant | None = None
        groups: tuple[str, ...] = existing.user_groups if existing is not None else ()
        needs_auth = existing is None or existing.expired or req.force_reauth or bool(req.followup)
        if self.interactive is not None and not req.auth_key and needs_auth:
            if existing is not None and existing.expired and existing.node_key == node_key:
                raise ControlError("node key expired: generate a new node key and log in again", 401)
            # LoginPending until the user has signed in at the identity provider.
            grant, groups = await self.interactive.grant(
                machine_key, node_key, req.followup, req.force_reauth
            )
            if existing is None:
                await self.claim(call)
        if grant is None and existing is not None and not existing.expired and existing.node_key == node_key:
            tags, refused, why = self._with_requested_tags(existing.user, existing.tags, requested, groups)
            if (
                existing.disco_key == disco_key
                and existing.advertised_routes == routes
                and existing.tags == tags
            ):
                return existing, refused, why
            same_key: dict[str, Any] = {
                "disco_key": disco_key,
                "advertised_routes": routes,
                "approved_routes": self._approved(
                    existing.user, tags, routes, existing.approved_routes, groups
                ),
            }
            if tags != existing.tags:
                same_key["tags"] = tags
                if not existing.tags:  # newly tagged: tagged nodes' keys do not expire
                    same_key["key_expiry"] = self._expiry_for(tags, now)
            updated = await self._db(lambda s: store.update_node(s, existing.id, **same_key))
            await self._register_key(updated, now)
            await self.changed(updated, updated.id, "updated")
            return updated, refused, why
        if grant is None and (existing is None or existing.expired):
            if existing is not None and existing.node_key == node_key:
                raise ControlError(
                    "node key expired: generate a new node key and log in with an auth key", 401
                )
            if not req.auth_key:
                if existing is None:
                    raise ControlError("unknown machine: an auth key is required to register", 401)
                raise ControlError("node key expired: log in again with an auth key", 401)
            grant = await self.keys_request(
                bus.AUTH_KEY_CONSUME,
                bus.AuthKeyConsume(secret=req.auth_key, machine_key=machine_key),
                bus.AuthKeyGrant,
            )
            if grant.error:
                raise ControlError(grant.error, 401)
        if existing is None:
            assert grant is not None
            tags, refused, why = self._with_requested_tags(grant.user, grant.tags, requested, groups)
            new = store.NewNode(
                machine_key=machine_key,
                node_key=node_key,
                disco_key=disco_key,
                hostname=hostname,
                user=grant.user,
                tags=tags,
                ephemeral=grant.ephemeral,
                auth_key_id=grant.auth_key_id or None,  # none after an OIDC sign-in
                key_expiry=self._expiry_for(tags, now),
                endpoints=endpoints,
                advertised_routes=routes,
                approved_routes=self._approved(grant.user, tags, routes, (), groups),
            )
            record = await self._db(lambda s: store.create_node(s, new, now))
            try:
                await self._register_key(record, now)
            except ControlError:
                await self._db(lambda s: store.delete_node(s, record.id))
                raise
            await self.changed(record, record.id, "added")
            log.info(
                "node registered", extra={"node_id": record.id, "node": record.name, "user": record.user}
            )
            return record, refused, why
        # Same machine, new node key (rotation) or a re-authentication after expiry.
        values: dict[str, Any] = {
            "node_key": node_key,
            "disco_key": disco_key,
            "advertised_routes": routes,
            "expired": False,
        }
        if grant is not None:
            # The key that vouches for the node now (none after an OIDC sign-in).
            values["auth_key_id"] = grant.auth_key_id or None
        user = grant.user if grant is not None and grant.user else existing.user
        if user != existing.user:  # re-authenticated as another user: the node is theirs now
            values["user"] = user
        tags, refused, why = self._with_requested_tags(user, existing.tags, requested, groups)
        values["approved_routes"] = self._approved(user, tags, routes, existing.approved_routes, groups)
        if tags != existing.tags:
            values["tags"] = tags
        if grant is not None or existing.expired or tags != existing.tags:
            values["key_expiry"] = self._expiry_for(tags, now)
        clash = await self._db(lambda s: store.node_by_key(s, node_key))
        if clash is not None and clash.id != existing.id:
            raise ControlError("node key already in use by another node", 409)
        updated = await self._db(lambda s: store.update_node(s, existing.id, **values))
        await self._register_key(updated, now)
        await self.changed(updated, updated.id, "updated")
        log.info("node key rotated", extra={"node_id": updated.id, "node": updated.name})
        return updated, refused, why

    def _approved(
        self,
        user: str,
        tags: tuple[str, ...],
        advertised: tuple[str, ...],
        approved: tuple[str, ...],
        groups: tuple[str, ...] = (),
    ) -> tuple[str, ...]:
        """The approvals a node keeps (those it still advertises) plus what the policy's
        autoApprovers grant it now (its user's IdP `groups` count as in acls)."""
        kept = tuple(r for r in approved if r in advertised)
        auto = self.policy.auto_approved(user, tags, advertised, groups)
        added = [r for r in auto if r not in kept]
        if added:
            self.auto_approvals.inc(len(added))
            log.info("routes auto-approved", extra={"user": user, "tags": list(tags), "routes": added})
        return tuple(dict.fromkeys(kept + auto))

    async def apply_auto_approvals(self) -> int:
        """Approve what the policy in force auto-approves for every node (after a policy change);
        returns how many nodes changed."""
        changed = 0
        for record in list(self.mesh.records.values()):
            approved = self._approved(
                record.user, record.tags, record.advertised_routes, record.approved_routes, record.user_groups
            )
            if approved != record.approved_routes:
                await self._update_node(record, {"approved_routes": approved}, "updated")
                changed += 1
        return changed

    def _with_requested_tags(
        self, user: str, carried: tuple[str, ...], requested: tuple[str, ...], groups: tuple[str, ...] = ()
    ) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        """(the node's tags with the requests granted, refused requests, why). Requests only
        add: tags the node carries stay (an admin removes them with `nodes tag`)."""
        granted, refused, why = self.policy.grant_requested_tags(user, carried, requested, groups)
        return tuple(dict.fromkeys(carried + granted)), refused, why

    def _expiry_for(self, tags: tuple[str, ...], now: float) -> float | None:
        if tags or self.config.node_key_expiry is None:
            return None
        return now + self.config.node_key_expiry

    async def _register_key(self, record: store.NodeRecord, now: float) -> None:
        reply = await self.keys_request(
            bus.NODE_KEY_REGISTER,
            bus.NodeKeyRegister(
                node_id=record.id,
                machine_key=record.machine_key,
                node_key=record.node_key,
                disco_key=record.disco_key,
                expires_at=record.key_expiry,
            ),
            bus.NodeKeyReply,
        )
        if reply.error:
            raise ControlError(reply.error, 409)

    async def authorize(self, call: ServerCall, node_key: str) -> store.NodeRecord:
        """The caller's node, if its machine key and node key match a live, unexpired node."""
        machine_key = crypto.encode_key(call.machine_key)
        record = await self._db(lambda s: store.node_by_machine_key(s, machine_key))
        if record is None:
            raise ControlError("unknown machine: log in first", 401)
        if record.node_key != node_key:
            raise ControlError("node key does not match the registered one: log in again", 401)
        if record.expired:
            raise ControlError("node key expired: log in again with an auth key", 401)
        return record

    async def update(self, call: ServerCall) -> tuple[int, cm.Reply]:
        try:
            req = cm.decode(cm.UpdateRequest, call.payload)
            record = await self.authorize(call, req.node_key)
            await self.claim(call)
            values: dict[str, Any] = {}
            if req.endpoints is not None:
                values["endpoints"] = cm.check_endpoints(req.endpoints)
            if req.advertised_routes is not None:
                routes = cm.check_routes(req.advertised_routes)
                values["advertised_routes"] = routes
                values["approved_routes"] = self._approved(
                    record.user, record.tags, routes, record.approved_routes, record.user_groups
                )
            if req.hostname is not None:
                values["hostname"] = cm.check_hostname(req.hostname)
            if req.home_relay is not None:
                values["home_relay"] = req.home_relay
            await self._update_node(
                record, values, "endpoints" if set(values) == {"endpoints"} else "updated"
            )
        except ClaimRefused:
            raise
        except (ControlError, store.StoreError) as exc:
            return exc.status, cm.Reply(error=str(exc))
        return 200, cm.Reply()

    async def _update_node(
        self, record: store.NodeRecord, values: dict[str, Any], change: str
    ) -> store.NodeRecord:
        current = {k: getattr(record, k) for k in values}
        if current == values:
            return record
        updated = await self._db(lambda s: store.update_node(s, record.id, **values))
        await self.changed(updated, updated.id, change)
        return updated

    async def logout(self, call: ServerCall) -> tuple[int, cm.Reply]:
        try:
            req = cm.decode(cm.LogoutRequest, call.payload)
            record = await self.authorize(call, req.node_key)
            await self.claim(call)
            if record.ephemeral:
                await self.delete_node(record.id)
            else:
                await self.expire_node(record.id)
        except ClaimRefused:
            raise
        except (ControlError, store.StoreError) as exc:
            return exc.status, cm.Reply(error=str(exc))
        return 200, cm.Reply()

    async def open_stream(self, call: ServerCall) -> tuple[int, cm.Reply, Stream | None]:
        try:
            req = cm.decode(cm.MapRequest, call.payload)
            record = await self.authorize(call, req.node_key)
            await self.claim(call)
            if req.endpoints is not None:
                record = await self._update_node(
                    record, {"endpoints": cm.check_endpoints(req.endpoints)}, "endpoints"
                )
            if not math.isfinite(req.keepalive):
                raise ControlError("keepalive must be a number of seconds")
            if self._stopping:
                raise ControlError("coord is shutting down", 503)
        except ClaimRefused:
            raise
        except (ControlError, store.StoreError) as exc:
            return exc.status, cm.Reply(error=str(exc)), None
        stream = Stream(record.id, call, min(max(req.keepalive, 0.5), 60.0))
        return 200, cm.Reply(), stream

    async def run_stream(self, stream: Stream) -> AsyncIterator[bytes]:
        """Sealed frames for one stream: the full netmap, then deltas, keepalives, a final error."""
        streams = self.streams.setdefault(stream.node_id, set())
        while len(streams) >= MAX_STREAMS_PER_NODE:
            oldest = min(streams, key=lambda s: s.opened)
            streams.discard(oldest)
            oldest.close("superseded by a newer netmap stream of this node", 409)
            self.refused.labels("streams").inc()
        streams.add(stream)
        try:
            await self._set_online(stream.node_id, True)
            yield stream.call.seal_frame(self.full_netmap(stream.node_id))
            self.frames.labels("netmap").inc()
            while not stream.closed:
                try:
                    # asyncio.timeout, not wait_for: no extra task per wake-up (this runs once per
                    # stream per change, so it is on the fan-out's hot path).
                    async with asyncio.timeout(stream.keepalive):
                        await stream.wake.wait()
                except TimeoutError:
                    yield stream.call.seal_frame(cm.stream_frame("keepalive"))
                    self.frames.labels("keepalive").inc()
                    continue
                stream.wake.clear()
                if stream.closed:
                    break
                if stream.full:
                    stream.full = stream.self_dirty = False
                    stream.dirty.clear()
                    yield stream.call.seal_frame(self.full_netmap(stream.node_id))
                    self.frames.labels("netmap").inc()
                    continue
                delta = self.delta(stream)
                if delta is not None:
                    yield stream.call.seal_frame(delta)
                    self.frames.labels("delta").inc()
            if stream.error:
                yield stream.call.seal_frame(
                    cm.stream_frame("error", {"error": stream.error, "code": stream.code})
                )
                self.frames.labels("error").inc()
        finally:
            remaining = self.streams.get(stream.node_id)
            if remaining is not None:
                remaining.discard(stream)
                if not remaining:
                    del self.streams[stream.node_id]
                    if not self._stopping and self.mesh.get(stream.node_id) is not None:
                        await self._set_online(stream.node_id, False)

    def full_netmap(self, node_id: int) -> bytes:
        entries = self.mesh.entries
        peers = b",".join(entries[p] for p in self.mesh.peers_of(node_id))
        return b"".join(
            (
                b'{"type":"netmap","version":%d,"self":' % self._next_version(),
                entries[node_id],
                b',"peers":[',
                peers,
                b'],"derp_map":',
                json.dumps(self.derp_map).encode(),
                b',"packet_filter":',
                self.mesh.packet_filter_json(node_id),
                b',"dns":',
                self._dns_json,
                b"}",
            )
        )

    def delta(self, stream: Stream) -> bytes | None:
        dirty, stream.dirty = stream.dirty, set()
        self_dirty, stream.self_dirty = stream.self_dirty, False
        changed: list[bytes] = []
        removed: list[int] = []
        entries = self.mesh.entries
        for peer_id in sorted(dirty):
            if self.mesh.can_see(stream.node_id, peer_id):
                changed.append(entries[peer_id])
            else:
                removed.append(peer_id)
        if not changed and not removed and not self_dirty:
            return None
        parts = [b'{"type":"delta","version":%d' % self._next_version()]
        if self_dirty and stream.node_id in entries:
            parts += [b',"self":', entries[stream.node_id]]
            parts += [b',"packet_filter":', self.mesh.packet_filter_json(stream.node_id)]
        if changed:
            parts += [b',"peers_changed":[', b",".join(changed), b"]"]
        if removed:
            parts.append(b',"peers_removed":[%s]' % b",".join(b"%d" % i for i in removed))
        parts.append(b"}")
        return b"".join(parts)

    async def _set_online(self, node_id: int, online: bool) -> None:
        record = self.mesh.get(node_id)
        if record is None:
            return
        now = self.clock()
        if record.online == online and online:
            return
        try:
            await self._db(lambda s: store.set_presence(s, [node_id], online, now))
        except Exception:
            log.exception("could not store presence", extra={"node_id": node_id})
            return
        updated = dataclasses.replace(record, online=online, last_seen=now)
        await self.changed(updated, node_id, "online" if online else "offline")

    # admin operations --------------------------------------------------------------------

    async def delete_node(self, node_id: int) -> store.NodeRecord:
        record = await self._db(lambda s: store.delete_node(s, node_id))
        await self.changed(None, node_id, "removed")
        with contextlib.suppress(ControlError):
            await self.keys_request(
                bus.NODE_KEY_REVOKE, bus.NodeKeyRevoke(node_id=node_id, reason="deleted"), bus.NodeKeyReply
            )
        log.info("node deleted", extra={"node_id": node_id, "node": record.name})
        return record

    async def expire_node(self, node_id: int) -> store.NodeRecord:
        record = await self._db(lambda s: store.load_node(s, node_id))
        if record is None:
            raise store.StoreError(f"no node with id {node_id}", 404)
        reply = await self.keys_request(
            bus.NODE_KEY_EXPIRE, bus.NodeKeyExpire(node_id=node_id), bus.NodeKeyReply
        )
        if reply.error:
            raise store.StoreError(reply.error, 409)
        now = self.clock()
        updated = await self._db(lambda s: store.update_node(s, node_id, expired=True, key_expiry=now))
        await self.changed(updated, node_id, "expired")
        return updated

    async def admin_update(self, node_id: int, **values: Any) -> store.NodeRecord:
        record = await self._db(lambda s: store.load_node(s, node_id))
        if record is None:
            raise store.StoreError(f"no node with id {node_id}", 404)
        if "tags" in values and "approved_routes" not in values:
            # A new identity may be one the policy's autoApprovers name.
            values["approved_routes"] = self._approved(
                record.user,
                values["tags"],
                record.advertised_routes,
                record.approved_routes,
                record.user_groups,
            )
        return await self._update_node(record, values, "updated")

    # housekeeping ------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        interval = max(0.2, min(self.config.ephemeral_grace / 4, self.config.heartbeat_interval, 5.0))
        last_heartbeat = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                now = self.clock()
                if now - last_heartbeat >= self.config.heartbeat_interval:
                    last_heartbeat = now
                    await self._heartbeat(now)
                    await self._forget_handshakes(now)
                gone = await self._db(
                    functools.partial(store.ephemeral_gone, before=now - self.config.ephemeral_grace)
                )
                for node_id in gone:
                    if node_id in self.streams:
                        continue
                    with contextlib.suppress(store.StoreError):
                        await self.delete_node(node_id)
                        log.info("ephemeral node removed after going offline", extra={"node_id": node_id})
            except Exception:
                log.exception("housekeeping failed")

    async def _forget_handshakes(self, now: float) -> None:
        """Keep the shared handshake table bounded: rows of handshakes stale on every replica go."""
        try:
            forgotten = await self._db(functools.partial(store.forget_handshakes, now=now))
        except Exception:
            log.exception("could not delete stale handshakes")  # tried again next heartbeat
            return
        if forgotten:
            self.handshakes_forgotten.inc(forgotten)

    async def _heartbeat(self, now: float) -> None:
        """Refresh last_seen of our streaming nodes; take nodes of a crashed replica offline."""
        ids = list(self.streams)
        if ids:
            await self._db(functools.partial(store.set_presence, node_ids=ids, online=True, now=now))
        stale = await self._db(
            functools.partial(store.stale_online, before=now - 3 * self.config.heartbeat_interval)
        )
        for node_id in stale:
            if node_id in self.streams:
                continue
            await self._db(functools.partial(store.set_presence, node_ids=[node_id], online=False, now=now))
            record = await self._db(functools.partial(store.load_node, node_id=node_id))
            await self.changed(record, node_id, "offline")
