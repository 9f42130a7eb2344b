"""`wiremesh-coord`: the coordination server's HTTP surface.

Agent API (Noise IK inside HTTP, see wiremesh.core.control.channel):
  GET  /key                  coord's control public key (what agents pin)
  POST /machine/login        LoginRequest -> LoginResponse
  POST /machine/map          MapRequest -> a stream of netmap frames
  POST /machine/update       UpdateRequest -> Reply (endpoints, routes, hostname, home relay)
  POST /machine/logout       LogoutRequest -> Reply
Admin API (JSON, `Authorization: Bearer <admin key>`), under /api/v1: nodes, routes (approve and
unapprove), authkeys.
Probes and metrics: /healthz, /readyz, /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import pathlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from wiremesh.coord import admin_keys, oidc_login, policy_store, store
from wiremesh.coord.core import CoordConfig, Coordinator, Stream, load_dns_config
from wiremesh.coord.limits import DEFAULT_BURST, DEFAULT_RATE, AgentRateLimit, SourceLimits
from wiremesh.core import bus, crypto
from wiremesh.core.control import coordkey
from wiremesh.core.control import messages as cm
from wiremesh.core.control.channel import MAX_REQUEST_BYTES, PROLOGUE, PROTOCOL, ControlError, ServerCall
from wiremesh.shell import logs, service

log = logging.getLogger("wiremesh.coord")
MAX_ADMIN_BODY = 64 * 1024
FRAMES = "application/x-wiremesh-frames"
_DURATION = re.compile(r"^(\d+)([smhd])$")
RowId = admin_keys.RowId


class BodyLimit:
    """ASGI middleware: refuse any request body above `limit` bytes with 413, before parsing."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await _too_large(send, self.limit)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, f"request body too large (limit {self.limit} bytes)")
            return message

        await self.app(scope, limited, send)


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail":"request body too large (limit {limit} bytes)"}}'.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class FrameStream(Response):
    """A streaming response that notices the client going away at once (not at the next write)."""

    def __init__(self, first: bytes, stream: Stream, frames: AsyncIterator[bytes]) -> None:
        super().__init__(media_type=FRAMES)
        # A stream has no length: drop the content-length: 0 the base class declared.
        self.raw_headers = [(b"content-type", FRAMES.encode()), (b"cache-control", b"no-store")]
        self.first = first
        self.stream = stream
        self.frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    self.stream.close()
                    return

        watcher = asyncio.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.first, "more_body": True})
            async for chunk in self.frames:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            pass  # the agent went away; the generator's cleanup already ran or runs on close
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            aclose = getattr(self.frames, "aclose", None)
            if aclose is not None:
                await aclose()


class MapStreams:
    """ASGI shortcut for POST /machine/map: netmap streams skip the framework's routing layers.

    A change is delivered to every affected stream by resuming that stream's response
    coroutine; each layer of routing and middleware it sits under is paid per stream per
    change, so the streams sit directly under this middleware instead.
    """

    def __init__(self, app: ASGIApp, coord: Coordinator) -> None:
        self.app = app
        self.coord = coord

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/machine/map" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        response: Response
        try:
            body = await service.read_body(Request(scope, receive), MAX_REQUEST_BYTES)
            call = await self.coord.open_call(body)
            status, reply, stream = await self.coord.open_stream(call)
        except HTTPException as exc:
            response = JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        except ControlError as exc:
            response = JSONResponse({"detail": str(exc)}, status_code=exc.status)
        else:
            first = call.respond(cm.encode(reply))
            if stream is None:
                response = Response(first, status_code=status, media_type=FRAMES)
            else:
                response = FrameStream(first, stream, self.coord.run_stream(stream))
        await response(scope, receive, send)


class AuthKeyCreateBody(BaseModel):
    user: str = Field(default="default", max_length=64)
    reusable: bool = False
    ephemeral: bool = False
    tags: list[str] = Field(default_factory=list, max_length=32)
    expiration: str | float | None = "1h"  # "90s", "1h", "7d", seconds, or null for never


