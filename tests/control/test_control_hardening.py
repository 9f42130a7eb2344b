"""Smaller holes in coord's HTTP surface, against real coord processes: slow clients, API docs,
a separate admin listener, out-of-range ids and numbers, and the control key file."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time

import httpx
import pytest
from fixtures_services import free_port

from wiremesh.coord.core import create_private_key_file
from wiremesh.core import crypto

pytestmark = pytest.mark.timeout(120)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True if the server closes the connection within `seconds` (reading whatever it sends)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


@pytest.mark.parametrize(
    "partial",
    [
        b"POST /machine/login HTTP/1.1\r\nHost: coord\r\n",  # a head that never ends
        b"POST /machine/login HTTP/1.1\r\nHost: coord\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10,  # a body
        b"",  # connected, then silent
    ],
)
def test_a_client_that_sends_its_request_too_slowly_is_disconnected(control_plane_factory, partial):
    plane = control_plane_factory(coord_args=["--request-read-timeout", "1"])
    with socket.create_connection(("127.0.0.1", plane.coord.port)) as sock:
        sock.sendall(partial)
        assert closed_within(sock, 20)
    # A prompt client on a kept-alive connection is not affected by the slow one.
    with httpx.Client() as http:
        assert http.get(f"{plane.url}/healthz").status_code == 200
        time.sleep(1.5)  # idle between requests counts against the keep-alive timeout, not this one
        assert http.get(f"{plane.url}/healthz").status_code == 200


def test_api_docs_and_schema_are_served_only_when_asked(control_plane_factory):
    plane = control_plane_factory()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{plane.url}{path}").status_code == 404
    documented = plane.add_coord(["--api-docs"])
    documented.start()
    assert httpx.get(f"{documented.url}/openapi.json").json()["info"]["title"] == "wiremesh-coord"


def test_the_admin_api_can_have_its_own_listener(control_plane_factory):
    admin_port = free_port()
    plane = control_plane_factory(coord_args=["--admin-listen", f"127.0.0.1:{admin_port}"])
    headers = {"Authorization": f"Bearer {plane.admin_key}"}
    admin_url = f"http://127.0.0.1:{admin_port}"
    assert httpx.get(f"{plane.url}/api/v1/nodes", headers=headers).status_code == 404
    assert httpx.get(f"{admin_url}/api/v1/nodes", headers=headers).status_code == 200
    assert httpx.get(f"{plane.url}/key").status_code == 200
    assert httpx.get(f"{admin_url}/key").status_code == 404
    assert httpx.post(f"{admin_url}/machine/login", content=b"x").status_code == 404
    assert httpx.get(f"{admin_url}/healthz").status_code == 200


def test_ids_beyond_64_bits_and_policy_numbers_with_thousands_of_digits_are_4xx(control_plane_factory):
    plane = control_plane_factory()
    headers = {"Authorization": f"Bearer {plane.admin_key}"}
    huge = "9" * 30
    api = f"{plane.url}/api/v1"
    for method, path in (
        ("GET", f"/nodes/{huge}"),
        ("DELETE", f"/nodes/{huge}"),
        ("POST", f"/nodes/{huge}/expire"),
        ("POST", f"/authkeys/{huge}/expire"),
        ("GET", f"/nodes/{2**63}"),
    ):
        assert httpx.request(method, f"{api}{path}", headers=headers).status_code == 422, path
    for number in ("9" * 5000, "1" + "0" * 40 + "e999"):
        policy = '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"], "proto": ' + number + "}]}"
        response = httpx.put(f"{api}/policy", headers=headers, content=policy)
        assert response.status_code == 400, response.text
    assert httpx.get(f"{plane.url}/healthz").status_code == 200


def test_the_control_key_file_is_private_from_its_first_byte_and_created_once(tmp_path):
    path = tmp_path / "control.key"
    old_umask = os.umask(0)  # the widest umask: the mode must not depend on it
    try:
        threads = [threading.Thread(target=create_private_key_file, args=(path,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    crypto.decode_key(path.read_text())  # whole
    assert [p.name for p in tmp_path.iterdir()] == ["control.key"]  # no temporary file left behind
