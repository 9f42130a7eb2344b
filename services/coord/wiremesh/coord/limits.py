"""Per-source request limits on coord's agent endpoints.

Every agent request costs coord a Noise handshake (two X25519 operations) and a database read
before it knows whether the caller is anyone: `SourceLimits` is a token bucket per source
address, checked by `AgentRateLimit` before the body is even read, so one address cannot make
coord do that work faster than `rate` requests a second (after a `burst`). Behind a proxy the
source is what uvicorn's proxy-header handling put in the scope (trusted proxies only).
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

AGENT_PATHS = ("/machine/",)
DEFAULT_RATE = 20.0  # requests per second per source address, sustained
DEFAULT_BURST = 200.0  # an agent's start is 2-3 requests; 200 covers a NAT full of them restarting
MAX_SOURCES = 65536  # addresses remembered; the least recently seen is forgotten first


class SourceLimits:
    """Token buckets by source address (pure: `now` comes in)."""

    def __init__(self, rate: float, burst: float, max_sources: int = MAX_SOURCES) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_sources = max_sources
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()
        self.refused = 0

    def allow(self, source: str, now: float) -> bool:
        tokens, at = self._buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.refused += 1
        self._buckets[source] = (tokens, now)
        while len(self._buckets) > self.max_sources:
            self._buckets.popitem(last=False)
        return allowed

    def retry_after(self, source: str) -> float:
        tokens, _ = self._buckets.get(source, (0.0, 0.0))
        return max(0.0, (1.0 - tokens) / self.rate) if self.rate > 0 else 1.0


class AgentRateLimit:
    """ASGI middleware: 429 for agent requests over their source's limit (rate 0: off)."""

    def __init__(
        self,
        app: ASGIApp,
        limits: SourceLimits,
        on_refused: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.limits = limits
        self.on_refused = on_refused
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.limits.rate <= 0
            or not str(scope.get("path", "")).startswith(AGENT_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        source = str(client[0]) if client else "-"
        if self.limits.allow(source, self.clock()):
            await self.app(scope, receive, send)
            return
        self.on_refused()
        wait = max(1, round(self.limits.retry_after(source)))
        body = json.dumps({"detail": f"too many requests from {source}; retry in {wait}s"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(wait).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
