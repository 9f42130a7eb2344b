"""Login with pre-auth keys through the real channel against real NATS, keys and coord."""

from __future__ import annotations

import asyncio
import time
import urllib.error

import pytest
from control_helpers import make_agent

from wiremesh.agent.control import LoginRequired


async def test_login_with_one_off_key_assigns_addresses_in_tailnet_ranges(control_plane):
    agent = make_agent(control_plane.url, "laptop")
    try:
        result = await agent.login(control_plane.auth_key())
        v4, v6 = result.addresses
        assert v4.startswith("100.") and v4.endswith("/32")
        assert v6.startswith("fd7a:115c:a1e0:") and v6.endswith("/128")
        assert result.user == "alice" and result.name.startswith("laptop")
    finally:
        await agent.close()


async def test_one_off_key_used_twice_is_refused(control_plane):
    key = control_plane.auth_key()
    first, second = make_agent(control_plane.url, "a"), make_agent(control_plane.url, "b")
    try:
        await first.login(key)
        with pytest.raises(LoginRequired, match="already used"):
            await second.login(key)
    finally:
        await first.close()
        await second.close()


async def test_reusable_key_registers_several_machines(control_plane):
    key = control_plane.auth_key(reusable=True)
    agents = [make_agent(control_plane.url, f"n{i}") for i in range(3)]
    try:
        ids = {(await a.login(key)).node_id for a in agents}
        assert len(ids) == 3
    finally:
        for a in agents:
            await a.close()


async def test_expired_key_is_refused(control_plane):
    key = control_plane.auth_key(expiration=1)
    await asyncio.sleep(1.2)
    agent = make_agent(control_plane.url, "late")
    try:
        with pytest.raises(LoginRequired, match="expired"):
            await agent.login(key)
    finally:
        await agent.close()


async def test_admin_expired_key_is_refused(control_plane):
    created = control_plane.admin("POST", "/authkeys", {"user": "bob", "reusable": True})
    control_plane.admin("POST", f"/authkeys/{created['id']}/expire")
    agent = make_agent(control_plane.url, "x")
    try:
        with pytest.raises(LoginRequired, match="expired"):
            await agent.login(created["key"])
    finally:
        await agent.close()


async def test_unknown_key_is_refused(control_plane):
    agent = make_agent(control_plane.url, "x")
    try:
        with pytest.raises(LoginRequired, match="unknown auth key"):
            await agent.login("wmauth-000000000000-" + "0" * 48)
    finally:
        await agent.close()


async def test_tagged_key_gives_tagged_node_without_key_expiry(control_plane):
    agent = make_agent(control_plane.url, "server")
    try:
        result = await agent.login(control_plane.auth_key(tags=["tag:web", "tag:db"]))
        assert result.tags == ("tag:web", "tag:db")
        assert result.key_expiry is None
    finally:
        await agent.close()


async def test_relogin_with_same_machine_key_keeps_node_and_addresses(control_plane):
    agent = make_agent(control_plane.url, "keeper")
    try:
        first = await agent.login(control_plane.auth_key())
        again = await agent.login()  # no auth key needed for a known machine
        assert (again.node_id, again.addresses) == (first.node_id, first.addresses)
    finally:
        await agent.close()


async def test_node_key_rotation_keeps_node_and_addresses(control_plane):
    agent = make_agent(control_plane.url, "rotator")
    try:
        first = await agent.login(control_plane.auth_key())
        agent.rotate_node_key()
        rotated = await agent.login()
        assert (rotated.node_id, rotated.addresses) == (first.node_id, first.addresses)
        node = control_plane.admin("GET", f"/nodes/{first.node_id}")
        assert node["node_key"] == agent.node_key
    finally:
        await agent.close()


async def test_unknown_machine_without_auth_key_is_refused(control_plane):
    agent = make_agent(control_plane.url, "nobody")
    try:
        with pytest.raises(LoginRequired, match="auth key is required"):
            await agent.login()
    finally:
        await agent.close()


async def test_ephemeral_node_is_removed_after_going_offline(control_plane):
    agent = make_agent(control_plane.url, "ephem")
    try:
        result = await agent.login(control_plane.auth_key(ephemeral=True))
        watcher = agent.watch(keepalive=1)
        await watcher.wait_for(lambda nm: nm.self_node.id == result.node_id)
    finally:
        await agent.close()  # the agent goes away: stream and connections closed
    deadline = time.monotonic() + 15
    while nodes := [n for n in control_plane.admin("GET", "/nodes") if n["id"] == result.node_id]:
        assert time.monotonic() < deadline, f"ephemeral node still registered: {nodes}"
        await asyncio.sleep(0.1)  # not time.sleep: the loop must run to actually close the socket


def test_wrong_admin_key_gets_401(control_plane):
    with pytest.raises(urllib.error.HTTPError) as err:
        control_plane.admin("GET", "/nodes", key="not-the-key")
    assert err.value.code == 401


async def test_auth_keys_carry_coords_key_fingerprint_and_one_from_another_coord_is_refused(control_plane):
    from wiremesh.core import crypto
    from wiremesh.core.control import coordkey

    key = control_plane.auth_key()
    registry_form, fingerprint = coordkey.split_auth_key(key)
    assert fingerprint is not None and registry_form.count("-") == 2
    agent = make_agent(control_plane.url, "pinned")
    try:
        assert coordkey.matches(await agent.client.fetch_server_key(), fingerprint)
        foreign = coordkey.with_fingerprint(registry_form, crypto.public_key(crypto.generate_private_key()))
        with pytest.raises(LoginRequired, match="issued by another coord"):
            await agent.login(foreign)
        await agent.login(registry_form)  # the registry's own form still works (pinned elsewhere)
    finally:
        await agent.close()


async def test_a_client_holding_another_coords_fingerprint_refuses_to_talk(control_plane):
    from wiremesh.agent.control import ControlClient, CoordKeyChanged
    from wiremesh.core import crypto
    from wiremesh.core.control import coordkey

    other = coordkey.fingerprint(crypto.public_key(crypto.generate_private_key()))
    client = ControlClient(control_plane.url, crypto.generate_private_key(), server_key_fingerprint=other)
    try:
        with pytest.raises(CoordKeyChanged, match="not the coord that issued the key"):
            await client.login("n" * 43 + "=", "d" * 43 + "=", "x", auth_key=control_plane.auth_key())
    finally:
        await client.aclose()


async def test_a_second_node_cannot_register_another_nodes_disco_key(control_plane):
    from wiremesh.agent.control import ControlRefused

    first, second = make_agent(control_plane.url, "owner"), make_agent(control_plane.url, "copycat")
    second.disco_key_private = first.disco_key_private
    try:
        await first.login(control_plane.auth_key())
        with pytest.raises(ControlRefused, match="disco key already in use") as refused:
            await second.login(control_plane.auth_key())
        assert refused.value.status == 409
        await first.login()  # the owner logs in again with its own disco key: still fine
    finally:
        await first.close()
        await second.close()
