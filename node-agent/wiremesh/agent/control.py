"""The agent side of the control channel: login, the netmap stream, endpoint updates.

`ControlClient` speaks to coord over HTTP with every request sealed in a Noise IK handshake
under the machine key (see wiremesh.core.control.channel). It holds no other state than
the keys it is given, so wiremeshd and benchmark simulators can both use it:

    client = ControlClient("http://coord:8080", machine_private_key)
    result = await client.login(node_key, disco_key, "laptop", auth_key="wmauth-...")
    async for netmap in client.netmaps(node_key):      # reconnects, full resync each time
        apply(netmap)

`NetmapWatcher` runs `netmaps()` in a task and keeps the latest netmap, for callers that
would rather poll or wait for a condition.

Coord's key: with `server_public_key` (pinned) every request is sealed to it, and coord's
`GET /key` is checked once against it so that a different server at the URL is refused with a
clear error (`CoordKeyChanged`) rather than a failed handshake; with `server_key_fingerprint`
(from a pre-auth key) the key from `GET /key` is accepted only if its fingerprint matches;
with neither it is learned from `GET /key` (wiremeshd allows that only over https:// or when
told to; see wiremesh.agent.mesh).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from wiremesh.agent import bypass
from wiremesh.core import crypto
from wiremesh.core.control import coordkey
from wiremesh.core.control import messages as cm
from wiremesh.core.control.channel import ClientCall, ControlError, FrameReader
from wiremesh.core.netmap import MapDelta, NetmapError, NetworkMap

log = logging.getLogger(__name__)
FRAMES = "application/x-wiremesh-frames"
_STALE_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class ControlRefused(Exception):
    """Coord answered and said no; `status` is its HTTP status, the message its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class LoginRequired(ControlRefused):
    """The node is unknown, deleted or expired: only a new login (maybe with an auth key) helps."""


