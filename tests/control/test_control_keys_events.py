"""The key registry's NATS contract that the relay relies on: added/removed events and the list
(heard as the relay hears them, with the relay's credential; malformed requests as coord's)."""

from __future__ import annotations

import asyncio

from control_helpers import make_agent

from wiremesh.core import bus


async def collect(nc, subject, sink):
    async def cb(msg):
        sink.append(bus.decode(bus.NodeKeyEvent, msg.data))

    await nc.subscribe(subject, cb=cb)


async def wait_for(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_login_publishes_node_key_added_and_lists_it(control_plane):
    nc = await control_plane.nats.connect("derp")
    added: list[bus.NodeKeyEvent] = []
    agent = make_agent(control_plane.url, "relayed")
    try:
        await collect(nc, bus.NODE_KEY_ADDED, added)
        result = await agent.login(control_plane.auth_key())
        await wait_for(lambda: any(e.node_key == agent.node_key for e in added))
        reply = await nc.request(bus.NODE_KEY_LIST, bus.encode(bus.NodeKeyListRequest()), timeout=5)
        listed = bus.decode(bus.NodeKeyList, reply.data)
        assert any(k.node_key == agent.node_key and k.node_id == result.node_id for k in listed.keys)
    finally:
        await agent.close()
        await nc.close()


async def test_delete_publishes_node_key_removed_and_unlists_it(control_plane):
    nc = await control_plane.nats.connect("derp")
    removed: list[bus.NodeKeyEvent] = []
    agent = make_agent(control_plane.url, "gone")
    try:
        await collect(nc, bus.NODE_KEY_REMOVED, removed)
        result = await agent.login(control_plane.auth_key())
        control_plane.admin("DELETE", f"/nodes/{result.node_id}")
        await wait_for(lambda: any(e.node_key == agent.node_key for e in removed))
        reply = await nc.request(bus.NODE_KEY_LIST, bus.encode(bus.NodeKeyListRequest()), timeout=5)
        assert all(k.node_key != agent.node_key for k in bus.decode(bus.NodeKeyList, reply.data).keys)
    finally:
        await agent.close()
        await nc.close()


async def test_rotation_removes_old_key_with_reason_rotated(control_plane):
    nc = await control_plane.nats.connect("derp")
    removed: list[bus.NodeKeyEvent] = []
    agent = make_agent(control_plane.url, "rot")
    try:
        await collect(nc, bus.NODE_KEY_REMOVED, removed)
        await agent.login(control_plane.auth_key())
        old = agent.node_key
        agent.rotate_node_key()
        await agent.login()
        await wait_for(lambda: any(e.node_key == old and e.reason == "rotated" for e in removed))
    finally:
        await agent.close()
        await nc.close()


async def test_malformed_request_to_keys_gets_error_reply(control_plane):
    nc = await control_plane.nats.connect("coord")
    try:
        reply = await nc.request(bus.AUTH_KEY_CONSUME, b"{not json", timeout=5)
        assert "malformed" in bus.decode(bus.AuthKeyGrant, reply.data).error
    finally:
        await nc.close()
