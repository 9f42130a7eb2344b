"""Restarting coord or NATS: agents reconnect and resync; nodes keep their identity and addresses."""

from __future__ import annotations

from control_helpers import make_agent
from fixtures_services import FAST_COORD_ARGS


async def test_coord_restart_stream_resyncs_and_node_keeps_identity(control_plane_factory):
    plane = control_plane_factory(coord_args=FAST_COORD_ARGS)
    key = plane.auth_key(reusable=True)
    a, b = make_agent(plane.url, "a"), make_agent(plane.url, "b")
    try:
        ra, rb = await a.login(key), await b.login(key)
        a.watch(keepalive=1)
        await a.watcher.wait_for(lambda nm: nm.peer(rb.node_id) is not None)
        resyncs = a.watcher.updates
        plane.coord.restart()
        # A change made after the restart reaches the reconnected stream.
        plane.admin("POST", f"/nodes/{rb.node_id}/rename", {"name": "b-renamed"})
        netmap = await a.watcher.wait_for(
            lambda nm: (p := nm.peer(rb.node_id)) is not None and p.name == "b-renamed", timeout=15
        )
        assert a.watcher.updates > resyncs
        assert netmap.self_node.id == ra.node_id and netmap.self_node.addresses == ra.addresses
        again = await a.login()
        assert (again.node_id, again.addresses) == (ra.node_id, ra.addresses)
    finally:
        await a.close()
        await b.close()


async def test_nats_restart_keeps_streams_and_logins_work_again(control_plane_factory):
    plane = control_plane_factory(coord_args=FAST_COORD_ARGS)
    key = plane.auth_key(reusable=True)
    a = make_agent(plane.url, "a")
    try:
        ra = await a.login(key)
        a.watch(keepalive=1)
        await a.watcher.wait_for(lambda nm: nm.self_node.id == ra.node_id)
        plane.nats.restart()
        # Logins need the key registry over NATS: they work again once both reconnect.
        c = make_agent(plane.url, "c")
        try:
            import asyncio
            import time

            deadline = time.monotonic() + 20
            while True:
                try:
                    rc = await c.login(key)
                    break
                except Exception:
                    assert time.monotonic() < deadline, "login did not recover after the NATS restart"
                    await asyncio.sleep(0.2)
            await a.watcher.wait_for(lambda nm: nm.peer(rc.node_id) is not None, timeout=10)
        finally:
            await c.close()
        again = await a.login()
        assert (again.node_id, again.addresses) == (ra.node_id, ra.addresses)
    finally:
        await a.close()
