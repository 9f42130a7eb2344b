"""The agent's DNS server: UDP and TCP on 100.100.100.100:53 and [fd7a:115c:a1e0::53]:53.

The addresses live on the agent's TUN interface (the controller adds them), so they are local to
this host and nobody else's; the sockets bind with IP_FREEBIND, so they work before the address is
configured and survive its being re-added. Each query is parsed once (dnspython), answered by the
`Resolver` (magicdns.py) or forwarded to the resolvers it names, one after the other until one
answers (UDP, then TCP when the answer was truncated).

Bounds: queries of at most 4096 bytes over UDP and 65535 over TCP, at most MAX_INFLIGHT forwarded
at once (more are refused, counted), FORWARD_TIMEOUT per upstream. A malformed query gets FORMERR
(if it has an ID to answer) or is dropped, counted, never raised.

Forwarded queries are ordinary sockets of this host (not marked, bypass.py): a split-DNS resolver
behind a subnet router is reached through the mesh, the host's own resolvers the way the host
reaches them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
from typing import Any, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.rcode

from wiremesh.agent.magicdns import Answer, Forward, Resolver, error_response
from wiremesh.core.dnsconfig import RESOLVER_V4, RESOLVER_V6

log = logging.getLogger("wiremesh.agent.dns")

DNS_PORT = 53
MAX_UDP_QUERY = 4096
MAX_INFLIGHT = 256
FORWARD_TIMEOUT = 2.0
TCP_IDLE_TIMEOUT = 10.0
IP_FREEBIND = 15  # <linux/in.h>; IPV6_FREEBIND is 78 (Python 3.11 names neither)
IPV6_FREEBIND = 78


def _udp_limit(query: dns.message.Message) -> int:
    return max(512, min(query.payload, 4096)) if query.edns >= 0 else 512


class DNSServer:
    def __init__(self, resolver: Resolver, addresses: tuple[str, ...] = (RESOLVER_V4, RESOLVER_V6)) -> None:
        self.resolver = resolver
        self.addresses = addresses
        self.port = DNS_PORT
        self.counters: collections.Counter[str] = collections.Counter()
        self.bound: list[str] = []
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- sockets

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for address in self.addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                udp = self._socket(family, socket.SOCK_DGRAM, address)
                tcp = self._socket(family, socket.SOCK_STREAM, address)
            except OSError as exc:
                log.warning("dns_bind_failed address=%s error=%s", address, exc)
                continue
            transport, _ = await loop.create_datagram_endpoint(lambda: _UDP(self), sock=udp)
            self._transports.append(transport)
            tcp.listen(64)
            self._servers.append(await asyncio.start_server(self._serve_tcp, sock=tcp))
            self.bound.append(address)
        log.info("dns_server_started addresses=%s port=%d", ",".join(self.bound) or "-", self.port)

    def _socket(self, family: int, kind: int, address: str) -> socket.socket:
        sock = socket.socket(family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.setblocking(False)
            sock.bind((address, self.port))
        except OSError:
            sock.close()
            raise
        return sock

    async def close(self) -> None:
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        self._transports, self._servers = [], []

    # ---- queries

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def answer(self, wire: bytes, over_tcp: bool) -> bytes | None:
        """The response to one query on the wire (None: drop it)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            self.counters["malformed"] += 1
            return self._formerr(wire)
        if query.flags & dns.flags.QR:
            self.counters["not_a_query"] += 1
            return None
        decision = self.resolver.resolve(query)
        if isinstance(decision, Answer):
            self.counters[decision.kind] += 1
            response = decision.response
        else:
            response = await self._forward(query, decision)
        limit = 65535 if over_tcp else _udp_limit(query)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            self.counters["truncated"] += 1
            return response.to_wire(max_size=limit, prefer_truncation=True)

    def _formerr(self, wire: bytes) -> bytes | None:
        if len(wire) < 12:
            return None
        (query_id,) = struct.unpack_from("!H", wire)
        # Header only: ID, QR + the query's opcode and RD, RCODE=FORMERR, no sections.
        flags = 0x8000 | (wire[2] & 0x79) << 8 | dns.rcode.FORMERR
        return struct.pack("!HHHHHH", query_id, flags, 0, 0, 0, 0)

    async def _forward(self, query: dns.message.Message, decision: Forward) -> dns.message.Message:
        if self._inflight >= MAX_INFLIGHT:
            self.counters["refused_busy"] += 1
            return error_response(query, dns.rcode.REFUSED)
        self._inflight += 1
        try:
            for server in decision.servers:
                try:
                    response = await dns.asyncquery.udp(query, server, timeout=FORWARD_TIMEOUT)
                    if response.flags & dns.flags.TC:
                        response = await dns.asyncquery.tcp(query, server, timeout=FORWARD_TIMEOUT)
                except (dns.exception.DNSException, OSError) as exc:
                    self.counters["upstream_failed"] += 1
                    log.debug("dns_forward_failed server=%s error=%s", server, exc)
                    continue
                self.counters[f"forwarded_{decision.kind}"] += 1
                return response
        finally:
            self._inflight -= 1
        self.counters["servfail"] += 1
        return error_response(query, dns.rcode.SERVFAIL)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    head = await reader.readexactly(2)
                    (length,) = struct.unpack("!H", head)
                    wire = await reader.readexactly(length)
                response = await self.answer(wire, over_tcp=True)
                if response is None:
                    break
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            writer.close()

    def status(self) -> dict[str, Any]:
        return {"addresses": list(self.bound), "queries": dict(self.counters)}


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if len(data) > MAX_UDP_QUERY:
            self.server.counters["oversized"] += 1
            return
        self.server._spawn(self._reply(data, addr))

    async def _reply(self, data: bytes, addr: tuple[Any, ...]) -> None:
        response = await self.server.answer(data, over_tcp=False)
        if response is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(response, addr)
