"""The I/O shell shared by the control-plane services (keys, coord).

Everything a FastAPI service of ours needs around its own logic: flags and environment,
structured logging, the database (SQLAlchemy engine, migrations, one worker thread), the
NATS connection, bounded request bodies, and uvicorn with a clean SIGTERM shutdown. The
protocol modules beside this one stay sans-I/O; this one is the only place that is not.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import pathlib
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import h11
import nats
import uvicorn
from fastapi import HTTPException, Request
from nats.aio.client import Client as NATS
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker
from uvicorn.protocols.http.h11_impl import H11Protocol

from wiremesh.core.busauth import BusAccess

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class ServiceSettings:
    listen_host: str
    listen_port: int
    bus: BusAccess
    database_url: str
    state_dir: pathlib.Path
    admin_key: str
    replica_id: str
    log_level: str
    log_json: bool
    extra: dict[str, Any]
    api_docs: bool = False  # serve /docs and /openapi.json
    request_read_timeout: float = 10.0  # a request's head and body must arrive within this
    idle_timeout: float = 75.0  # an idle keep-alive connection is closed after this
    forwarded_allow_ips: str = "127.0.0.1"  # proxies whose X-Forwarded-For names the client


def add_common_arguments(parser: argparse.ArgumentParser, name: str, default_port: int) -> None:
    env = os.environ.get
    parser.add_argument("--listen", default=env("WIREMESH_LISTEN", f"127.0.0.1:{default_port}"))
    parser.add_argument("--nats-url", default=env("WIREMESH_NATS_URL", "nats://127.0.0.1:4222"))
    parser.add_argument(
        "--nats-credentials",
        default=env("WIREMESH_NATS_CREDENTIALS", ""),
        help=f"file with this service's NATS credential (an NKey seed or USER:PASSWORD; role {name!r})",
    )
    parser.add_argument(
        "--nats-ca", default=env("WIREMESH_NATS_CA", ""), help="CA certificate of the NATS server (TLS)"
    )
    parser.add_argument(
        "--database-url",
        default=env("WIREMESH_DATABASE_URL", ""),
        help="SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...); default: SQLite in --state-dir",
    )
    parser.add_argument("--state-dir", default=env("WIREMESH_STATE_DIR", f"/var/lib/wiremesh/{name}"))
    parser.add_argument("--admin-key", default=env("WIREMESH_ADMIN_KEY", ""))
    parser.add_argument("--admin-key-file", default=env("WIREMESH_ADMIN_KEY_FILE", ""))
    parser.add_argument("--replica-id", default=env("WIREMESH_REPLICA_ID", ""))
    parser.add_argument("--log-level", default=env("WIREMESH_LOG_LEVEL", "info"))
    parser.add_argument("--log-format", choices=("json", "text"), default=env("WIREMESH_LOG_FORMAT", "json"))
    parser.add_argument(
        "--api-docs",
        action="store_true",
        default=env("WIREMESH_API_DOCS", "") == "1",
        help="serve the OpenAPI schema and docs (/openapi.json, /docs); off by default",
    )
    parser.add_argument(
        "--request-read-timeout",
        type=float,
        default=float(env("WIREMESH_REQUEST_READ_TIMEOUT", "10")),
        help="seconds a client has to send a whole request (head and body) once it starts one, or "
        "after connecting; slower clients are disconnected (default %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=float(env("WIREMESH_IDLE_TIMEOUT", "75")),
        help="seconds an idle keep-alive connection stays open (default %(default)s)",
    )
    parser.add_argument(
        "--forwarded-allow-ips",
        default=env("WIREMESH_FORWARDED_ALLOW_IPS", "127.0.0.1"),
        help="comma-separated proxy addresses trusted to set X-Forwarded-For (the client address that "
        "per-source limits use); default %(default)s",
    )


def settings_from_args(args: argparse.Namespace, name: str) -> ServiceSettings:
    host, _, port = str(args.listen).rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"wiremesh-{name}: --listen must be HOST:PORT, got {args.listen!r}")
    state_dir = pathlib.Path(args.state_dir)
    database_url = args.database_url or f"sqlite:///{state_dir / (name + '.db')}"
    admin_key = args.admin_key
    if args.admin_key_file:
        admin_key = pathlib.Path(args.admin_key_file).read_text().strip()
    replica_id = args.replica_id or f"{name}-{os.uname().nodename}-{os.getpid()}"
    bus = BusAccess(args.nats_url, name, args.nats_credentials, args.nats_ca)
    try:
        bus.check()
    except ValueError as exc:
        raise SystemExit(f"wiremesh-{name}: {exc}") from None
    return ServiceSettings(
        listen_host=host.strip("[]"),
        listen_port=int(port),
        bus=bus,
        database_url=database_url,
        state_dir=state_dir,
        admin_key=admin_key,
        replica_id=replica_id,
        log_level=args.log_level,
        log_json=args.log_format == "json",
        extra={k: v for k, v in vars(args).items()},
        api_docs=bool(args.api_docs),
        request_read_timeout=float(args.request_read_timeout),
        idle_timeout=float(args.idle_timeout),
        forwarded_allow_ips=str(args.forwarded_allow_ips),
    )


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise SystemExit(f"{flag} must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def make_engine(url: str) -> Engine:
    """An engine for SQLite (WAL, waits for locks) or PostgreSQL."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)


