"""asyncio DERP client: a thin adapter around the sans-I/O `ClientConnection`.

client = await DerpClient.connect("relay.example", 3340, node_private_key)
await client.send(peer_node_key, wireguard_packet)
event = await client.recv()          # PacketReceived, PeerGone, Health, ...
rtt = await client.ping()
await client.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl as ssl_module
import time
from typing import Any

from nacl.public import PrivateKey

from wiremesh.agent import bypass
from wiremesh.core.derp import frames
from wiremesh.core.derp.connection import ClientConnection, Connected, Event, State
from wiremesh.core.derp.frames import FrameError

log = logging.getLogger("wiremesh.agent.derp")

MAX_HTTP_RESPONSE = 8 << 10
RECV_QUEUE = 4096  # events waiting for recv(); beyond this, packets are dropped and counted


class DerpError(ConnectionError):
    """The relay refused us or broke the protocol."""


class DerpClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: ClientConnection,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.conn = conn
        self.server_key: bytes | None = None
        self.server_info: dict[str, Any] = {}
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(RECV_QUEUE)
        self._pings: dict[bytes, asyncio.Future[None]] = {}
        self._connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        self.closed = False
        self.error: BaseException | None = None

    @property
    def public_key(self) -> bytes:
        return self.conn.public_key

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        private_key: PrivateKey,
        *,
        server_key: bytes | None = None,
        ssl: ssl_module.SSLContext | None = None,
        fast_start: bool = False,
        timeout: float = 10.0,
    ) -> DerpClient:
        reader, writer = await asyncio.wait_for(bypass.open_connection(host, port, ssl=ssl), timeout)
        try:
            request = (
                f"GET /derp HTTP/1.1\r\nHost: {host}\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                f"User-Agent: wiremesh\r\n{'Derp-Fast-Start: 1' + chr(13) + chr(10) if fast_start else ''}\r\n"
            )
            writer.write(request.encode())
            if not fast_start:
                await asyncio.wait_for(_read_upgrade_response(reader), timeout)
            conn = ClientConnection(private_key, now=time.monotonic(), server_key=server_key)
            client = cls(reader, writer, conn)
            client._task = asyncio.create_task(client._run(), name="derp-client")
            await asyncio.wait_for(asyncio.shield(client._connected), timeout)
        except BaseException:
            writer.close()
            raise
        return client

    async def _run(self) -> None:
        conn = self.conn
        try:
            while True:
                self._arm_timer()
                data = await self._reader.read(1 << 16)
                if not data:
                    raise DerpError(
                        "relay closed the connection"
                        + ("" if conn.state is State.ESTABLISHED else " during the handshake")
                    )
                for event in conn.receive_data(data, time.monotonic()):
                    self._dispatch(event)
                self._flush()
        except (FrameError, OSError, DerpError) as exc:
            self.error = exc
        except asyncio.CancelledError:
            self.error = DerpError("client closed")
        finally:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
            if not self._connected.done():
                self._connected.set_exception(
                    self.error if isinstance(self.error, DerpError) else DerpError(str(self.error))
                )
            for fut in self._pings.values():
                if not fut.done():
                    fut.set_exception(DerpError("connection closed"))
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(None)
            self._writer.close()

    def _arm_timer(self) -> None:
        # A timer callback, not wait_for around read(): Python 3.11's wait_for can swallow
        # a cancellation that races with completed I/O, which would leave this loop running.
        deadline = self.conn.get_timer()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        self.conn.handle_timer(time.monotonic())
        self._flush()
        self._arm_timer()

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Connected):
            self.server_key = event.server_key
            self.server_info = event.info
            if not self._connected.done():
                self._connected.set_result(None)
            return
        if isinstance(event, frames.Pong):
            fut = self._pings.pop(event.data, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        if isinstance(event, frames.Ping | frames.KeepAlive):
            return  # the core already queued our Pong
        try:
            self._events.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self._writer.is_closing():
            self._writer.write(out)

    # --- API -------------------------------------------------------------------------

    async def send(self, dst: bytes, packet: bytes) -> None:
        self.send_nowait(dst, packet)
        await self._writer.drain()

    def send_nowait(self, dst: bytes, packet: bytes) -> None:
        if self.closed:
            raise DerpError("connection closed") from self.error
        self.conn.send_packet(dst, packet, time.monotonic())
        self._flush()

    def note_preferred(self, preferred: bool) -> None:
        self.conn.send_frame(frames.NotePreferred(preferred), time.monotonic())
        self._flush()

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests use it to send malformed frames)."""
        self._writer.write(data)

    async def recv(self, timeout: float | None = None) -> Event:
        event = await asyncio.wait_for(self._events.get(), timeout)
        if event is None:
            with contextlib.suppress(asyncio.QueueFull):
                self._events.put_nowait(None)  # keep telling later callers
            raise DerpError("connection closed") from self.error
        return event

    async def ping(self, timeout: float = 5.0) -> float:
        data = os.urandom(8)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pings[data] = fut
        started = time.monotonic()
        self.conn.send_frame(frames.Ping(data), started)
        self._flush()
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            self._pings.pop(data, None)
        return time.monotonic() - started

    async def wait_closed(self, timeout: float | None = None) -> None:
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)

    async def close(self) -> None:
        self._writer.close()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


async def _read_upgrade_response(reader: asyncio.StreamReader) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise DerpError("relay HTTP response too long") from exc
    except asyncio.IncompleteReadError as exc:
        raise DerpError("relay closed the connection before answering the upgrade") from exc
    if len(head) > MAX_HTTP_RESPONSE:
        raise DerpError("relay HTTP response too long")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "101":
        raise DerpError(f"relay refused the upgrade: {status_line}")
