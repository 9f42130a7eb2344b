"""The agent's local API: small HTTP/1.1 over a unix socket (mode 0600), for the `wiremesh` CLI.

    GET  /v0/status   self, peers (name, addresses, online, endpoint, rx/tx, last handshake)
    GET  /v0/ip       {"addresses": [...]}
    POST /v0/up       resume forwarding (and retry login if coord had cut us off);
                      body {"auth_key": "..."} (optional) re-authenticates an expired node;
                      {"advertise_tags": ["tag:x"]} (optional) asks coord for these tags now;
                      {"force_reauth": true} signs in again at coord's identity provider
                      {"exit_node": "NAME|IP"|"", "exit_node_allow_lan_access": bool} (optional)
                      selects the exit node ("" stops using one)
    POST /v0/down     stop forwarding, stay logged in
    POST /v0/logout   deregister from coord and remove the state
    POST /v0/netcheck     probe UDP, public address, NAT mapping, relays (backends with netcheck())
    POST /v0/ping/PEER    one disco ping round to PEER and the path of each answer (backends with ping())

Only root (the socket's owner) can connect: the file mode is the access control. Requests are
bounded (head 8 KiB, body 64 KiB, 10 s to arrive) and answered with JSON, errors as
{"error": "..."} with a 4xx/5xx status; each connection carries one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

log = logging.getLogger("wiremesh.agent.localapi")

API_PREFIX = "/v0"
MAX_HEAD_BYTES = 8 * 1024
MAX_BODY_BYTES = 64 * 1024
READ_TIMEOUT = 10.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict"}
REASONS |= {413: "Payload Too Large", 500: "Internal Server Error", 502: "Bad Gateway"}
REASONS |= {503: "Service Unavailable"}


class Backend(Protocol):
    def status(self) -> dict[str, Any]: ...
    def ip(self) -> list[str]: ...
    async def up(self) -> dict[str, Any]: ...
    async def down(self) -> dict[str, Any]: ...
    async def logout(self) -> dict[str, Any]: ...


class LocalAPIError(RuntimeError):
    """The socket cannot be served (path taken by another daemon, not a socket, ...)."""


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_status(exc: Exception) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) and 400 <= status < 600 else None


class LocalAPIServer:
    def __init__(self, backend: Backend, path: str) -> None:
        self.backend = backend
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self.requests = 0
        self.bad_requests = 0

    async def start(self) -> None:
        self._clear_stale()
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=self.path, limit=MAX_HEAD_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        log.info("localapi_listening socket=%s", self.path)

    def _clear_stale(self) -> None:
        try:
            mode = os.lstat(self.path).st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise LocalAPIError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1)
            probe.connect(self.path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise LocalAPIError(f"cannot check {self.path}: {exc}") from exc
            os.unlink(self.path)  # left behind by a daemon that died
            return
        finally:
            probe.close()
        raise LocalAPIError(f"{self.path} is in use by another running wiremeshd")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # ---- one connection, one request

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, path, body = await asyncio.wait_for(self._read_request(reader), READ_TIMEOUT)
            except TimeoutError:
                raise _BadRequest(400, "request not received in time") from None
            self.requests += 1
            status, payload = await self._dispatch(method, path, body)
        except _BadRequest as exc:
            self.bad_requests += 1
            status, payload = exc.status, {"error": str(exc)}
        except (ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        except Exception as exc:
            log.exception("localapi_handler_failed")
            status, payload = 500, {"error": f"internal error: {exc}"}
        body = json.dumps(payload, indent=None).encode() + b"\n"
        head = (
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _BadRequest(413, f"request head larger than {MAX_HEAD_BYTES} bytes") from None
        if len(head) > MAX_HEAD_BYTES:
            raise _BadRequest(413, f"request head larger than {MAX_HEAD_BYTES} bytes")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadRequest(400, "malformed request line")
        method, target = parts[0], parts[1]
        length = 0
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                continue
            name = name.strip().lower()
            if name == "content-length":
                if not value.strip().isdigit():
                    raise _BadRequest(400, "malformed Content-Length")
                length = int(value.strip())
            elif name == "transfer-encoding":
                raise _BadRequest(400, "chunked bodies are not accepted; send Content-Length")
        if length > MAX_BODY_BYTES:
            raise _BadRequest(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        body = await reader.readexactly(length) if length else b""
        return method, target.split("?", 1)[0], body

    async def _dispatch(self, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
        backend = self.backend
        options = _json_object(body)

        async def ip() -> Any:
            return {"addresses": backend.ip()}

        async def status() -> Any:
            return backend.status()

        async def up() -> Any:
            if options.get("force_reauth") is True:
                # Optional capability: only a daemon that logs in to coord can sign in again.
                force = getattr(backend, "up_force_reauth", None)
                if force is None:
                    raise _BadRequest(400, "this daemon does not log in to a coordination server")
                return await force()
            auth_key = options.get("auth_key", "")
            if not isinstance(auth_key, str):
                raise _BadRequest(400, "auth_key must be a string")
            if "exit_node" in options:
                exit_node, allow_lan = options["exit_node"], options.get("exit_node_allow_lan_access", False)
                if not isinstance(exit_node, str) or not isinstance(allow_lan, bool):
                    raise _BadRequest(400, "exit_node must be a string, exit_node_allow_lan_access a boolean")
                # Optional capability: only a mesh daemon has peers to exit through.
                set_exit_node = getattr(backend, "set_exit_node", None)
                if set_exit_node is None:
                    raise _BadRequest(400, "this daemon does not log in to a coordination server")
                await set_exit_node(exit_node, allow_lan)
            tags = options.get("advertise_tags")
            if tags is not None:
                if not isinstance(tags, list) or len(tags) > 64 or not all(isinstance(t, str) for t in tags):
                    raise _BadRequest(400, "advertise_tags must be a list of tags like tag:name")
                # Optional capability, like the auth key: only a daemon that logs in to coord has tags.
                with_tags = getattr(backend, "up_with_tags", None)
                if with_tags is None:
                    raise _BadRequest(400, "this daemon does not log in to a coordination server")
                return await with_tags(auth_key, tuple(tags))
            if not auth_key:
                return await backend.up()
            # Optional capability: only a daemon that logs in to coord takes an auth key.
            reauth = getattr(backend, "up_with_auth_key", None)
            if reauth is None:
                raise _BadRequest(400, "this daemon does not log in to a coordination server")
            return await reauth(auth_key)

        routes: dict[str, tuple[str, Callable[[], Awaitable[Any]]]] = {
            f"{API_PREFIX}/status": ("GET", status),
            f"{API_PREFIX}/ip": ("GET", ip),
            f"{API_PREFIX}/up": ("POST", up),
            f"{API_PREFIX}/down": ("POST", backend.down),
            f"{API_PREFIX}/logout": ("POST", backend.logout),
        }
        # magicsock's routes, for backends that have them (wiremesh netcheck / wiremesh ping PEER).
        netcheck = getattr(backend, "netcheck", None)
        if netcheck is not None:
            routes[f"{API_PREFIX}/netcheck"] = ("POST", netcheck)
        ping = getattr(backend, "ping", None)
        if ping is not None and path.startswith(f"{API_PREFIX}/ping/"):
            peer = urllib.parse.unquote(path[len(f"{API_PREFIX}/ping/") :])[:200]
            routes[path] = ("POST", lambda: ping(peer))
        route = routes.get(path)
        if route is None:
            raise _BadRequest(404, f"no such endpoint {path[:100]!r}")
        if method != route[0]:
            raise _BadRequest(405, f"{path} takes {route[0]}, not {method[:10]}")
        try:
            return 200, await route[1]()
        except _BadRequest:
            raise
        except Exception as exc:
            code = _error_status(exc)
            if code is None:
                raise
            return code, {"error": str(exc)}


def _json_object(body: bytes) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _BadRequest(400, "request body is not JSON") from None
    if not isinstance(value, dict):
        raise _BadRequest(400, "request body must be a JSON object")
    return value
