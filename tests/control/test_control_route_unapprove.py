"""Withdrawing a route approval (`POST /api/v1/nodes/ID/routes/unapprove`, `wiremesh admin routes
unapprove`): the prefix leaves the router's allowed IPs in every peer's netmap stream."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.error

import pytest
from control_helpers import make_agent

ROUTE = "10.78.0.0/24"
OTHER = "10.79.0.0/24"
WIREMESH = [sys.executable, "-c", "import sys; from wiremesh.agent.cli import main; sys.exit(main())"]


@pytest.fixture
async def routed(control_plane):
    """Three nodes streaming netmaps; `router` advertises ROUTE and OTHER, both approved."""
    key = control_plane.auth_key(reusable=True)
    suffix = secrets.token_hex(3)
    router, a, b = (make_agent(control_plane.url, f"{n}-{suffix}") for n in ("router", "seer", "viewer"))
    try:
        await router.login(key, routes=(ROUTE, OTHER))
        await a.login(key)
        await b.login(key)
        rid = router.login_result.node_id
        control_plane.admin("POST", f"/nodes/{rid}/routes/approve", {"prefixes": [ROUTE, OTHER]})
        # Online (streaming), so the election makes it primary over earlier tests' routers of ROUTE.
        router.watch(keepalive=1)
        for viewer in (a, b):
            viewer.watch(keepalive=1)
            await viewer.watcher.wait_for(
                lambda nm: (p := nm.peer(rid)) is not None and ROUTE in p.allowed_ips, timeout=10
            )
        yield router, a, b
    finally:
        for agent in (router, a, b):
            await agent.close()


async def test_unapproved_route_leaves_every_peers_allowed_ips(control_plane, routed):
    router, a, b = routed
    rid = router.login_result.node_id
    control_plane.admin("POST", f"/nodes/{rid}/routes/unapprove", {"prefixes": [ROUTE]})
    for viewer in (a, b):
        netmap = await viewer.watcher.wait_for(lambda nm: ROUTE not in nm.peer(rid).allowed_ips, timeout=10)
        assert set(netmap.peer(rid).allowed_ips) == {*router.login_result.addresses, OTHER}


async def test_unapproved_route_stays_advertised_but_not_approved(control_plane, routed):
    router, _a, _b = routed
    rid = router.login_result.node_id
    node = control_plane.admin("POST", f"/nodes/{rid}/routes/unapprove", {"prefixes": [ROUTE]})
    assert node["approved_routes"] == [OTHER]
    assert set(node["advertised_routes"]) == {ROUTE, OTHER}


async def test_unapproving_a_route_that_is_not_approved_changes_nothing(control_plane, routed):
    router, _a, _b = routed
    rid = router.login_result.node_id
    node = control_plane.admin("POST", f"/nodes/{rid}/routes/unapprove", {"prefixes": ["10.99.0.0/24"]})
    assert set(node["approved_routes"]) == {ROUTE, OTHER}


async def test_unapproving_a_malformed_prefix_is_refused(control_plane, routed):
    router, _a, _b = routed
    with pytest.raises(urllib.error.HTTPError) as err:
        control_plane.admin(
            "POST", f"/nodes/{router.login_result.node_id}/routes/unapprove", {"prefixes": ["10.0.0.1/24"]}
        )
    assert err.value.code == 400


def test_unapproving_on_an_unknown_node_is_404(control_plane):
    with pytest.raises(urllib.error.HTTPError) as err:
        control_plane.admin("POST", "/nodes/999999/routes/unapprove", {"prefixes": [ROUTE]})
    assert err.value.code == 404


async def test_cli_routes_unapprove_withdraws_by_node_name(control_plane, routed):
    router, a, _b = routed
    rid = router.login_result.node_id
    out = subprocess.run(
        [*WIREMESH, "admin", "--server", control_plane.url, "routes", "unapprove", router.hostname, OTHER],
        capture_output=True,
        text=True,
        env={**os.environ, "WIREMESH_ADMIN_KEY": control_plane.admin_key},
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"withdrew approval of {OTHER}" in out.stdout
    listed = json.loads(
        subprocess.run(
            [*WIREMESH, "admin", "--server", control_plane.url, "--json", "routes", "list"],
            capture_output=True,
            text=True,
            env={**os.environ, "WIREMESH_ADMIN_KEY": control_plane.admin_key},
            timeout=30,
        ).stdout
    )
    assert {(r["prefix"], r["approved"]) for r in listed if r["node_id"] == rid} == {
        (ROUTE, True),
        (OTHER, False),
    }
    await a.watcher.wait_for(lambda nm: OTHER not in nm.peer(rid).allowed_ips, timeout=10)
