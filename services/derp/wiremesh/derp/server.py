"""`wiremesh-derp`: the relay service.

Two listeners in one asyncio process:
- the DERP port: a plain asyncio server whose connections start as HTTP/1.1 (parsed by
  h11, a real HTTP parser), upgrade at `GET /derp` with `Upgrade: DERP` (101 Switching
  Protocols, or Tailscale's `Derp-Fast-Start: 1`), then carry DERP frames on the same
  socket. We own the socket from the first byte, so there is no hand-over from uvicorn
  to get wrong, and TLS is just an `ssl` context on that server.
- the admin port: a FastAPI app under uvicorn with `/metrics`, `/healthz`, `/readyz`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Response
from nacl.public import PrivateKey
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wiremesh.core.busauth import BusAccess
from wiremesh.core.derp import frames
from wiremesh.derp.keyauth import KeyAuthority
from wiremesh.derp.mesh import Mesh, follow_registry
from wiremesh.derp.relay import (
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_RATE_BYTES_PER_SECOND,
    Relay,
    RelayConfig,
)
from wiremesh.shell.logs import setup_logging

log = logging.getLogger("wiremesh.derp")


# --- key file --------------------------------------------------------------------------


def load_or_create_key(path: Path) -> PrivateKey:
    """The relay's private key, persisted as base64 in a 0600 file (created if missing)."""
    if path.exists():
        raw = base64.b64decode(path.read_text().strip(), validate=True)
        if len(raw) != 32:
            raise ValueError(f"{path}: key is {len(raw)} bytes, want 32")
        return PrivateKey(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = PrivateKey.generate()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(bytes(key)).decode() + "\n")
    return key


# --- metrics ---------------------------------------------------------------------------


class RelayCollector:
    """Reads the relay's plain counters at scrape time (nothing on the hot path)."""

    def __init__(self, relay: Relay, mesh: Callable[[], Mesh | None] = lambda: None) -> None:
        self.relay = relay
        self.mesh = mesh  # the replicas' mesh, once the server has one

    def collect(self) -> Iterator[Any]:
        stats = self.relay.stats
        yield GaugeMetricFamily(
            "derp_clients", "Clients connected and admitted", value=len(self.relay.clients)
        )
        yield GaugeMetricFamily(
            "derp_connections", "Open TCP connections (any state)", value=len(self.relay.connections)
        )
        yield CounterMetricFamily("derp_connections", "Connections accepted", value=stats.connections_total)
        yield CounterMetricFamily(
            "derp_packets_received", "Packets clients sent", value=stats.packets_received
        )
        yield CounterMetricFamily(
            "derp_bytes_received", "Packet bytes clients sent", value=stats.bytes_received
        )
        yield CounterMetricFamily(
            "derp_packets_forwarded", "Packets delivered", value=stats.packets_forwarded
        )
        yield CounterMetricFamily(
            "derp_bytes_forwarded", "Packet bytes delivered", value=stats.bytes_forwarded
        )
        yield CounterMetricFamily(
            "derp_cross_replica_sent", "Packets forwarded to another replica", value=stats.cross_replica_sent
        )
        yield CounterMetricFamily(
            "derp_cross_replica_received",
            "Packets another replica forwarded here",
            value=stats.cross_replica_received,
        )
        for name, help_text, counter in (
            ("derp_packets_dropped", "Packets dropped, by reason", stats.drops),
            ("derp_connections_closed", "Connections closed by the relay, by reason", stats.closes),
            ("derp_connections_refused", "Connections refused, by reason", stats.refused),
        ):
            family = CounterMetricFamily(name, help_text, labels=["reason"])
            for reason, value in sorted(counter.items()):
                family.add_metric([reason], value)
            yield family
        yield GaugeMetricFamily(
            "derp_registry_keys", "Node keys the relay currently accepts", value=len(self.relay.authority)
        )
        mesh = self.mesh()
        if mesh is not None:
            table = mesh.table
            yield GaugeMetricFamily(
                "derp_mesh_remote_keys",
                "Node keys other replicas of the region hold",
                value=len(table.remote),
            )
            yield GaugeMetricFamily(
                "derp_mesh_replicas_alive",
                "Other replicas of the region whose presence lease is current",
                value=len(table.peers),
            )
            yield GaugeMetricFamily(
                "derp_mesh_outbox_bytes",
                "Packet bytes waiting to be forwarded to other replicas over NATS",
                value=mesh.outbox_bytes,
            )
            yield CounterMetricFamily(
                "derp_mesh_leases_expired",
                "Replicas dropped after missing their presence beats",
                value=table.replicas_expired,
            )
            yield CounterMetricFamily(
                "derp_mesh_keys_expired",
                "Node keys lost with an expired replica lease",
                value=table.keys_expired,
            )
            yield CounterMetricFamily(
                "derp_mesh_peer_gone_sent",
                "PeerGone frames sent for keys that left another replica",
                value=mesh.peer_gone_sent,
            )
            yield CounterMetricFamily(
                "derp_mesh_presence_malformed",
                "Presence messages from the bus that could not be applied",
                value=mesh.malformed,
            )
        home = sum(
            1 for proto in self.relay.clients.values() if proto.conn is not None and proto.conn.preferred
        )
        yield GaugeMetricFamily("derp_clients_home", "Clients that call this relay their home", value=home)


