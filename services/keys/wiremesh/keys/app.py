"""`wiremesh-keys`: the key registry service.

Owns machine, node and disco key records and pre-auth keys. Serves requests over NATS
(subjects in wiremesh.core.bus, queue group KEYS_QUEUE so replicas share the load) and
publishes every node-key change (NODE_KEY_ADDED / NODE_KEY_REMOVED) and auth-key change.
Its HTTP surface is only health, readiness and metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from wiremesh.core import bus, busauth
from wiremesh.core.busauth import BusAccess
from wiremesh.keys import store
from wiremesh.shell import logs, service

log = logging.getLogger("wiremesh.keys")
MIGRATIONS = str(pathlib.Path(__file__).parent / "migrations")
VERSION_TABLE = "keys_alembic_version"


class KeysService:
    def __init__(
        self,
        database_url: str,
        bus_access: BusAccess,
        replica_id: str = "keys",
        sweep_interval: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.database_url = database_url
        self.bus_access = bus_access
        self.replica_id = replica_id
        self.sweep_interval = sweep_interval
        self.clock = clock
        self.db: service.Database | None = None
        self.nc: NATS | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "wiremesh_keys_requests", "NATS requests served", ["subject", "outcome"], registry=self.registry
        )
        self.events = Counter("wiremesh_keys_events", "events published", ["subject"], registry=self.registry)
        self.valid_keys = Gauge("wiremesh_keys_valid_node_keys", "valid node keys", registry=self.registry)

    async def start(self) -> None:
        engine = service.make_engine(self.database_url)
        await asyncio.to_thread(service.run_migrations, engine, MIGRATIONS, VERSION_TABLE)
        self.db = service.Database(engine)
        self.nc = await service.wait_for_nats(self.bus_access, self.replica_id)
        handlers: dict[str, Callable[[Msg], Awaitable[None]]] = {
            bus.AUTH_KEY_CREATE: self._on_create,
            bus.AUTH_KEY_LIST: self._on_list,
            bus.AUTH_KEY_EXPIRE: self._on_expire,
            bus.AUTH_KEY_CONSUME: self._on_consume,
            bus.NODE_KEY_REGISTER: self._on_register,
            bus.NODE_KEY_EXPIRE: self._on_node_expire,
            bus.NODE_KEY_REVOKE: self._on_node_revoke,
            bus.NODE_KEY_LIST: self._on_node_list,
        }
        for subject, handler in handlers.items():
            await self.nc.subscribe(subject, queue=bus.KEYS_QUEUE, cb=self._guard(subject, handler))
        self._tasks.append(asyncio.create_task(self._sweep_loop()))
        log.info("keys started", extra={"replica": self.replica_id})

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self.db is not None:
            self.db.close()

    def ready(self) -> bool:
        return self.db is not None and self.nc is not None and self.nc.is_connected

    # NATS plumbing -----------------------------------------------------------------------

    def _guard(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]]
    ) -> Callable[[Msg], Awaitable[None]]:
        async def wrapped(msg: Msg) -> None:
            try:
                await handler(msg)
                self.requests.labels(subject, "ok").inc()
            except Exception:
                self.requests.labels(subject, "error").inc()
                log.exception("keys request failed", extra={"subject": subject})

        return wrapped

    async def _reply(self, msg: Msg, reply: Any) -> None:
        # Only to a requester's inbox: a request naming an event subject as its reply-to must not
        # make the registry publish there (allow_responses would let it).
        if msg.reply and busauth.is_reply_inbox(msg.reply):
            await msg.respond(bus.encode(reply))
        elif msg.reply:
            self.requests.labels(msg.subject, "bad_reply_subject").inc()

    async def _publish(self, subject: str, message: Any) -> None:
        assert self.nc is not None
        self.events.labels(subject).inc()
        await self.nc.publish(subject, bus.encode(message))

    async def _publish_changes(self, changes: store.NodeKeyChanges) -> None:
        for event in changes.removed:
            await self._publish(bus.NODE_KEY_REMOVED, event)
        for event in changes.added:
            await self._publish(bus.NODE_KEY_ADDED, event)

    async def _db(self, fn: Callable[[Any], Any]) -> Any:
        assert self.db is not None
        return await self.db.run(fn)

    # handlers ----------------------------------------------------------------------------

    async def _on_create(self, msg: Msg) -> None:
        try:
            req = bus.decode(bus.AuthKeyCreate, msg.data)
            now = self.clock()
            info, secret = await self._db(lambda s: store.create_auth_key(s, req, now))
        except (ValueError, store.RegistryError) as exc:
            await self._reply(msg, bus.AuthKeyReply(error=str(exc)))
            return
        await self._reply(msg, bus.AuthKeyReply(key=info, secret=secret))
        await self._publish(bus.AUTH_KEY_CHANGED, bus.AuthKeyEvent(auth_key_id=info.id, action="created"))

    async def _on_list(self, msg: Msg) -> None:
        now = self.clock()
        keys = await self._db(lambda s: store.list_auth_keys(s, now))
        await self._reply(msg, bus.AuthKeyList(keys=keys))

    async def _on_expire(self, msg: Msg) -> None:
        try:
            req = bus.decode(bus.AuthKeyExpire, msg.data)
            now = self.clock()
            info = await self._db(lambda s: store.expire_auth_key(s, req.auth_key_id, now))
        except (ValueError, store.RegistryError) as exc:
            await self._reply(msg, bus.AuthKeyReply(error=str(exc)))
            return
        await self._reply(msg, bus.AuthKeyReply(key=info))
        await self._publish(bus.AUTH_KEY_CHANGED, bus.AuthKeyEvent(auth_key_id=info.id, action="expired"))

    async def _on_consume(self, msg: Msg) -> None:
        try:
            req = bus.decode(bus.AuthKeyConsume, msg.data)
            now = self.clock()

            def consume(session: Any) -> bus.AuthKeyGrant:
                if req.check_only:
                    row = store.check_auth_key(session, req.secret, now)
                else:
                    row = store.consume_auth_key(session, req.secret, now)
                return bus.AuthKeyGrant(
                    auth_key_id=row.id, user=row.user, tags=tuple(row.tags), ephemeral=row.ephemeral
                )

            grant = await self._db(consume)
        except (ValueError, store.RegistryError) as exc:
            await self._reply(msg, bus.AuthKeyGrant(error=str(exc)))
            return
        await self._reply(msg, grant)
        if req.check_only:
            return
        await self._publish(
            bus.AUTH_KEY_CHANGED, bus.AuthKeyEvent(auth_key_id=grant.auth_key_id, action="used")
        )

    async def _on_register(self, msg: Msg) -> None:
        try:
            req = bus.decode(bus.NodeKeyRegister, msg.data)
            now = self.clock()
            changes = await self._db(lambda s: store.register_node_key(s, req, now))
        except (ValueError, store.RegistryError) as exc:
            await self._reply(msg, bus.NodeKeyReply(error=str(exc)))
            return
        await self._reply(msg, bus.NodeKeyReply(node_key=req.node_key, expires_at=req.expires_at))
        await self._publish_changes(changes)

    async def _on_node_expire(self, msg: Msg) -> None:
        await self._revoke(msg, "expired")

    async def _on_node_revoke(self, msg: Msg) -> None:
        await self._revoke(msg, None)

    async def _revoke(self, msg: Msg, reason: str | None) -> None:
        try:
            if reason is None:
                revoke = bus.decode(bus.NodeKeyRevoke, msg.data)
                node_id, why = revoke.node_id, revoke.reason or "revoked"
            else:
                node_id, why = bus.decode(bus.NodeKeyExpire, msg.data).node_id, reason
            now = self.clock()
            changes = await self._db(lambda s: store.revoke_node_keys(s, node_id, why, now))
        except (ValueError, store.RegistryError) as exc:
            await self._reply(msg, bus.NodeKeyReply(error=str(exc)))
            return
        await self._reply(msg, bus.NodeKeyReply(expires_at=now if reason == "expired" else None))
        await self._publish_changes(changes)

    async def _on_node_list(self, msg: Msg) -> None:
        now = self.clock()
        keys = await self._db(lambda s: store.valid_node_keys(s, now))
        self.valid_keys.set(len(keys))
        await self._reply(msg, bus.NodeKeyList(keys=keys))

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            try:
                now = self.clock()
                changes = await self._db(functools.partial(store.expire_due_node_keys, now=now))
                if changes.removed and self.nc is not None and self.nc.is_connected:
                    await self._publish_changes(changes)
            except Exception:
                log.exception("node key expiry sweep failed")


def create_app(keys: KeysService, *, api_docs: bool = False) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await keys.start()
        try:
            yield
        finally:
            await keys.stop()

    docs: dict[str, Any] = {} if api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="wiremesh-keys", lifespan=lifespan, **docs)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if keys.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(keys.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wiremesh-keys", description="wiremesh key registry")
    service.add_common_arguments(parser, "keys", 8081)
    args = parser.parse_args(argv)
    settings = service.settings_from_args(args, "keys")
    logs.setup_logging(settings.log_level, settings.log_json)
    keys = KeysService(settings.database_url, settings.bus, settings.replica_id)
    service.serve(create_app(keys, api_docs=settings.api_docs), settings)