class CoordKeyChanged(ControlRefused):
    """The server at the login URL is not the coord whose key this agent pinned."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class ControlUnavailable(Exception):
    """Coord could not be reached or the connection broke; retrying may help."""


@dataclasses.dataclass(frozen=True, slots=True)
class LoginResult:
    node_id: int
    name: str
    user: str
    tags: tuple[str, ...]
    addresses: tuple[str, ...]
    key_expiry: float | None
    ephemeral: bool
    refused_tags: tuple[str, ...] = ()  # requested tags coord did not grant
    tags_error: str = ""  # coord's reason, for `wiremesh status`


def _refusal(status: int, message: str) -> ControlRefused:
    if status in (401, 404) or "log in" in message:
        return LoginRequired(status, message)
    return ControlRefused(status, message)


class ControlClient:
    def __init__(
        self,
        server_url: str,
        machine_private_key: bytes,
        *,
        http: httpx.AsyncClient | None = None,
        server_public_key: bytes | None = None,
        server_key_fingerprint: str | None = None,
        clock: Callable[[], float] = time.time,
        timeout: float = 10.0,
    ) -> None:
        self.server_url = server_url.rstrip("/")
        self.machine_private_key = machine_private_key
        self.machine_public_key = crypto.public_key(machine_private_key)
        self.server_public_key = server_public_key
        self.server_key_fingerprint = server_key_fingerprint
        self._key_checked = False
        self.clock = clock
        self.timeout = timeout
        self._own_http = http is None
        # Marked connections: coord stays reachable while an exit node routes everything else.
        self.http = http or httpx.AsyncClient(
            timeout=timeout, transport=httpx.AsyncHTTPTransport(socket_options=bypass.socket_options())
        )

    async def aclose(self) -> None:
        if self._own_http:
            await self.http.aclose()

    async def __aenter__(self) -> ControlClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def fetch_server_key(self) -> bytes:
        """Coord's control key (GET /key), checked against the pin or the fingerprint if any;
        CoordKeyChanged when it differs."""
        try:
            response = await self.http.get(f"{self.server_url}/key", timeout=self.timeout)
            response.raise_for_status()
            offered = crypto.decode_key(response.json()["public_key"])
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise ControlUnavailable(f"could not fetch coord's key from {self.server_url}: {exc}") from exc
        pinned = self.server_public_key
        if pinned is not None and offered != pinned:
            raise CoordKeyChanged(
                f"coord's key changed: {self.server_url} offers {crypto.encode_key(offered)} but this agent "
                f"pinned {crypto.encode_key(pinned)}; refusing to talk to it. If coord's key was replaced on "
                "purpose, start wiremeshd with --coord-key NEWKEY"
            )
        fingerprint = self.server_key_fingerprint
        if pinned is None and fingerprint is not None and not coordkey.matches(offered, fingerprint):
            raise CoordKeyChanged(
                f"{self.server_url} offers key {crypto.encode_key(offered)}, whose fingerprint is not the "
                f"one in the auth key ({fingerprint}): not the coord that issued the key; refusing to talk to it"
            )
        self.server_public_key = offered
        self._key_checked = True
        return offered

    async def _call(self, payload: Any) -> ClientCall:
        if self.server_public_key is None:
            await self.fetch_server_key()
        elif not self._key_checked:
            # Pinned: check once that the URL still serves that key, to say clearly if it does not.
            # Unreachable /key is no reason to stop: the sealed request authenticates coord anyway.
            with contextlib.suppress(ControlUnavailable):
                await self.fetch_server_key()
        assert self.server_public_key is not None
        return ClientCall(self.machine_private_key, self.server_public_key, cm.encode(payload), self.clock())

    async def _unary(self, path: str, payload: Any) -> tuple[int, bytes]:
        for attempt in range(2):
            call = await self._call(payload)  # a retry needs a fresh handshake: coord refuses replays
            try:
                response = await self.http.post(
                    f"{self.server_url}{path}",
                    content=call.request,
                    headers={"content-type": "application/octet-stream"},
                    timeout=self.timeout,
                )
                break
            except _STALE_CONNECTION as exc:
                # A pooled keep-alive connection the server closed just as we reused it.
                if attempt:
                    raise ControlUnavailable(f"{path}: {exc!r}") from exc
            except httpx.HTTPError as exc:
                raise ControlUnavailable(f"{path}: {exc!r}") from exc
        return response.status_code, self._open_first(
            call, response.status_code, response.headers, response.content
        )

    def _open_first(self, call: ClientCall, status: int, headers: httpx.Headers, body: bytes) -> bytes:
        if not headers.get("content-type", "").startswith(FRAMES):
            raise _refusal(status, _detail(body) or f"HTTP {status}")
        reader = FrameReader()
        frames = reader.feed(body)
        if not frames:
            raise ControlUnavailable("truncated response from coord")
        try:
            return call.read_response(frames[0])
        except ControlError as exc:
            raise ControlRefused(status, str(exc)) from exc

    async def login(
        self,
        node_key: str,
        disco_key: str,
        hostname: str,
        auth_key: str = "",
        advertised_routes: tuple[str, ...] = (),
        endpoints: tuple[str, ...] = (),
        request_tags: tuple[str, ...] = (),
        *,
        force_reauth: bool = False,
        on_auth_url: Callable[[str], None] | None = None,
        poll_interval: float = 1.0,
    ) -> LoginResult:
        """Log in. Without an auth key, a coord with OIDC answers with a login URL: it is handed
        to `on_auth_url` (once per URL) and coord is asked again every `poll_interval` seconds
        until the user has signed in there (or coord refuses). Without `on_auth_url` such an
        answer raises LoginRequired naming the URL. `force_reauth` asks for a new sign-in even
        when the node is logged in (its key expiry starts again)."""
        followup = shown = ""
        while True:
            request = cm.LoginRequest(
                node_key=node_key,
                disco_key=disco_key,
                hostname=hostname,
                auth_key=auth_key,
                advertised_routes=tuple(advertised_routes),
                endpoints=tuple(endpoints),
                request_tags=tuple(request_tags),
                followup=followup,
                force_reauth=force_reauth,
            )
            status, payload = await self._unary("/machine/login", request)
            reply = _decode(cm.LoginResponse, payload)
            if reply.error or status != 200:
                raise _refusal(status, reply.error or f"HTTP {status}")
            if not reply.auth_url:
                break
            if on_auth_url is None:
                raise LoginRequired(401, f"sign in at {reply.auth_url} (interactive login)")
            if reply.auth_url != shown:
                shown = reply.auth_url
                on_auth_url(reply.auth_url)
            followup = reply.login_id
            await asyncio.sleep(poll_interval)
        return LoginResult(
            node_id=reply.node_id,
            name=reply.name,
            user=reply.user,
            tags=reply.tags,
            addresses=reply.addresses,
            key_expiry=reply.key_expiry,
            ephemeral=reply.ephemeral,
            refused_tags=reply.refused_tags,
            tags_error=reply.tags_error,
        )

    async def update(
        self,
        node_key: str,
        *,
        endpoints: tuple[str, ...] | None = None,
        advertised_routes: tuple[str, ...] | None = None,
        hostname: str | None = None,
        home_relay: int | None = None,
    ) -> None:
        request = cm.UpdateRequest(
            node_key=node_key,
            endpoints=None if endpoints is None else tuple(endpoints),
            advertised_routes=None if advertised_routes is None else tuple(advertised_routes),
            hostname=hostname,
            home_relay=home_relay,
        )
        await self._expect_ok("/machine/update", request)

    async def logout(self, node_key: str) -> None:
        await self._expect_ok("/machine/logout", cm.LogoutRequest(node_key=node_key))

    async def _expect_ok(self, path: str, request: Any) -> None:
        status, payload = await self._unary(path, request)
        reply = _decode(cm.Reply, payload)
        if reply.error or status != 200:
            raise _refusal(status, reply.error or f"HTTP {status}")

    async def stream_frames(
        self, node_key: str, endpoints: tuple[str, ...] | None = None, keepalive: float = 15.0
    ) -> AsyncIterator[dict[str, Any]]:
        """One netmap stream: decrypted frames as JSON objects ("netmap", "delta", "keepalive").

        Ends with LoginRequired/ControlRefused when coord refuses or closes the stream with an
        error, and ControlUnavailable when the connection breaks or goes silent.
        """
        request = cm.MapRequest(
            node_key=node_key, endpoints=None if endpoints is None else tuple(endpoints), keepalive=keepalive
        )
        for attempt in range(2):
            call = await self._call(request)
            got_response = False
            try:
                async for message in self._stream_once(call, keepalive):
                    got_response = True
                    yield message
            except _STALE_CONNECTION as exc:
                if got_response or attempt:
                    raise ControlUnavailable(f"netmap stream: {exc!r}") from exc
                continue  # the pooled connection was stale: retry once on a new one
            except httpx.HTTPError as exc:
                raise ControlUnavailable(f"netmap stream: {exc!r}") from exc
            except ControlError as exc:
                raise ControlUnavailable(f"netmap stream: {exc}") from exc
            raise ControlUnavailable("netmap stream ended")

    async def _stream_once(self, call: ClientCall, keepalive: float) -> AsyncIterator[dict[str, Any]]:
        timeout = httpx.Timeout(self.timeout, read=keepalive * 3 + 5)
        async with self.http.stream(
            "POST",
            f"{self.server_url}/machine/map",
            content=call.request,
            headers={"content-type": "application/octet-stream"},
            timeout=timeout,
        ) as response:
            if not response.headers.get("content-type", "").startswith(FRAMES):
                body = await response.aread()
                raise _refusal(response.status_code, _detail(body) or f"HTTP {response.status_code}")
            reader = FrameReader()
            first = True
            async for chunk in response.aiter_raw():
                for frame in reader.feed(chunk):
                    if first:
                        first = False
                        reply = _decode(cm.Reply, call.read_response(frame))
                        if reply.error or response.status_code != 200:
                            raise _refusal(response.status_code, reply.error)
                        continue
                    try:
                        message = json.loads(call.open_frame(frame))
                    except (ControlError, ValueError) as exc:
                        raise ControlUnavailable(f"bad frame on the netmap stream: {exc}") from exc
                    if not isinstance(message, dict):
                        raise ControlUnavailable("bad frame on the netmap stream: not an object")
                    if message.get("type") == "error":
                        code = message.get("code")
                        raise _refusal(
                            code if isinstance(code, int) else 403,
                            str(message.get("error", "stream closed by coord")),
                        )
                    yield message

    async def stream(
        self, node_key: str, endpoints: tuple[str, ...] | None = None, keepalive: float = 15.0
    ) -> AsyncIterator[NetworkMap]:
        """One netmap stream as whole netmaps: the full one first, then one per delta."""
        current: NetworkMap | None = None
        async for message in self.stream_frames(node_key, endpoints, keepalive):
            kind = message.get("type")
            try:
                if kind == "netmap":
                    current = NetworkMap.from_json(message)
                elif kind == "delta" and current is not None:
                    current = MapDelta.from_json(message).apply(current)
                else:
                    continue
            except NetmapError as exc:
                raise ControlUnavailable(f"bad netmap from coord: {exc}") from exc
            yield current

    async def netmaps(
        self,
        node_key: str,
        endpoints: Callable[[], tuple[str, ...] | None] | None = None,
        keepalive: float = 15.0,
        max_backoff: float = 5.0,
    ) -> AsyncIterator[NetworkMap]:
        """Netmaps for as long as the caller iterates: reconnects with backoff and resyncs fully.

        Stops only with LoginRequired / ControlRefused (the node must log in again).
        """
        backoff = 0.1
        while True:
            try:
                async for netmap in self.stream(node_key, endpoints() if endpoints else None, keepalive):
                    backoff = 0.1
                    yield netmap
            except ControlUnavailable as exc:
                log.info("netmap stream lost; reconnecting", extra={"error": str(exc)})
            except ControlRefused as exc:
                if exc.status < 500:
                    raise
                log.info("coord busy; reconnecting", extra={"error": str(exc)})
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, max_backoff)


class NetmapWatcher:
    """Keeps the latest netmap of one node current in a background task."""

    def __init__(self, client: ControlClient, node_key: str, keepalive: float = 15.0) -> None:
        self.client = client
        self.node_key = node_key
        self.keepalive = keepalive
        self.netmap: NetworkMap | None = None
        self.error: BaseException | None = None
        self.updates = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> NetmapWatcher:
        self._task = asyncio.create_task(self._run())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run(self) -> None:
        try:
            async for netmap in self.client.netmaps(self.node_key, keepalive=self.keepalive):
                async with self._changed:
                    self.netmap = netmap
                    self.updates += 1
                    self._changed.notify_all()
        except Exception as exc:
            async with self._changed:
                self.error = exc
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[NetworkMap], bool], timeout: float = 10.0) -> NetworkMap:
        """The first netmap (current or future) for which `predicate` holds."""

        def ready() -> bool:
            return self.error is not None or (self.netmap is not None and predicate(self.netmap))

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(ready), timeout)
        if self.error is not None:
            raise self.error
        assert self.netmap is not None
        return self.netmap


def _decode(cls: type[Any], payload: bytes) -> Any:
    try:
        return cm.decode(cls, payload)
    except ControlError as exc:
        raise ControlUnavailable(f"bad reply from coord: {exc}") from exc


def _detail(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(data, dict):
        return str(data.get("detail") or data.get("error") or "")
    return ""