# --- structured logs -------------------------------------------------------------------


# --- the service -----------------------------------------------------------------------


def parse_hostport(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return default_host, int(text)
    return host.strip("[]") or default_host, int(port)


class DerpService:
    """The whole relay: DERP listener(s), admin app, NATS (registry, mesh). Usable in-process."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = load_or_create_key(Path(args.key_file))
        self.authority = KeyAuthority(allow_all=args.insecure_allow_all)
        config = RelayConfig(
            rate_bytes_per_second=args.rate_bytes_per_second,
            rate_burst=args.rate_burst,
            max_queue_bytes=args.max_queue_bytes,
            keepalive_interval=args.keepalive,
            idle_timeout=args.idle_timeout or None,
            require_challenge=not args.allow_unchallenged_clients,
            max_connections_per_ip=args.max_connections_per_ip,
            handshake_timeout=args.handshake_timeout,
        )
        self.relay = Relay(self.key, self.authority, config)
        self.registry = CollectorRegistry()
        self.registry.register(RelayCollector(self.relay, lambda: self.mesh))
        self.servers: list[asyncio.AbstractServer] = []
        self.admin_server: Any = None
        self._admin_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._registry_task: asyncio.Task[Any] | None = None
        self.nc: Any = None
        self.mesh: Mesh | None = None
        self.derp_ports: list[int] = []
        self.admin_port = 0

    async def start(self) -> None:
        args = self.args
        if args.allow_keys_file:
            count = self.authority.load_file(Path(args.allow_keys_file))
            log.warning(
                "development option --allow-keys-file: %d node keys from %s", count, args.allow_keys_file
            )
        if args.insecure_allow_all:
            log.warning(
                "INSECURE: --insecure-allow-all lets ANY node key use this relay; never in production"
            )
        if args.nats:
            import nats

            bus_access = self.bus_access()
            if not bus_access.authenticated:
                log.warning("connecting to NATS %s without a credential", args.nats)
            self.nc = await nats.connect(
                args.nats,
                name=f"wiremesh-derp-{args.replica_id}",
                max_reconnect_attempts=-1,
                **bus_access.connect_options(),
            )
            if not args.allow_keys_file and not args.insecure_allow_all:
                # Listen at once; until the registry has answered, every key is refused
                # (and /readyz says 503), rather than not starting at all.
                self._registry_task = asyncio.create_task(
                    follow_registry(self.nc, self.authority), name="derp-registry"
                )
            self.mesh = Mesh(
                self.nc,
                self.relay,
                args.region,
                args.replica_id,
                interval=args.presence_interval,
                lease=args.presence_lease,
                max_outbox_bytes=args.mesh_outbox_bytes,
            )
            self.relay.mesh = self.mesh
            await self.mesh.start()
        ssl_ctx = None
        if args.tls_cert:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(args.tls_cert, args.tls_key)
        loop = asyncio.get_running_loop()
        from wiremesh.derp.relay import DerpProtocol

        for text in args.listen:
            host, port = parse_hostport(text)
            server = await loop.create_server(
                lambda: DerpProtocol(self.relay), host, port, ssl=ssl_ctx, reuse_address=True, backlog=1024
            )
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.servers.append(server)
            self.derp_ports.append(server.sockets[0].getsockname()[1])
        await self._start_admin()
        self._sweeper = asyncio.create_task(self._sweep_expired(), name="derp-expiry")
        log.info(
            "relay %s listening on %s (admin %d), region %s replica %s",
            base64.b64encode(self.relay.public_key).decode(),
            self.derp_ports,
            self.admin_port,
            args.region,
            args.replica_id,
        )

    def bus_access(self) -> BusAccess:
        return BusAccess(self.args.nats, "derp", self.args.nats_credentials, self.args.nats_ca)

    async def _start_admin(self) -> None:
        import uvicorn
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        app = FastAPI(title="wiremesh-derp", docs_url=None, redoc_url=None)
        relay, authority, registry = self.relay, self.authority, self.registry

        @app.get("/healthz")
        def healthz() -> dict[str, Any]:
            return {"ok": True, "clients": len(relay.clients)}

        @app.get("/readyz")
        def readyz(response: Response) -> dict[str, Any]:
            if not authority.synced:
                response.status_code = 503
            return {"ready": authority.synced}

        @app.get("/metrics")
        def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        host, port = parse_hostport(self.args.admin_listen, "127.0.0.1")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.admin_port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        self.admin_server = _QuietServer(config)
        self._admin_task = asyncio.create_task(self.admin_server.serve(sockets=[sock]), name="derp-admin")

    async def _sweep_expired(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.relay.sweep_expired()

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in (self._sweeper, self._registry_task):
            if task is not None:
                task.cancel()
        if self.mesh is not None:
            # Goodbyes are best effort: a NATS that does not take them must not hold up the exit.
            try:
                await asyncio.wait_for(self.mesh.stop(), 5.0)
            except TimeoutError:
                log.warning("NATS did not take the goodbye within 5 s; stopping without it")
                self.mesh.abandon()
        self.relay.close_all("shutdown", restarting=frames.Restarting(reconnect_in_ms=1000, try_for_ms=30000))
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        if self.admin_server is not None:
            self.admin_server.should_exit = True
            if self._admin_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._admin_task, 5.0)
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), 2.0)
        log.info("relay stopped")


class _QuietServer:
    """uvicorn.Server that leaves signal handling to us (we own SIGTERM for the process)."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        return Server(config)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wiremesh-derp", description="wiremesh DERP relay")
    p.add_argument(
        "--listen", action="append", default=None, help="DERP HOST:PORT (repeatable; default 0.0.0.0:3340)"
    )
    p.add_argument(
        "--admin-listen", default="127.0.0.1:9340", help="HOST:PORT for /metrics, /healthz, /readyz"
    )
    p.add_argument(
        "--key-file", default="/var/lib/wiremesh/derp.key", help="relay private key (created if missing)"
    )
    p.add_argument(
        "--nats",
        "--nats-url",
        dest="nats",
        default=os.environ.get("WIREMESH_NATS_URL"),
        help="NATS URL (key registry, replicas)",
    )
    p.add_argument(
        "--nats-credentials",
        default=os.environ.get("WIREMESH_NATS_CREDENTIALS", ""),
        help="file with the relay's NATS credential (an NKey seed or USER:PASSWORD; role 'derp')",
    )
    p.add_argument(
        "--nats-ca", default=os.environ.get("WIREMESH_NATS_CA", ""), help="CA certificate of the NATS server"
    )
    p.add_argument("--region", default="default", help="region name shared by this relay's replicas")
    p.add_argument("--replica-id", default=f"{socket.gethostname()}-{os.getpid()}", help="unique per replica")
    p.add_argument(
        "--presence-interval",
        type=float,
        default=2.0,
        help="seconds between this replica's presence beats to the others",
    )
    p.add_argument(
        "--presence-lease",
        type=float,
        default=6.0,
        help="a replica silent this long loses its clients on the others (3 missed beats by default)",
    )
    p.add_argument(
        "--allow-keys-file",
        help="DEVELOPMENT/BENCH ONLY: accept the base64 node keys in this file instead of the key registry",
    )
    p.add_argument(
        "--insecure-allow-all", action="store_true", help="accept ANY node key (comparison benchmarks only)"
    )
    p.add_argument(
        "--rate-bytes-per-second",
        type=int,
        default=DEFAULT_RATE_BYTES_PER_SECOND,
        help="per-client receive rate limit (default %(default)s, 100 Mbit/s; 0 = off)",
    )
    p.add_argument("--rate-burst", type=int, default=0, help="token bucket burst in bytes (default = rate)")
    p.add_argument(
        "--max-connections-per-ip",
        type=int,
        default=DEFAULT_MAX_CONNECTIONS_PER_IP,
        help="open connections one source address may hold (default %(default)s; 0 = no cap)",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        default=10.0,
        help="seconds from connecting to being admitted (HTTP upgrade and DERP handshake); slower "
        "clients are disconnected (default %(default)s)",
    )
    p.add_argument(
        "--allow-unchallenged-clients",
        action="store_true",
        help="admit clients that do not answer the relay's handshake challenge (Tailscale's own DERP "
        "client, e.g. the bench load generator); their captured ClientInfo can be replayed",
    )
    p.add_argument("--max-queue-bytes", type=int, default=1 << 20, help="per-client send queue bound")
    p.add_argument(
        "--mesh-outbox-bytes",
        type=int,
        default=16 << 20,
        help="packet bytes waiting to be forwarded to other replicas over NATS; past it, dropped and "
        "counted (mesh_backlog)",
    )
    p.add_argument("--keepalive", type=float, default=60.0, help="seconds between keepalives/pings")
    p.add_argument(
        "--idle-timeout", type=float, default=180.0, help="close ping-capable clients silent this long"
    )
    p.add_argument("--tls-cert", help="PEM certificate (TLS is optional; plain TCP without it)")
    p.add_argument("--tls-key", help="PEM private key for --tls-cert")
    p.add_argument("--log-level", default="info")
    return p


