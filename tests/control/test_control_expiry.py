"""Node-key expiry by time (keys' sweep -> NODE_KEY_REMOVED -> coord) and logout."""

from __future__ import annotations

import pytest
from control_helpers import make_agent
from fixtures_services import FAST_COORD_ARGS

from wiremesh.agent.control import LoginRequired


async def test_node_key_past_its_expiry_is_dropped_by_peers(control_plane_factory):
    plane = control_plane_factory(coord_args=[*FAST_COORD_ARGS, "--node-key-expiry", "3"])
    key = plane.auth_key(reusable=True)
    watcher, short = make_agent(plane.url, "watcher"), make_agent(plane.url, "short")
    try:
        await watcher.login(plane.auth_key(tags=["tag:server"]))  # tagged: never expires
        result = await short.login(key)
        assert result.key_expiry is not None
        watcher.watch(keepalive=1)
        await watcher.watcher.wait_for(lambda nm: nm.peer(result.node_id) is not None)
        await watcher.watcher.wait_for(lambda nm: nm.peer(result.node_id) is None, timeout=10)
        node = plane.admin("GET", f"/nodes/{result.node_id}")
        assert node["expired"] is True
    finally:
        await watcher.close()
        await short.close()


async def test_logout_expires_the_node(control_plane):
    agent = make_agent(control_plane.url, "leaver")
    try:
        result = await agent.login(control_plane.auth_key())
        await agent.client.logout(agent.node_key)
        assert control_plane.admin("GET", f"/nodes/{result.node_id}")["expired"] is True
        with pytest.raises(LoginRequired):
            await agent.login()
    finally:
        await agent.close()


async def test_logout_deletes_an_ephemeral_node(control_plane):
    agent = make_agent(control_plane.url, "tmp")
    try:
        result = await agent.login(control_plane.auth_key(ephemeral=True))
        await agent.client.logout(agent.node_key)
        assert all(n["id"] != result.node_id for n in control_plane.admin("GET", "/nodes"))
    finally:
        await agent.close()


async def test_update_with_wrong_node_key_is_refused(control_plane):
    agent = make_agent(control_plane.url, "imposter")
    try:
        await agent.login(control_plane.auth_key())
        other = make_agent(control_plane.url, "x")
        with pytest.raises(LoginRequired, match="does not match"):
            await agent.client.update(other.node_key, endpoints=("192.0.2.1:1",))
        await other.close()
    finally:
        await agent.close()
