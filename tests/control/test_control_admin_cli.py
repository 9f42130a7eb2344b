"""`wiremesh admin` end to end against a running coord (subprocess, real HTTP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from control_helpers import make_agent

WIREMESH = [sys.executable, "-c", "import sys; from wiremesh.agent.cli import main; sys.exit(main())"]


def cli(plane, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WIREMESH_ADMIN_KEY": plane.admin_key if key is None else key}
    return subprocess.run(
        [*WIREMESH, "admin", "--server", plane.url, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def test_authkeys_create_prints_the_new_key(control_plane):
    out = cli(control_plane, "authkeys", "create", "--reusable", "--tags", "tag:ci", "--user", "carol")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith("wmauth-")


def test_authkeys_list_json_and_expire(control_plane):
    created = json.loads(cli(control_plane, "--json", "authkeys", "create").stdout)
    assert cli(control_plane, "authkeys", "expire", str(created["id"])).returncode == 0
    listed = json.loads(cli(control_plane, "--json", "authkeys", "list").stdout)
    assert next(k for k in listed if k["id"] == created["id"])["expired"] is True


def test_authkeys_list_table_has_header(control_plane):
    cli(control_plane, "authkeys", "create")
    out = cli(control_plane, "authkeys", "list")
    assert out.returncode == 0 and out.stdout.splitlines()[0].split()[:3] == ["ID", "KEY", "USER"]


async def test_nodes_list_rename_tag_expire_delete(control_plane):
    agent = make_agent(control_plane.url, "clihost")
    try:
        result = await agent.login(cli(control_plane, "authkeys", "create").stdout.strip())
        table = cli(control_plane, "nodes", "list").stdout
        assert result.name in table and result.addresses[0].split("/")[0] in table
        assert cli(control_plane, "nodes", "rename", str(result.node_id), "cli-renamed").returncode == 0
        assert cli(control_plane, "nodes", "tag", "cli-renamed", "tag:a,tag:b").returncode == 0
        node = json.loads(cli(control_plane, "--json", "nodes", "list").stdout)
        mine = next(n for n in node if n["id"] == result.node_id)
        assert (mine["name"], mine["tags"]) == ("cli-renamed", ["tag:a", "tag:b"])
        assert cli(control_plane, "nodes", "expire", str(result.node_id)).returncode == 0
        assert cli(control_plane, "nodes", "delete", str(result.node_id)).returncode == 0
        remaining = json.loads(cli(control_plane, "--json", "nodes", "list").stdout)
        assert all(n["id"] != result.node_id for n in remaining)
    finally:
        await agent.close()


async def test_routes_list_and_approve(control_plane):
    agent = make_agent(control_plane.url, "router")
    try:
        result = await agent.login(control_plane.auth_key(), routes=("10.42.0.0/16",))
        listed = json.loads(cli(control_plane, "--json", "routes", "list").stdout)
        assert {"node_id": result.node_id, "prefix": "10.42.0.0/16", "approved": False}.items() <= next(
            r for r in listed if r["node_id"] == result.node_id
        ).items()
        out = cli(control_plane, "routes", "approve", str(result.node_id), "10.42.0.0/16")
        assert out.returncode == 0, out.stderr
        listed = json.loads(cli(control_plane, "--json", "routes", "list").stdout)
        assert next(r for r in listed if r["node_id"] == result.node_id)["approved"] is True
    finally:
        await agent.close()


def test_wrong_admin_key_exits_1_with_message(control_plane):
    out = cli(control_plane, "nodes", "list", key="nope")
    assert out.returncode == 1 and "401" in out.stderr and "invalid admin key" in out.stderr


def test_unreachable_server_exits_1_with_message(control_plane):
    out = subprocess.run(
        [*WIREMESH, "admin", "--server", "http://127.0.0.1:9", "--admin-key", "k", "nodes", "list"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "cannot reach coord" in out.stderr
