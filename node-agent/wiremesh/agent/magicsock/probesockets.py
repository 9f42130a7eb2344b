"""Birthday probe sockets: many extra UDP sockets, each opening its own NAT mapping, for the
rounds in which the path selector probes a peer behind a symmetric NAT (see core.magicsock).
Runs on magicsock's event loop; what arrives on them goes to a ProbeHandler."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections import Counter
from typing import Protocol

from wiremesh.agent import bypass
from wiremesh.core.magicsock import Direct

log = logging.getLogger("wiremesh.agent.magicsock")

PROBE_SOCKET_LIMIT = 1024  # open at once, all peers together
READ_BURST = 64


class ProbeHandler(Protocol):
    def probe_received(self, node_key: bytes, source: Direct, data: bytes) -> None:
        """A datagram on one of the peer's probe sockets (`source.socket` is the socket's id)."""
        ...


class ProbeSockets:
    def __init__(self, handler: ProbeHandler, drops: Counter[str]) -> None:
        self.handler = handler
        self.drops = drops
        self._sockets: dict[int, tuple[socket.socket, bytes]] = {}  # id -> (socket, peer's node key)
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._sockets)

    def open(self, loop: asyncio.AbstractEventLoop, node_key: bytes, count: int) -> list[int]:
        """Open up to `count` sockets for the peer (its earlier ones are closed); their ids."""
        self.close(loop, node_key, ())
        count = min(count, PROBE_SOCKET_LIMIT - len(self._sockets))
        ids: list[int] = []
        for _ in range(max(count, 0)):
            try:
                sock = bypass.mark(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                sock.setblocking(False)
                sock.bind(("0.0.0.0", 0))
            except OSError as exc:
                self.drops["probe_socket_open_failed"] += 1
                log.warning("probe_socket_open_failed error=%s", exc)
                break
            sid = self._next_id
            self._next_id += 1
            self._sockets[sid] = (sock, node_key)
            loop.add_reader(sock.fileno(), self._readable, sid)
            ids.append(sid)
        return ids

    def close(self, loop: asyncio.AbstractEventLoop | None, node_key: bytes, keep: tuple[int, ...]) -> None:
        """Close the peer's sockets except those in `keep` (one that became its path)."""
        for sid, (sock, owner) in list(self._sockets.items()):
            if owner == node_key and sid not in keep:
                if loop is not None:
                    with contextlib.suppress(Exception):
                        loop.remove_reader(sock.fileno())
                sock.close()
                del self._sockets[sid]

    def close_all(self) -> None:
        for sock, _ in self._sockets.values():
            sock.close()
        self._sockets.clear()

    def send(self, data: bytes, dest: Direct) -> None:
        entry = self._sockets.get(dest.socket)
        if entry is None:
            self.drops["probe_socket_closed"] += 1
            return
        try:
            entry[0].sendto(data, dest.address)
        except OSError as exc:
            self.drops[f"probe_send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1

    def _readable(self, sid: int) -> None:
        entry = self._sockets.get(sid)
        if entry is None:
            return
        sock, node_key = entry
        for _ in range(READ_BURST):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drops["probe_recv_error"] += 1
                return
            self.handler.probe_received(node_key, Direct((addr[0], addr[1]), sid), data)