def run_migrations(engine: Engine, script_location: str, version_table: str) -> None:
    """Bring the schema up to date (alembic `upgrade head`) before serving."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", script_location)
    config.set_main_option("version_table", version_table)
    with engine.begin() as connection:
        # Replicas starting together must not both create the schema: take a write lock first.
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        elif engine.dialect.name == "sqlite":
            connection.exec_driver_sql("CREATE TABLE IF NOT EXISTS wiremesh_migration_lock (x INTEGER)")
            connection.exec_driver_sql("DELETE FROM wiremesh_migration_lock")
        config.attributes["connection"] = connection
        config.attributes["version_table"] = version_table
        command.upgrade(config, "head")


class Database:
    """A session factory whose work runs on one worker thread, off the event loop.

    One thread serialises writes, which is what SQLite wants anyway and keeps PostgreSQL
    transactions short; callers get a fresh session and a committed transaction per call.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # SQLite calls take well under a millisecond: running them on the event loop costs less
        # than handing them to a thread (a GIL hand-off per call under load). PostgreSQL waits
        # on the network, so it gets the worker thread.
        self.inline = engine.dialect.name == "sqlite"
        self.sessions = sessionmaker(engine, expire_on_commit=False)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="db")

    def call(self, fn: Callable[[Session], T]) -> T:
        with self.sessions.begin() as session:
            return fn(session)

    async def run(self, fn: Callable[[Session], T]) -> T:
        if self.inline:
            return self.call(fn)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.call, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.engine.dispose()


async def connect_nats(bus: BusAccess, name: str) -> NATS:
    """Connect as the service's bus role and keep reconnecting forever: a NATS restart must not
    take a service down."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", extra={"error": str(exc)})

    async def on_disconnect() -> None:
        log.warning("nats disconnected")

    async def on_reconnect() -> None:
        log.info("nats reconnected")

    if not bus.authenticated:
        log.warning("connecting to NATS without a credential", extra={"url": bus.url})
    return await nats.connect(
        bus.url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        allow_reconnect=True,
        connect_timeout=2,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
        **bus.connect_options(),
    )


async def wait_for_nats(bus: BusAccess, name: str, deadline_s: float = 30.0) -> NATS:
    """Connect once NATS is reachable (start-up order across services does not matter)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            return await connect_nats(bus, name)
        except Exception as exc:
            if time.monotonic() > end:
                raise
            log.info("waiting for nats", extra={"error": str(exc)})
            await asyncio.sleep(0.5)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it grows past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise HTTPException(413, f"request body too large (limit {limit} bytes)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body too large (limit {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


class SlowClientTimeout(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for reading each request.

    uvicorn times out idle keep-alive connections but not a client that is slow to send: one byte
    of a request head every few seconds holds a connection forever (slowloris). Here a request's
    head and body must arrive within `read_timeout` seconds of the connection opening or of the
    request's first byte; otherwise the connection is closed. Streaming responses are not limited
    (the timer stops once the whole request is in).
    """

    read_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._arm_read_timer()

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_read_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._cancel_read_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def _arm_read_timer(self) -> None:
        self._cancel_read_timer()
        self._read_timer = self.loop.call_later(self.read_timeout, self._read_timed_out)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log.info("closing a slow client", extra={"client": str(self.client)})
            self.transport.close()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_exit = on_exit

    def handle_exit(self, sig: int, frame: Any) -> None:
        # Long-lived streams never end by themselves: tell the app first so they close and
        # uvicorn's graceful shutdown does not sit out its whole timeout.
        if self._on_exit is not None:
            self._on_exit()
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after its graceful shutdown, so the process would die
        # "killed by SIGTERM"; a shutdown that completed is a success: exit 0.
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


TCP_USER_TIMEOUT = 18  # Linux, <netinet/tcp.h>; Python 3.11 has no constant for it


def serve(
    app: Any,
    settings: ServiceSettings,
    on_exit: Callable[[], None] | None = None,
    extra_listen: tuple[str, int] | None = None,
    dead_connection_timeout: float | None = None,
) -> None:
    """Run uvicorn; SIGTERM and SIGINT finish in-flight requests, run shutdown, and exit 0.
    `extra_listen` is a second address served by the same app (e.g. coord's --admin-listen).

    `dead_connection_timeout`: a connection whose sent data goes unacknowledged this long is
    aborted (TCP_USER_TIMEOUT on the listening sockets, which accepted connections inherit). A
    peer that vanished without a FIN (power loss, a cut cable) is noticed then instead of after
    TCP's own retries (~15 minutes): what lets coord take a node behind a long-lived stream
    offline.
    """
    protocol = type(
        "SlowClientTimeout", (SlowClientTimeout,), {"read_timeout": settings.request_read_timeout}
    )
    config = uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        log_config=None,
        access_log=False,
        http=protocol,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=int(settings.idle_timeout),  # longer than clients keep idle pooled connections
        forwarded_allow_ips=settings.forwarded_allow_ips,
        limit_concurrency=None,
        backlog=4096,
    )
    sockets = [_bind(settings.listen_host, settings.listen_port)]
    if extra_listen is not None:
        sockets.append(_bind(*extra_listen))
    for sock in sockets:
        if dead_connection_timeout:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(dead_connection_timeout * 1000))
        sock.listen(4096)
    server = _Server(config, on_exit)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
