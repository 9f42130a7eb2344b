"""`wiremesh netcheck` and `wiremesh ping` for the local API backends that run a MagicSock: the
requests arrive on the local API's event loop and run on magicsock's."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Mapping
from typing import Any

from wiremesh.agent.magicsock.adapter import MagicSock


class Refused(Exception):
    """A local API request that cannot be served; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def resolve_peer(text: str, names: Mapping[str, bytes]) -> bytes | None:
    """A peer by name or base64 node key."""
    if text in names:
        return names[text]
    with contextlib.suppress(ValueError):
        raw = base64.b64decode(text, validate=True)
        if len(raw) == 32:
            return raw
    return None


def _loop(magicsock: MagicSock) -> asyncio.AbstractEventLoop:
    loop = magicsock.loop
    if loop is None or loop.is_closed():
        raise Refused(503, "magicsock is not running")
    return loop


async def netcheck(magicsock: MagicSock) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(magicsock.netcheck(), _loop(magicsock))
    )
    return result


async def ping(magicsock: MagicSock, peer: str, names: Mapping[str, bytes]) -> dict[str, Any]:
    key = resolve_peer(peer, names)
    if key is None or magicsock.endpoint_for(key) is None:
        raise Refused(404, f"no such peer {peer[:60]!r} (or no relay map: magicsock is idle)")
    replies = await asyncio.wrap_future(
        asyncio.run_coroutine_threadsafe(magicsock.ping(key), _loop(magicsock))
    )
    return {"peer": peer, "replies": replies, "path": magicsock.peer_path(key)}
