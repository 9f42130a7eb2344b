"""Two coord replicas on one database and one NATS: changes fan out between them."""

from __future__ import annotations

import pytest
from control_helpers import make_agent


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from fixtures_services import FAST_COORD_ARGS, _planes

    with _planes(tmp_path_factory.mktemp("replicas")) as make:
        yield make(coord_args=FAST_COORD_ARGS, replicas=2)


@pytest.fixture
async def watcher_on_second(replicas):
    agent = make_agent(replicas.coords[1].url, "watcher")
    await agent.login(replicas.auth_key())
    agent.watch(keepalive=1)
    await agent.watcher.wait_for(lambda nm: True)
    try:
        yield agent
    finally:
        await agent.close()


def test_replicas_share_one_control_key(replicas):
    import httpx

    keys = {httpx.get(f"{c.url}/key").json()["public_key"] for c in replicas.coords}
    assert len(keys) == 1


async def test_node_registered_through_one_replica_reaches_stream_on_the_other(replicas, watcher_on_second):
    agent = make_agent(replicas.coords[0].url, "newcomer")
    try:
        result = await agent.login(replicas.auth_key())
        await watcher_on_second.watcher.wait_for(lambda nm: nm.peer(result.node_id) is not None, timeout=5)
    finally:
        await agent.close()


async def test_admin_rename_through_one_replica_reaches_stream_on_the_other(replicas, watcher_on_second):
    agent = make_agent(replicas.coords[0].url, "before")
    try:
        result = await agent.login(replicas.auth_key())
        await watcher_on_second.watcher.wait_for(lambda nm: nm.peer(result.node_id) is not None, timeout=5)
        replicas.admin("POST", f"/nodes/{result.node_id}/rename", {"name": "after"}, coord=0)
        await watcher_on_second.watcher.wait_for(
            lambda nm: (p := nm.peer(result.node_id)) is not None and p.name == "after", timeout=5
        )
    finally:
        await agent.close()


async def test_delete_through_one_replica_drops_peer_on_the_other(replicas, watcher_on_second):
    agent = make_agent(replicas.coords[0].url, "doomed")
    try:
        result = await agent.login(replicas.auth_key())
        await watcher_on_second.watcher.wait_for(lambda nm: nm.peer(result.node_id) is not None, timeout=5)
        replicas.admin("DELETE", f"/nodes/{result.node_id}", coord=0)
        await watcher_on_second.watcher.wait_for(lambda nm: nm.peer(result.node_id) is None, timeout=5)
    finally:
        await agent.close()


async def test_endpoint_update_via_one_replica_reaches_stream_on_the_other(replicas, watcher_on_second):
    agent = make_agent(replicas.coords[0].url, "mover")
    try:
        result = await agent.login(replicas.auth_key())
        await agent.client.update(agent.node_key, endpoints=("198.51.100.9:41641",))
        await watcher_on_second.watcher.wait_for(
            lambda nm: (p := nm.peer(result.node_id)) is not None and p.endpoints == ("198.51.100.9:41641",),
            timeout=5,
        )
    finally:
        await agent.close()


def test_login_replayed_to_the_other_replica_is_refused(replicas):
    import time

    import httpx
    from test_control_bad_input import login_call, post, snapshot

    def shared(coord: int) -> float:
        text = httpx.get(f"{replicas.coords[coord].url}/metrics").text
        line = next(x for x in text.splitlines() if x.startswith("wiremesh_coord_handshakes_shared_total"))
        return float(line.split()[1])

    call = login_call(replicas, replicas.auth_key())
    seen_before = shared(1)
    assert post(replicas, "/machine/login", call.request).status_code == 200  # through coord-0
    deadline = time.monotonic() + 5
    while shared(1) <= seen_before:  # coord-1 has heard of the handshake
        assert time.monotonic() < deadline
        time.sleep(0.02)
    before = snapshot(replicas)
    replay = httpx.post(f"{replicas.coords[1].url}/machine/login", content=call.request)
    assert replay.status_code == 403 and "replayed" in replay.json()["detail"]
    assert snapshot(replicas) == before