async def serve(args: argparse.Namespace) -> int:
    service = DerpService(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    print(
        json.dumps({"ready": True, "derp_ports": service.derp_ports, "admin_port": service.admin_port}),
        flush=True,
    )
    await stop.wait()
    log.info("signal received, shutting down")
    await service.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.listen is None:
        args.listen = ["0.0.0.0:3340"]
    setup_logging(args.log_level)
    if not (args.nats or args.allow_keys_file or args.insecure_allow_all):
        print(
            "wiremesh-derp: no source of allowed node keys: give --nats (key registry), or for development "
            "--allow-keys-file; refusing to relay for everyone",
            file=sys.stderr,
        )
        return 2
    if not 0 < args.presence_interval < args.presence_lease:
        print(
            "wiremesh-derp: --presence-lease must be longer than --presence-interval (> 0)", file=sys.stderr
        )
        return 2
    if args.nats:
        try:
            BusAccess(args.nats, "derp", args.nats_credentials, args.nats_ca).check()
        except ValueError as exc:
            print(f"wiremesh-derp: {exc}", file=sys.stderr)
            return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("wiremesh-derp: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    started = time.monotonic()
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:  # bad key files, ports in use: one clear line
        print(f"wiremesh-derp: {exc}", file=sys.stderr)
        return 1
    finally:
        log.debug("ran %.1f s", time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
