"""The local API server on a real unix socket: routing, limits, errors, socket hygiene."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import pytest

from wiremesh.agent.localapi import MAX_BODY_BYTES, MAX_HEAD_BYTES, LocalAPIError, LocalAPIServer
from wiremesh.agent.mesh.controller import MeshError


class Backend:
    """Answers like MeshAgent; `down` refuses the way MeshAgent does once logged out."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def status(self) -> dict[str, Any]:
        return {"backend_state": "Running"}

    def ip(self) -> list[str]:
        return ["100.64.0.1", "fd7a:115c:a1e0::1"]

    async def up(self) -> dict[str, Any]:
        self.calls.append("up")
        return {"backend_state": "Running"}

    async def down(self) -> dict[str, Any]:
        raise MeshError(409, "logged out")

    async def logout(self) -> dict[str, Any]:
        self.calls.append("logout")
        return {"backend_state": "LoggedOut"}


async def request(path: str, raw: bytes) -> tuple[int, Any]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(raw)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def get(path: str, target: str, method: str = "GET") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()


@pytest.fixture
async def server(tmp_path):
    backend = Backend()
    srv = LocalAPIServer(backend, str(tmp_path / "run" / "wiremeshd.sock"))
    await srv.start()
    try:
        yield srv, backend
    finally:
        await srv.close()


async def test_socket_is_created_mode_0600(server):
    srv, _ = server
    assert os.stat(srv.path).st_mode & 0o777 == 0o600


async def test_status_and_ip_are_served_as_json(server):
    srv, _ = server
    assert await request(srv.path, get(srv.path, "/v0/status")) == (200, {"backend_state": "Running"})
    code, body = await request(srv.path, get(srv.path, "/v0/ip"))
    assert code == 200 and body["addresses"][0] == "100.64.0.1"


async def test_actions_need_post(server):
    srv, backend = server
    code, body = await request(srv.path, get(srv.path, "/v0/logout"))
    assert code == 405 and "takes POST" in body["error"] and backend.calls == []
    assert (await request(srv.path, get(srv.path, "/v0/logout", "POST")))[0] == 200
    assert backend.calls == ["logout"]


async def test_unknown_endpoint_is_404(server):
    srv, _ = server
    code, body = await request(srv.path, get(srv.path, "/v0/nope"))
    assert code == 404 and "no such endpoint" in body["error"]


async def test_backend_refusal_keeps_its_status_and_message(server):
    srv, _ = server
    assert await request(srv.path, get(srv.path, "/v0/down", "POST")) == (409, {"error": "logged out"})


async def test_malformed_request_line_is_400(server):
    srv, _ = server
    code, body = await request(srv.path, b"garbage\r\n\r\n")
    assert code == 400 and "malformed" in body["error"]


async def test_oversized_head_and_body_are_413(server):
    srv, _ = server
    huge_head = b"GET /v0/status HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10) + b"\r\n\r\n"
    assert (await request(srv.path, huge_head))[0] == 413
    big_body = f"POST /v0/up HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n\r\n".encode()
    assert (await request(srv.path, big_body))[0] == 413


async def test_stale_socket_of_a_dead_daemon_is_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    srv = LocalAPIServer(Backend(), path)
    await srv.start()
    try:
        assert (await request(path, get(path, "/v0/status")))[0] == 200
    finally:
        await srv.close()


async def test_socket_in_use_by_a_running_daemon_is_refused(server):
    srv, _ = server
    with pytest.raises(LocalAPIError, match="in use"):
        await LocalAPIServer(Backend(), srv.path).start()


async def test_path_that_is_not_a_socket_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("precious")
    with pytest.raises(LocalAPIError, match="not a socket"):
        await LocalAPIServer(Backend(), str(path)).start()
    assert path.read_text() == "precious"


async def test_up_with_an_auth_key_needs_a_backend_that_logs_in(server):
    srv, backend = server
    body = json.dumps({"auth_key": "wmauth-x"}).encode()
    raw = f"POST /v0/up HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    code, answer = await request(srv.path, raw)
    assert code == 400 and "does not log in" in answer["error"] and backend.calls == []


async def test_up_body_that_is_not_a_json_object_is_400(server):
    srv, backend = server
    raw = b"POST /v0/up HTTP/1.1\r\nContent-Length: 3\r\n\r\n[1]"
    code, answer = await request(srv.path, raw)
    assert code == 400 and "JSON object" in answer["error"] and backend.calls == []