class RenameBody(BaseModel):
    name: str = Field(min_length=1, max_length=63)


class TagsBody(BaseModel):
    tags: list[str] = Field(max_length=32)


class ApproveBody(BaseModel):
    prefixes: list[str] = Field(min_length=1, max_length=64)


def parse_duration(value: str | float | None) -> float | None:
    if value is None or value in ("", "never", "0"):
        return None
    if isinstance(value, int | float):
        if value <= 0:
            raise HTTPException(400, "expiration must be positive")
        return float(value)
    match = _DURATION.match(value.strip())
    if not match:
        raise HTTPException(400, f"invalid expiration {value[:32]!r}: use e.g. 90s, 30m, 1h, 7d or never")
    return int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


class SplitListeners:
    """ASGI middleware for --admin-listen: the admin API only on the admin port, the agent API only
    on the other one (probes and /metrics on both), so the admin port can stay off the internet."""

    def __init__(self, app: ASGIApp, admin_port: int) -> None:
        self.app = app
        self.admin_port = admin_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = str(scope.get("path", ""))
            server = scope.get("server")
            on_admin = server is not None and server[1] == self.admin_port
            admin_path = path.startswith("/api/")
            agent_path = path.startswith("/machine/") or path == "/key"
            if (admin_path and not on_admin) or (agent_path and on_admin):
                await JSONResponse({"detail": "not found on this listener"}, status_code=404)(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def create_app(
    coord: Coordinator,
    provisioned_keys: tuple[tuple[str, tuple[str, ...]], ...] = (),
    *,
    api_docs: bool = False,
    admin_port: int | None = None,
) -> FastAPI:
    """coord's FastAPI app. `provisioned_keys`: (key, scopes) pairs made sure of at start (a key
    the chart hands the operator, say); see admin_keys. `api_docs` serves /docs and /openapi.json,
    `admin_port` splits the listeners."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await coord.start()
        await keys.hash_key()  # made (or read) now, so no admin request writes before it is authorised
        for token, scopes in provisioned_keys:
            await keys.provision(token, scopes)
        try:
            yield
        finally:
            await coord.stop()

    docs: dict[str, Any] = {} if api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="wiremesh-coord", lifespan=lifespan, **docs)
    app.add_middleware(BodyLimit, limit=MAX_ADMIN_BODY)
    app.add_middleware(MapStreams, coord=coord)  # POST /machine/map, see MapStreams
    app.add_middleware(  # outermost: refused before anything else is spent on the request
        AgentRateLimit,
        limits=SourceLimits(coord.config.agent_rate, coord.config.agent_burst),
        on_refused=lambda: coord.refused.labels("rate_limited").inc(),
    )
    if admin_port is not None:
        app.add_middleware(SplitListeners, admin_port=admin_port)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "malformed request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(store.StoreError)
    async def store_error(_request: Request, exc: store.StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(ControlError)
    async def control_error(_request: Request, exc: ControlError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if coord.ready():
            return JSONResponse({"status": "ready", "replica": coord.config.replica_id})
        return JSONResponse({"status": "not ready"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(coord.registry), media_type=CONTENT_TYPE_LATEST)

    # agent API ---------------------------------------------------------------------------

    @app.get("/key")
    async def key() -> dict[str, str]:
        return {
            "public_key": crypto.encode_key(coord.public_key),
            "protocol": PROTOCOL.decode(),
            "prologue": PROLOGUE.decode(),
        }

    async def open_call(request: Request) -> ServerCall:
        body = await service.read_body(request, MAX_REQUEST_BYTES)
        return await coord.open_call(body)

    async def unary(
        request: Request, handler: Callable[[ServerCall], Awaitable[tuple[int, Any]]]
    ) -> Response:
        call = await open_call(request)
        status, reply = await handler(call)
        return Response(call.respond(cm.encode(reply)), status_code=status, media_type=FRAMES)

    @app.post("/machine/login")
    async def login(request: Request) -> Response:
        return await unary(request, coord.login)

    @app.post("/machine/update")
    async def update(request: Request) -> Response:
        return await unary(request, coord.update)

    @app.post("/machine/logout")
    async def logout(request: Request) -> Response:
        return await unary(request, coord.logout)

    # admin API ---------------------------------------------------------------------------

    api = "/api/v1"
    keys = admin_keys.AdminKeys(coord._db, coord.clock, coord.config.admin_key)

    async def admin(request: Request) -> admin_keys.Principal:
        """The bootstrap key or a scoped admin key holding the scope the route needs."""
        return await keys.authorize(request, api)

    guarded = [Depends(admin)]
    admin_keys.add_routes(app, keys, guarded, parse_duration, api)  # /api/v1/adminkeys

    def admin_tags(tags: list[str]) -> tuple[str, ...]:
        """Tags an admin applies (to a node or an auth key): well-formed and, when a policy is
        set, defined in its tagOwners (which user owns a tag does not matter: the admin may
        apply any defined tag). Refused with 400 before anything is stored."""
        try:
            checked = cm.check_tags(tags)
        except ControlError as exc:
            raise HTTPException(400, str(exc)) from None
        undefined = coord.policy.undefined_tags(checked)
        if undefined:
            names = ", ".join(undefined)
            raise HTTPException(
                400,
                f"tag {names} is not defined in the policy's tagOwners: add it there first"
                if len(undefined) == 1
                else f"tags {names} are not defined in the policy's tagOwners: add them there first",
            )
        return checked

    def node_json(record: store.NodeRecord) -> dict[str, Any]:
        """A node as the admin API shows it, with the approvals the policy in force makes itself
        (its autoApprovers): the operator leaves those be when a MeshNode does not list them."""
        out = record.to_admin_json()
        auto = coord.policy.auto_approved(record.user, record.tags, record.advertised_routes)
        out["auto_approved_routes"] = [r for r in record.approved_routes if r in auto]
        return out

    policy_store.add_routes(app, coord, guarded, api)  # GET/PUT/DELETE /api/v1/policy
    if coord.interactive is not None:
        oidc_login.add_routes(app, coord.interactive)  # /login/{id} and /oidc/callback, for browsers

    @app.get(f"{api}/key", dependencies=guarded)
    async def admin_key_view() -> dict[str, str]:
        """Coord's control key as the admin API vouches for it (wiremeshd --coord-key)."""
        return {
            "public_key": crypto.encode_key(coord.public_key),
            "fingerprint": coordkey.fingerprint(coord.public_key),
        }

    @app.get(f"{api}/nodes", dependencies=guarded)
    async def list_nodes() -> list[dict[str, Any]]:
        records = await coord._db(store.load_all)
        return [node_json(r) for r in sorted(records, key=lambda r: r.id)]

    @app.get(f"{api}/nodes/{{node_id}}", dependencies=guarded)
    async def get_node(node_id: RowId) -> dict[str, Any]:
        record = await coord._db(lambda s: store.load_node(s, node_id))
        if record is None:
            raise HTTPException(404, f"no node with id {node_id}")
        return node_json(record)

    @app.delete(f"{api}/nodes/{{node_id}}", dependencies=guarded)
    async def delete_node(node_id: RowId) -> dict[str, Any]:
        return node_json(await coord.delete_node(node_id))

    @app.post(f"{api}/nodes/{{node_id}}/expire", dependencies=guarded)
    async def expire_node(node_id: RowId) -> dict[str, Any]:
        return node_json(await coord.expire_node(node_id))

    @app.post(f"{api}/nodes/{{node_id}}/rename", dependencies=guarded)
    async def rename_node(node_id: RowId, body: RenameBody) -> dict[str, Any]:
        try:
            name = cm.check_hostname(body.name)
        except ControlError as exc:
            raise HTTPException(400, str(exc)) from None
        if name != body.name:
            raise HTTPException(400, f"invalid name {body.name!r}: use lowercase letters, digits and -")
        return node_json(await coord.admin_update(node_id, name=name))

    @app.post(f"{api}/nodes/{{node_id}}/tags", dependencies=guarded)
    async def tag_node(node_id: RowId, body: TagsBody) -> dict[str, Any]:
        tags = admin_tags(body.tags)
        return node_json(await coord.admin_update(node_id, tags=tags))

    @app.get(f"{api}/routes", dependencies=guarded)
    async def list_routes() -> list[dict[str, Any]]:
        records = await coord._db(store.load_all)
        out = []
        for r in sorted(records, key=lambda r: r.id):
            primary = coord.mesh.primary_routes(r.id)
            for prefix in sorted(set(r.advertised_routes) | set(r.approved_routes)):
                out.append(
                    {
                        "node_id": r.id,
                        "node": r.name,
                        "prefix": prefix,
                        "advertised": prefix in r.advertised_routes,
                        "approved": prefix in r.approved_routes,
                        # Of the nodes routing an approved prefix, the one peers send it to.
                        "primary": prefix in primary,
                    }
                )
        return out

    @app.post(f"{api}/nodes/{{node_id}}/routes/approve", dependencies=guarded)
    async def approve_routes(node_id: RowId, body: ApproveBody) -> dict[str, Any]:
        record = await coord._db(lambda s: store.load_node(s, node_id))
        if record is None:
            raise HTTPException(404, f"no node with id {node_id}")
        prefixes = []
        for prefix in body.prefixes:
            try:
                prefixes.append(str(ipaddress.ip_network(prefix, strict=True)))
            except ValueError:
                raise HTTPException(400, f"invalid prefix {prefix[:64]!r}") from None
        missing = [p for p in prefixes if p not in record.advertised_routes]
        if missing:
            raise HTTPException(400, f"node {record.name} does not advertise {', '.join(missing)}")
        approved = tuple(dict.fromkeys(record.approved_routes + tuple(prefixes)))
        return node_json(await coord.admin_update(node_id, approved_routes=approved))

    @app.post(f"{api}/nodes/{{node_id}}/routes/unapprove", dependencies=guarded)
    async def unapprove_routes(node_id: RowId, body: ApproveBody) -> dict[str, Any]:
        """Withdraw approvals: the prefixes leave the node's allowed IPs in every peer's netmap
        (the same change path as approve). Withdrawing one that is not approved is a no-op, so
        callers (the operator) may repeat it; the node keeps advertising it."""
        record = await coord._db(lambda s: store.load_node(s, node_id))
        if record is None:
            raise HTTPException(404, f"no node with id {node_id}")
        withdrawn: set[str] = set()
        for prefix in body.prefixes:
            try:
                withdrawn.add(str(ipaddress.ip_network(prefix, strict=True)))
            except ValueError:
                raise HTTPException(400, f"invalid prefix {prefix[:64]!r}") from None
        approved = tuple(p for p in record.approved_routes if p not in withdrawn)
        return node_json(await coord.admin_update(node_id, approved_routes=approved))

    def key_json(info: bus.AuthKeyInfo) -> dict[str, Any]:
        out: dict[str, Any] = {f: getattr(info, f) for f in info.__dataclass_fields__}
        out["tags"] = list(info.tags)
        return out

    @app.post(f"{api}/authkeys", dependencies=guarded)
    async def create_authkey(body: AuthKeyCreateBody) -> dict[str, Any]:
        req = bus.AuthKeyCreate(
            user=body.user,
            reusable=body.reusable,
            ephemeral=body.ephemeral,
            tags=admin_tags(body.tags),
            expires_in=parse_duration(body.expiration),
        )
        reply = await coord.keys_request(bus.AUTH_KEY_CREATE, req, bus.AuthKeyReply)
        if reply.error or reply.key is None:
            raise HTTPException(400, reply.error or "no key created")
        out = key_json(reply.key)
        # Agents joining with it pin coord's key by this fingerprint (wiremesh.core.control.coordkey).
        out["key"] = coordkey.with_fingerprint(reply.secret, coord.public_key)
        return out

    @app.get(f"{api}/authkeys", dependencies=guarded)
    async def list_authkeys() -> list[dict[str, Any]]:
        reply = await coord.keys_request(bus.AUTH_KEY_LIST, bus.AuthKeyListRequest(), bus.AuthKeyList)
        if reply.error:
            raise HTTPException(502, reply.error)
        return [key_json(k) for k in reply.keys]

    @app.post(f"{api}/authkeys/{{auth_key_id}}/expire", dependencies=guarded)
    async def expire_authkey(auth_key_id: RowId) -> dict[str, Any]:
        reply = await coord.keys_request(
            bus.AUTH_KEY_EXPIRE, bus.AuthKeyExpire(auth_key_id=auth_key_id), bus.AuthKeyReply
        )
        if reply.error or reply.key is None:
            raise HTTPException(404 if "no auth key" in reply.error else 400, reply.error)
        return key_json(reply.key)

    return app


def _env(name: str, default: float) -> float:
    """A number from WIREMESH_<name>, else `default` (flags still override both)."""
    value = os.environ.get(f"WIREMESH_{name}")
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise SystemExit(f"wiremesh-coord: WIREMESH_{name} must be a number, got {value!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="wiremesh-coord", description="wiremesh coordination server")
    service.add_common_arguments(parser, "coord", 8080)
    parser.add_argument(
        "--ephemeral-grace",
        type=float,
        default=_env("EPHEMERAL_GRACE", 30.0),
        help="seconds offline before removal",
    )
    parser.add_argument(
        "--node-key-expiry",
        type=float,
        default=_env("NODE_KEY_EXPIRY", 180 * 86400.0),
        help="seconds; 0 = never",
    )
    parser.add_argument("--heartbeat-interval", type=float, default=_env("HEARTBEAT_INTERVAL", 10.0))
    parser.add_argument("--keys-timeout", type=float, default=_env("KEYS_TIMEOUT", 5.0))
    parser.add_argument(
        "--control-key-file",
        default=os.environ.get("WIREMESH_CONTROL_KEY_FILE", ""),
        help="default: a key shared through the database",
    )
    parser.add_argument(
        "--derp-map",
        default=os.environ.get("WIREMESH_DERP_MAP", ""),
        help="JSON file with the DERP map sent in every netmap",
    )
    parser.add_argument(
        "--dns-config",
        default=os.environ.get("WIREMESH_DNS_CONFIG", ""),
        help="JSON file with the tailnet's DNS configuration sent in every netmap: magic_dns, domain,"
        " routes (split DNS: suffix -> resolvers), nameservers, search_domains"
        " (default: MagicDNS on wiremesh.internal, everything else to each host's resolvers)",
    )
    parser.add_argument(
        "--dead-connection-timeout",
        type=float,
        default=_env("DEAD_CONNECTION_TIMEOUT", 10.0),
        help="seconds a netmap stream's data may go unacknowledged before coord drops the connection"
        " and takes the node offline (a vanished host sends no FIN; HA subnet routers fail over"
        " then); 0 = leave it to TCP (~15 min)",
    )
    parser.add_argument(
        "--no-handshake-sharing",
        action="store_true",
        help="do not announce accepted agent handshakes on NATS (the shared database still refuses "
        "every replay; announcements only let other replicas refuse one from memory)",
    )
    parser.add_argument(
        "--provision-admin-key",
        action="append",
        default=[g for g in os.environ.get("WIREMESH_PROVISION_ADMIN_KEYS", "").split(";") if g],
        metavar="SCOPES=FILE",
        help="make sure the scoped admin key in FILE exists with SCOPES (e.g. nodes,authkeys,policy) "
        "(repeatable); a key revoked through the API stays revoked",
    )
    oidc_login.add_arguments(parser)
    parser.add_argument(
        "--agent-rate-limit",
        type=float,
        default=_env("AGENT_RATE_LIMIT", DEFAULT_RATE),
        help="agent requests per second one source address may make, sustained (default %(default)s; "
        "0 turns the limit off); behind a proxy, the source is its X-Forwarded-For when the proxy is "
        "trusted (--forwarded-allow-ips)",
    )
    parser.add_argument(
        "--agent-rate-burst",
        type=float,
        default=_env("AGENT_RATE_BURST", DEFAULT_BURST),
        help="agent requests one source address may make at once (default %(default)s)",
    )
    parser.add_argument(
        "--admin-listen",
        default=os.environ.get("WIREMESH_ADMIN_LISTEN", ""),
        metavar="HOST:PORT",
        help="serve the admin API (/api/v1) on this address only, and the agent API only on --listen "
        "(default: both on --listen)",
    )
    args = parser.parse_args(argv)
    try:
        load_dns_config(args.dns_config)  # refuse a bad file before anything starts
    except ValueError as exc:
        parser.error(str(exc))
    provisioned = _provisioned_keys(parser, args.provision_admin_key)
    settings = service.settings_from_args(args, "coord")
    try:
        oidc, server_url = oidc_login.config_from_args(args, f"{settings.listen_host}:{settings.listen_port}")
    except ValueError as exc:
        parser.error(str(exc))
    admin_listen = service.parse_listen(args.admin_listen, "--admin-listen") if args.admin_listen else None
    if admin_listen is not None and admin_listen[1] == settings.listen_port:
        raise SystemExit("wiremesh-coord: --admin-listen needs a port of its own, not --listen's")
    logs.setup_logging(settings.log_level, settings.log_json)
    config = CoordConfig(
        database_url=settings.database_url,
        bus=settings.bus,
        replica_id=settings.replica_id,
        admin_key=settings.admin_key,
        ephemeral_grace=args.ephemeral_grace,
        node_key_expiry=args.node_key_expiry or None,
        keys_timeout=args.keys_timeout,
        heartbeat_interval=args.heartbeat_interval,
        control_key_file=args.control_key_file,
        derp_map_file=args.derp_map,
        dns_config_file=args.dns_config,
        share_handshakes=not args.no_handshake_sharing,
        oidc=oidc,
        server_url=server_url,
        agent_rate=args.agent_rate_limit,
        agent_burst=args.agent_rate_burst,
    )
    coord = Coordinator(config)
    app = create_app(
        coord, provisioned, api_docs=settings.api_docs, admin_port=admin_listen[1] if admin_listen else None
    )
    service.serve(
        app,
        settings,
        on_exit=coord.begin_shutdown,
        extra_listen=admin_listen,
        dead_connection_timeout=args.dead_connection_timeout or None,
    )


def _provisioned_keys(
    parser: argparse.ArgumentParser, grants: list[str]
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out = []
    for grant in grants:
        scopes_text, sep, path = grant.partition("=")
        try:
            if not sep or not path:
                raise ValueError("expected SCOPES=FILE, e.g. nodes,authkeys,policy=/run/secrets/operator-key")
            token = pathlib.Path(path).read_text().strip()
            if admin_keys.split_key(token) is None:
                raise ValueError(
                    f"{path} does not hold a key shaped like {admin_keys.KEY_PREFIX}<id>-<secret>"
                )
            out.append((token, admin_keys.check_scopes(scopes_text.split(","))))
        except (OSError, ValueError) as exc:
            parser.error(f"--provision-admin-key {grant}: {exc}")
    return tuple(out)
