"""Scoped admin API keys against real coord processes: a read-only key changes nothing, a key
reaches only its scopes, a revoked or expired key is refused at once on every replica, keys are
stored hashed, the bootstrap key keeps working, and `wiremesh admin adminkeys` drives it all."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
from control_helpers import make_agent

from wiremesh.coord import admin_keys
from wiremesh.coord.app import create_app
from wiremesh.coord.core import CoordConfig, Coordinator
from wiremesh.core.busauth import BusAccess
from wiremesh.lab.support import wait_until

WIREMESH = [sys.executable, "-c", "import sys; from wiremesh.agent.cli import main; sys.exit(main())"]
POLICY = '{"tagOwners": {"tag:web": []}, "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'


def call(plane: Any, method: str, path: str, key: str, body: Any = None, coord: int = 0) -> tuple[int, Any]:
    """(status, decoded body) of an admin request; never raises on 4xx."""
    if isinstance(body, str):
        data, ctype = body.encode(), "text/plain"
    else:
        data, ctype = (None if body is None else json.dumps(body).encode()), "application/json"
    request = urllib.request.Request(
        f"{plane.coords[coord].url}{path}",
        data=data,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": ctype},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def new_key(plane: Any, scopes: list[str], expiration: str | None = "1h", coord: int = 0) -> dict[str, Any]:
    status, body = call(
        plane,
        "POST",
        "/api/v1/adminkeys",
        plane.admin_key,
        {"scopes": scopes, "expiration": expiration},
        coord,
    )
    assert status == 200, body
    return dict(body)


def snapshot(plane: Any) -> dict[str, Any]:
    """Everything an admin request could change, read with the bootstrap key."""
    out = {}
    for what in ("nodes", "routes", "authkeys", "policy", "adminkeys"):
        status, body = call(plane, "GET", f"/api/v1/{what}", plane.admin_key)
        assert status == 200, body
        out[what] = body
    return out


def test_every_admin_route_has_a_scope() -> None:
    config = CoordConfig(database_url="sqlite://", bus=BusAccess("nats://127.0.0.1:1", "coord"))
    app = create_app(Coordinator(config))
    routes = {
        (method, route.path.removeprefix("/api/v1"))
        for route in app.routes
        if getattr(route, "path", "").startswith("/api/v1/")
        for method in getattr(route, "methods", ())
    }
    assert len(routes) >= 18
    assert routes == set(admin_keys.ROUTE_SCOPES), "a route without an entry would need scope 'all'"


def test_scope_rules() -> None:
    assert admin_keys.permits({"read"}, "GET", "/nodes")
    assert admin_keys.permits({"read"}, "GET", "/policy")
    assert not admin_keys.permits({"read"}, "GET", "/adminkeys")  # admin keys are `all` business
    assert not admin_keys.permits({"read"}, "POST", "/authkeys")
    assert admin_keys.permits({"authkeys"}, "POST", "/authkeys")
    assert not admin_keys.permits({"authkeys"}, "GET", "/nodes")
    assert admin_keys.permits({"nodes", "policy"}, "PUT", "/policy")
    assert not admin_keys.permits({"nodes", "authkeys", "policy"}, "POST", "/adminkeys")
    assert admin_keys.permits({"all"}, "POST", "/adminkeys/{admin_key_id}/revoke")
    assert not admin_keys.permits({"policy"}, "GET", "/some/new/route")  # unknown: needs all
    with pytest.raises(ValueError, match="unknown scope"):
        admin_keys.check_scopes(["read", "write"])


async def test_read_only_key_cannot_change_anything(control_plane: Any) -> None:
    agent = make_agent(control_plane.url, "ro-target")
    try:
        result = await agent.login(control_plane.auth_key(), routes=("10.77.0.0/16",))
        auth_key_id = control_plane.admin("GET", "/authkeys")[-1]["id"]
        reader = new_key(control_plane, ["read"])
        before = snapshot(control_plane)
        # Every route coord serves, from the same app the server runs (its /openapi.json is off
        # unless --api-docs).
        config = CoordConfig(database_url="sqlite://", bus=BusAccess("nats://127.0.0.1:1", "coord"))
        spec = create_app(Coordinator(config), api_docs=True).openapi()
        ids = {"{node_id}": result.node_id, "{auth_key_id}": auth_key_id, "{admin_key_id}": reader["id"]}
        bodies = {
            "/api/v1/authkeys": {"user": "mallory", "reusable": True},
            "/api/v1/adminkeys": {"scopes": ["all"]},
            "/api/v1/policy": POLICY,
            "/api/v1/nodes/{node_id}/rename": {"name": "owned"},
            "/api/v1/nodes/{node_id}/tags": {"tags": ["tag:web"]},
            "/api/v1/nodes/{node_id}/routes/approve": {"prefixes": ["10.77.0.0/16"]},
            "/api/v1/nodes/{node_id}/routes/unapprove": {"prefixes": ["10.77.0.0/16"]},
        }
        mutating = [
            (method.upper(), path)
            for path, ops in spec["paths"].items()
            if path.startswith("/api/v1/")
            for method in ops
            if method.upper() != "GET"
        ]
        assert len(mutating) >= 12, mutating
        for method, template in mutating:
            path = template
            for name, value in ids.items():
                path = path.replace(name, str(value))
            status, body = call(control_plane, method, path, reader["key"], bodies.get(template))
            assert status == 403, (method, template, status, body)
            assert "lacks the" in body["detail"]
        assert snapshot(control_plane) == before
        # ...while it reads everything but the admin keys.
        for what in ("nodes", f"nodes/{result.node_id}", "routes", "authkeys", "policy"):
            assert call(control_plane, "GET", f"/api/v1/{what}", reader["key"])[0] == 200
        assert call(control_plane, "GET", "/api/v1/adminkeys", reader["key"])[0] == 403
    finally:
        await agent.close()


def test_scoped_keys_reach_only_their_scopes(control_plane: Any) -> None:
    policy_key = new_key(control_plane, ["policy"])["key"]
    authkeys_key = new_key(control_plane, ["authkeys"])["key"]
    status, body = call(control_plane, "PUT", "/api/v1/policy", policy_key, POLICY)
    assert status == 200, body
    assert call(control_plane, "POST", "/api/v1/authkeys", policy_key, {"user": "x"})[0] == 403
    status, body = call(control_plane, "POST", "/api/v1/authkeys", authkeys_key, {"user": "x"})
    assert status == 200 and body["key"].startswith("wmauth-")
    assert call(control_plane, "GET", "/api/v1/nodes", authkeys_key)[0] == 403
    assert call(control_plane, "DELETE", "/api/v1/policy", authkeys_key)[0] == 403
    assert call(control_plane, "DELETE", "/api/v1/policy", policy_key)[0] == 200


def test_unknown_scope_is_refused_and_stores_nothing(control_plane: Any) -> None:
    before = control_plane.admin("GET", "/adminkeys")
    status, body = call(
        control_plane, "POST", "/api/v1/adminkeys", control_plane.admin_key, {"scopes": ["root"]}
    )
    assert status == 400 and "unknown scope root" in body["detail"]
    assert control_plane.admin("GET", "/adminkeys") == before


def test_forged_key_of_the_right_shape_is_refused(control_plane: Any) -> None:
    real = new_key(control_plane, ["all"])
    forged = real["key"][:-8] + "AAAAAAAA"
    status, body = call(control_plane, "GET", "/api/v1/nodes", forged)
    assert (status, body["detail"]) == (401, "invalid admin key")


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_revoked_key_is_refused_at_once_on_every_replica(
    control_plane_factory: Any, postgres_server: Any, database: str
) -> None:
    url = postgres_server.create_database() if database == "postgresql" else None
    plane = control_plane_factory(database_url=url, replicas=2)
    key = new_key(plane, ["nodes"], coord=0)
    assert call(plane, "GET", "/api/v1/nodes", key["key"], coord=1)[0] == 200
    status, body = call(plane, "POST", f"/api/v1/adminkeys/{key['id']}/revoke", plane.admin_key, coord=0)
    assert status == 200 and body["revoked_at"] is not None and body["active"] is False
    # The very next request, on the other replica, with no wait: refused.
    for coord in (1, 0):
        status, body = call(plane, "GET", "/api/v1/nodes", key["key"], coord=coord)
        assert (status, body["detail"]) == (401, "admin key revoked")


def test_expired_key_is_refused(control_plane: Any) -> None:
    key = new_key(control_plane, ["read"], expiration="1s")
    wait_until(lambda: call(control_plane, "GET", "/api/v1/nodes", key["key"])[0] == 401, 15, what="expiry")
    assert call(control_plane, "GET", "/api/v1/nodes", key["key"])[1]["detail"] == "admin key expired"
    listed = next(k for k in control_plane.admin("GET", "/adminkeys") if k["id"] == key["id"])
    assert listed["active"] is False and listed["revoked_at"] is None


def test_keys_are_stored_hashed_and_listed_without_secrets(control_plane: Any) -> None:
    key = new_key(control_plane, ["read", "policy"])
    secret = key["key"].rsplit("-", 1)[1]
    with sqlite3.connect(control_plane.coord_db.removeprefix("sqlite:///")) as db:
        rows = db.execute("SELECT * FROM coord_admin_keys").fetchall()
    assert rows and not any(secret in str(column) for row in rows for column in row)
    listed = json.dumps(control_plane.admin("GET", "/adminkeys"))
    assert secret not in listed and key["prefix"] in listed


def test_bootstrap_key_still_has_every_scope(control_plane: Any) -> None:
    bootstrap = control_plane.admin_key
    assert call(control_plane, "PUT", "/api/v1/policy", bootstrap, POLICY)[0] == 200
    assert call(control_plane, "DELETE", "/api/v1/policy", bootstrap)[0] == 200
    assert call(control_plane, "POST", "/api/v1/authkeys", bootstrap, {"user": "b"})[0] == 200
    assert call(control_plane, "GET", "/api/v1/adminkeys", bootstrap)[0] == 200


def test_provisioned_key_exists_with_its_scopes_and_stays_revoked(
    control_plane_factory: Any, tmp_path: Any
) -> None:
    token = "wmadm-operator0001-" + "k" * 40
    path = tmp_path / "operator.key"
    path.write_text(token + "\n")
    plane = control_plane_factory(coord_args=["--provision-admin-key", f"nodes,authkeys,policy={path}"])
    assert call(plane, "GET", "/api/v1/nodes", token)[0] == 200
    assert call(plane, "POST", "/api/v1/authkeys", token, {"user": "op"})[0] == 200
    assert call(plane, "GET", "/api/v1/adminkeys", token)[0] == 403
    [listed] = [k for k in plane.admin("GET", "/adminkeys") if k["prefix"] == "wmadm-operator0001"]
    assert listed["scopes"] == ["nodes", "authkeys", "policy"] and listed["expires_at"] is None
    plane.admin("POST", f"/adminkeys/{listed['id']}/revoke")
    plane.coord.restart()
    assert call(plane, "GET", "/api/v1/nodes", token) == (401, {"detail": "admin key revoked"})


def cli(plane: Any, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WIREMESH_ADMIN_KEY": plane.admin_key if key is None else key}
    return subprocess.run(
        [*WIREMESH, "admin", "--server", plane.url, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_cli_creates_lists_and_revokes_admin_keys(control_plane: Any) -> None:
    out = cli(
        control_plane, "adminkeys", "create", "--scopes", "read", "--expiration", "7d", "--description", "ci"
    )
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("wmadm-")
    assert cli(control_plane, "nodes", "list", key=key).returncode == 0
    refused = cli(control_plane, "authkeys", "create", key=key)
    assert refused.returncode == 1 and "403" in refused.stderr and "'authkeys' scope" in refused.stderr
    table = cli(control_plane, "adminkeys", "list").stdout
    row = next(line for line in table.splitlines() if key.split("-")[1] in line)
    assert "read" in row and "active" in row and "ci" in row
    key_id = row.split()[0]
    assert cli(control_plane, "adminkeys", "revoke", key_id).returncode == 0
    gone = cli(control_plane, "nodes", "list", key=key)
    assert gone.returncode == 1 and "admin key revoked" in gone.stderr
