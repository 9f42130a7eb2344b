"""Netmap streams: peers, endpoint updates, delete/expire, routes, renames, presence."""

from __future__ import annotations

import pytest
from control_helpers import make_agent

from wiremesh.agent.control import LoginRequired


@pytest.fixture
async def pair(control_plane):
    key = control_plane.auth_key(reusable=True)
    a, b = make_agent(control_plane.url, "alpha"), make_agent(control_plane.url, "beta")
    await a.login(key)
    await b.login(key)
    a.watch(keepalive=1)
    b.watch(keepalive=1)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_each_node_sees_the_other_with_keys_and_addresses(pair):
    a, b = pair
    netmap = await a.watcher.wait_for(lambda nm: nm.peer(b.login_result.node_id) is not None)
    peer = netmap.peer(b.login_result.node_id)
    assert peer.node_key == b.node_key and peer.disco_key == b.disco_key
    assert peer.addresses == b.login_result.addresses
    assert peer.allowed_ips == b.login_result.addresses
    assert netmap.self_node.addresses == a.login_result.addresses


async def test_peer_online_state_follows_its_stream(pair):
    a, b = pair
    b_id = b.login_result.node_id
    await a.watcher.wait_for(lambda nm: (p := nm.peer(b_id)) is not None and p.online)
    await b.watcher.stop()
    await a.watcher.wait_for(lambda nm: (p := nm.peer(b_id)) is not None and not p.online, timeout=5)


async def test_endpoint_update_reaches_peer(pair):
    a, b = pair
    await b.client.update(b.node_key, endpoints=("192.0.2.7:41641", "[2001:db8::7]:41641"))
    netmap = await a.watcher.wait_for(
        lambda nm: (p := nm.peer(b.login_result.node_id)) is not None and p.endpoints != (), timeout=5
    )
    assert netmap.peer(b.login_result.node_id).endpoints == ("192.0.2.7:41641", "[2001:db8::7]:41641")


async def test_deleted_node_is_dropped_by_peers_within_5s(control_plane, pair):
    a, b = pair
    b_id = b.login_result.node_id
    await a.watcher.wait_for(lambda nm: nm.peer(b_id) is not None)
    control_plane.admin("DELETE", f"/nodes/{b_id}")
    await a.watcher.wait_for(lambda nm: nm.peer(b_id) is None, timeout=5)


async def test_deleted_node_stream_ends_with_login_required(control_plane, pair):
    _a, b = pair
    await b.watcher.wait_for(lambda nm: True)
    control_plane.admin("DELETE", f"/nodes/{b.login_result.node_id}")
    with pytest.raises(LoginRequired, match="deleted"):
        await b.watcher.wait_for(lambda nm: False, timeout=5)


async def test_expired_node_is_dropped_by_peers_within_5s(control_plane, pair):
    a, b = pair
    b_id = b.login_result.node_id
    await a.watcher.wait_for(lambda nm: nm.peer(b_id) is not None)
    control_plane.admin("POST", f"/nodes/{b_id}/expire")
    await a.watcher.wait_for(lambda nm: nm.peer(b_id) is None, timeout=5)


async def test_expired_node_needs_an_auth_key_to_log_in_again(control_plane, pair):
    _a, b = pair
    first = b.login_result
    control_plane.admin("POST", f"/nodes/{first.node_id}/expire")
    with pytest.raises(LoginRequired, match="expired"):
        await b.login()
    key = control_plane.auth_key()
    with pytest.raises(LoginRequired, match="new node key"):
        await b.login(key)
    b.rotate_node_key()
    again = await b.login(key)
    assert (again.node_id, again.addresses) == (first.node_id, first.addresses)


async def test_route_reaches_peer_allowed_ips_only_after_approval(control_plane, pair):
    a, b = pair
    b_id = b.login_result.node_id
    await b.client.update(b.node_key, advertised_routes=("10.77.0.0/24",))
    await a.watcher.wait_for(
        lambda nm: (p := nm.peer(b_id)) is not None and p.advertised_routes == ("10.77.0.0/24",)
    )
    assert "10.77.0.0/24" not in a.watcher.netmap.peer(b_id).allowed_ips
    control_plane.admin("POST", f"/nodes/{b_id}/routes/approve", {"prefixes": ["10.77.0.0/24"]})
    netmap = await a.watcher.wait_for(lambda nm: "10.77.0.0/24" in nm.peer(b_id).allowed_ips, timeout=5)
    assert set(netmap.peer(b_id).allowed_ips) == {*b.login_result.addresses, "10.77.0.0/24"}


async def test_approving_a_route_the_node_does_not_advertise_is_refused(control_plane, pair):
    import urllib.error

    _a, b = pair
    with pytest.raises(urllib.error.HTTPError) as err:
        control_plane.admin(
            "POST", f"/nodes/{b.login_result.node_id}/routes/approve", {"prefixes": ["10.9.0.0/16"]}
        )
    assert err.value.code == 400


async def test_rename_reaches_peer_and_self(control_plane, pair):
    a, b = pair
    b_id = b.login_result.node_id
    control_plane.admin("POST", f"/nodes/{b_id}/rename", {"name": "renamed"})
    await a.watcher.wait_for(lambda nm: (p := nm.peer(b_id)) is not None and p.name == "renamed", timeout=5)
    await b.watcher.wait_for(lambda nm: nm.self_node.name == "renamed", timeout=5)


async def test_new_node_appears_in_existing_streams(control_plane, pair):
    a, _b = pair
    c = make_agent(control_plane.url, "gamma")
    try:
        result = await c.login(control_plane.auth_key())
        await a.watcher.wait_for(lambda nm: nm.peer(result.node_id) is not None, timeout=5)
    finally:
        await c.close()


async def test_hostname_clash_gets_a_unique_name(control_plane, pair):
    _a, _b = pair
    c = make_agent(control_plane.url, "alpha")
    try:
        result = await c.login(control_plane.auth_key())
        assert result.name.startswith("alpha-") and result.name != _b.login_result.name
    finally:
        await c.close()
