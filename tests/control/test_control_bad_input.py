"""Bad input to coord: clear 4xx errors, refused forged/replayed/stale logins, nothing stored changes."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import httpx
import pytest
from control_helpers import make_agent

from wiremesh.core import crypto
from wiremesh.core.control import messages as cm
from wiremesh.core.control.channel import ClientCall, FrameReader


def snapshot(plane):
    """Everything an attacker could try to change: nodes and auth keys (with use counts)."""
    return plane.admin("GET", "/nodes"), plane.admin("GET", "/authkeys")


def server_key(plane) -> bytes:
    return crypto.decode_key(httpx.get(f"{plane.url}/key").json()["public_key"])


def login_call(
    plane, auth_key: str, now: float | None = None, server_public: bytes | None = None
) -> ClientCall:
    request = cm.LoginRequest(
        node_key=crypto.encode_key(crypto.public_key(crypto.generate_private_key())),
        disco_key=crypto.encode_key(crypto.public_key(crypto.generate_private_key())),
        hostname="mallory",
        auth_key=auth_key,
    )
    return ClientCall(
        crypto.generate_private_key(),
        server_public or server_key(plane),
        cm.encode(request),
        time.time() if now is None else now,
    )


def post(plane, path: str, body: bytes) -> httpx.Response:
    return httpx.post(
        f"{plane.url}{path}", content=body, headers={"content-type": "application/octet-stream"}
    )


@pytest.fixture
def auth_key(control_plane):
    return control_plane.auth_key(reusable=True)


def test_oversized_login_body_gets_413_and_stores_nothing(control_plane, auth_key):
    before = snapshot(control_plane)
    response = post(control_plane, "/machine/login", os.urandom(200_000))
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]
    assert snapshot(control_plane) == before


def test_garbage_login_body_gets_403_with_reason(control_plane, auth_key):
    before = snapshot(control_plane)
    response = post(control_plane, "/machine/login", os.urandom(300))
    assert response.status_code == 403
    assert "handshake failed" in response.json()["detail"]
    assert snapshot(control_plane) == before


def test_truncated_login_body_gets_403(control_plane, auth_key):
    response = post(control_plane, "/machine/login", b"\x01\x02")
    assert response.status_code == 403
    assert "malformed" in response.json()["detail"]


def test_replayed_login_is_refused_and_registers_nothing_more(control_plane, auth_key):
    call = login_call(control_plane, auth_key)
    first = post(control_plane, "/machine/login", call.request)
    assert first.status_code == 200
    before = snapshot(control_plane)
    replay = post(control_plane, "/machine/login", call.request)
    assert replay.status_code == 403
    assert "replayed" in replay.json()["detail"]
    assert snapshot(control_plane) == before


def test_stale_login_is_refused(control_plane, auth_key):
    before = snapshot(control_plane)
    call = login_call(control_plane, auth_key, now=time.time() - 3600)
    response = post(control_plane, "/machine/login", call.request)
    assert response.status_code == 403
    assert "stale" in response.json()["detail"]
    assert snapshot(control_plane) == before


def test_login_sealed_for_another_coord_key_is_refused(control_plane, auth_key):
    before = snapshot(control_plane)
    forged = login_call(
        control_plane, auth_key, server_public=crypto.public_key(crypto.generate_private_key())
    )
    response = post(control_plane, "/machine/login", forged.request)
    assert response.status_code == 403
    assert snapshot(control_plane) == before


def test_tampered_login_is_refused(control_plane, auth_key):
    before = snapshot(control_plane)
    data = bytearray(login_call(control_plane, auth_key).request)
    data[60] ^= 0x01  # inside the encrypted static key
    response = post(control_plane, "/machine/login", bytes(data))
    assert response.status_code == 403
    assert snapshot(control_plane) == before


def test_malformed_request_inside_valid_handshake_gets_clear_400(control_plane, auth_key):
    before = snapshot(control_plane)
    call = ClientCall(
        crypto.generate_private_key(), server_key(control_plane), b'{"node_key": 5}', time.time()
    )
    response = post(control_plane, "/machine/login", call.request)
    assert response.status_code == 400
    reply = json.loads(call.read_response(FrameReader().feed(response.content)[0]))
    assert "malformed request" in reply["error"]
    assert snapshot(control_plane) == before


async def test_invalid_route_in_login_gets_clear_error_and_no_node(control_plane, auth_key):
    before = snapshot(control_plane)
    agent = make_agent(control_plane.url, "badroutes")
    try:
        with pytest.raises(Exception, match="invalid route"):
            await agent.login(auth_key, routes=("10.0.0.1/8",))
    finally:
        await agent.close()
    assert snapshot(control_plane) == before


def admin_raw(plane, method: str, path: str, data: bytes | None, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{plane.url}/api/v1{path}",
        data=data,
        method=method,
        headers={
            "Authorization": f"Bearer {plane.admin_key if key is None else key}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_wrong_admin_key_gets_401_and_creates_nothing(control_plane):
    before = snapshot(control_plane)
    status, body = admin_raw(control_plane, "POST", "/authkeys", b'{"user": "eve"}', key="wrong")
    assert status == 401 and body["detail"] == "invalid admin key"
    assert snapshot(control_plane) == before


def test_missing_admin_key_gets_401(control_plane):
    request = urllib.request.Request(f"{control_plane.url}/api/v1/nodes")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 401


def test_malformed_admin_json_gets_422_with_message(control_plane):
    before = snapshot(control_plane)
    status, body = admin_raw(control_plane, "POST", "/authkeys", b'{"user": ')
    assert status == 422 and "malformed request" in body["detail"]
    assert snapshot(control_plane) == before


def test_wrongly_typed_admin_body_gets_422(control_plane):
    status, body = admin_raw(control_plane, "POST", "/authkeys", b'{"user": "x", "tags": "tag:a"}')
    assert status == 422 and "tags" in body["detail"]


def test_oversized_admin_body_gets_413(control_plane):
    before = snapshot(control_plane)
    status, body = admin_raw(control_plane, "POST", "/authkeys", b'{"user": "' + b"x" * 100_000 + b'"}')
    assert status == 413 and "too large" in body["detail"]
    assert snapshot(control_plane) == before


def test_invalid_tag_in_auth_key_gets_400(control_plane):
    before = snapshot(control_plane)
    status, body = admin_raw(control_plane, "POST", "/authkeys", b'{"user": "x", "tags": ["web"]}')
    assert status == 400 and "invalid tag" in body["detail"]
    assert snapshot(control_plane) == before


def test_invalid_expiration_gets_400(control_plane):
    status, body = admin_raw(control_plane, "POST", "/authkeys", b'{"user": "x", "expiration": "soon"}')
    assert status == 400 and "expiration" in body["detail"]


def test_unknown_node_gets_404(control_plane):
    status, body = admin_raw(control_plane, "DELETE", "/nodes/999999", None)
    assert status == 404 and "no node" in body["detail"]


def test_garbage_map_request_gets_403(control_plane):
    response = post(control_plane, "/machine/map", os.urandom(300))
    assert response.status_code == 403 and "handshake failed" in response.json()["detail"]


def test_oversized_map_request_gets_413(control_plane):
    response = post(control_plane, "/machine/map", os.urandom(100_000))
    assert response.status_code == 413 and "too large" in response.json()["detail"]


def test_map_request_from_unknown_machine_gets_401(control_plane):
    request = cm.MapRequest(node_key=crypto.encode_key(crypto.public_key(crypto.generate_private_key())))
    call = ClientCall(
        crypto.generate_private_key(), server_key(control_plane), cm.encode(request), time.time()
    )
    response = post(control_plane, "/machine/map", call.request)
    assert response.status_code == 401
    reply = json.loads(call.read_response(FrameReader().feed(response.content)[0]))
    assert "log in first" in reply["error"]
