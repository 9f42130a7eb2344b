"""`wiremesh-stun`: an RFC 8489 Binding server over UDP (IPv4 and IPv6).

The protocol work is `wiremesh.core.stun.answer` (sans-I/O); this module is the asyncio
UDP adapter plus the service shell: a FastAPI app under uvicorn on the admin port for
`/metrics` and `/healthz` (DESIGN: every service's HTTP surface is FastAPI; the hot path,
here UDP, runs on plain asyncio in the same process), JSON logs, clean SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from wiremesh.core import stun
from wiremesh.shell.logs import setup_logging

log = logging.getLogger("wiremesh.stun")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stun_binding_requests", "Binding requests answered", ["family"], registry=self.registry
        )
        self.errors = Counter("stun_error_responses", "Error responses sent", registry=self.registry)
        self.drops = Counter(
            "stun_dropped", "Datagrams dropped, by reason", ["reason"], registry=self.registry
        )


class StunProtocol(asyncio.DatagramProtocol):
    def __init__(self, metrics: Metrics, software: str) -> None:
        self.metrics = metrics
        self.software = software
        self.transport: asyncio.DatagramTransport | None = None
        self.family = "ipv4"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_INET6:
            self.family = "ipv6"

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        result = stun.answer(data, (str(addr[0]), int(addr[1])), software=self.software)
        if result.reply is None:
            self.metrics.drops.labels(result.drop_reason or "unknown").inc()
            if result.error:
                log.debug("dropped datagram from %s: %s", addr[0], result.error)
            return
        if result.reply[0] & 0x01 and result.reply[1] & 0x10:  # error class bits
            self.metrics.errors.inc()
        else:
            family = "ipv6" if ":" in str(addr[0]) and not str(addr[0]).startswith("::ffff:") else "ipv4"
            self.metrics.requests.labels(family).inc()
        assert self.transport is not None
        self.transport.sendto(result.reply, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier replies (port unreachable etc.): nothing to do but count.
        self.metrics.drops.labels("icmp_error").inc()


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"want HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        # Separate IPv4 and IPv6 sockets may share a port only if the IPv6 one is v6-only.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


class StunService:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.metrics = Metrics()
        self.transports: list[asyncio.DatagramTransport] = []
        self.ports: list[int] = []
        self.admin_port = 0
        self._admin: Any = None
        self._admin_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for text in self.args.listen:
            host, port = parse_hostport(text)
            sock = udp_socket(host, port)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: StunProtocol(self.metrics, self.args.software), sock=sock
            )
            self.transports.append(transport)
            self.ports.append(sock.getsockname()[1])
        await self._start_admin()
        log.info("STUN listening on %s (admin %d)", self.args.listen, self.admin_port)

    async def _start_admin(self) -> None:
        import uvicorn
        from fastapi import FastAPI, Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        app = FastAPI(title="wiremesh-stun", docs_url=None, redoc_url=None)
        registry = self.metrics.registry

        @app.get("/healthz")
        def healthz() -> dict[str, Any]:
            return {"ok": True}

        @app.get("/metrics")
        def metrics() -> Response:
            return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        host, port = parse_hostport(self.args.admin_listen)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.admin_port = sock.getsockname()[1]

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield  # SIGTERM is ours

        self._admin = Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        self._admin_task = asyncio.create_task(self._admin.serve(sockets=[sock]), name="stun-admin")

    async def stop(self) -> None:
        for transport in self.transports:
            transport.close()
        if self._admin is not None:
            self._admin.should_exit = True
            if self._admin_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._admin_task, 5.0)
        log.info("STUN stopped")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wiremesh-stun", description="wiremesh STUN server (RFC 8489 Binding)")
    p.add_argument(
        "--listen",
        action="append",
        default=None,
        help="UDP HOST:PORT, repeatable (default 0.0.0.0:3478 and [::]:3478)",
    )
    p.add_argument("--admin-listen", default="127.0.0.1:9478", help="HOST:PORT for /metrics and /healthz")
    p.add_argument("--software", default="wiremesh-stun", help="SOFTWARE attribute in responses")
    p.add_argument("--log-level", default="info")
    return p


async def serve(args: argparse.Namespace) -> int:
    service = StunService(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    print(json.dumps({"ready": True, "ports": service.ports, "admin_port": service.admin_port}), flush=True)
    await stop.wait()
    await service.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.listen is None:
        args.listen = ["0.0.0.0:3478"]
        if socket.has_ipv6:
            args.listen.append("[::]:3478")
    setup_logging(args.log_level)
    try:
        return asyncio.run(serve(args))
    except (OSError, ValueError) as exc:
        print(f"wiremesh-stun: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
