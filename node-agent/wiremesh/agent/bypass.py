"""The agent's own traffic bypasses the tunnel: every socket it opens to coord, relays, STUN servers,
peers' endpoints and the LAN gateway carries a firewall mark, and a policy rule sends marked
packets to the main table before the mesh's table is looked up (netconf: rule 5210).

Without it, once an exit node's default route sits in the mesh table, the WireGuard datagrams
that carry the tunnel, and the coord and relay connections that keep it configured, would be
routed into the tunnel themselves. Tailscale does the same on Linux (its mark is 0x80000).

Setting SO_MARK needs CAP_NET_ADMIN; without it (an unprivileged test run) sockets go unmarked,
which only matters while an exit node is in use.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl as ssl_module

log = logging.getLogger("wiremesh.agent.bypass")

BYPASS_MARK = 0x80000
BYPASS_MASK = 0xFF0000
SO_MARK = getattr(socket, "SO_MARK", 36)


@functools.cache
def marks_allowed() -> bool:
    """Whether this process may set SO_MARK (checked once, on a throwaway socket)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
    except OSError:
        log.info(
            "bypass_marks_unavailable hint=needs CAP_NET_ADMIN; an exit node would route our own traffic"
        )
        return False
    return True


def mark(sock: socket.socket) -> socket.socket:
    """Mark `sock` so that its packets bypass the mesh's routes; returns it."""
    if marks_allowed():
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)
    return sock


def socket_options() -> list[tuple[int, int, int]]:
    """The mark as a socket option list (httpx transports, for coord's connections)."""
    return [(socket.SOL_SOCKET, SO_MARK, BYPASS_MARK)] if marks_allowed() else []


async def open_connection(
    host: str, port: int, *, ssl: ssl_module.SSLContext | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio.open_connection from a marked socket (each address in turn, as create_connection)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = mark(socket.socket(family, kind, proto))
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(
            sock=sock, ssl=ssl, server_hostname=host if ssl is not None else None
        )
    raise error or OSError(f"cannot resolve {host!r}")
