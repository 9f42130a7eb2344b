"""What a stranger's request may cost coord: no database write before its machine key is known
or a valid auth key is presented, a request budget per source address, and at most a couple
of netmap streams per node. Against real NATS, keys and coord processes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request

import httpx
import pytest
from control_helpers import make_agent
from sqlalchemy import MetaData, func, select

from wiremesh.agent.control import ControlRefused
from wiremesh.core import crypto
from wiremesh.core.control import messages as cm
from wiremesh.core.control.channel import ClientCall
from wiremesh.shell import service

pytestmark = pytest.mark.timeout(180)


def row_counts(database_url: str) -> dict[str, int]:
    """Rows in every table of a database: what any write would change."""
    engine = service.make_engine(database_url)
    try:
        meta = MetaData()
        meta.reflect(engine)
        with engine.connect() as connection:
            return {
                name: int(connection.execute(select(func.count()).select_from(table)).scalar_one())
                for name, table in meta.tables.items()
            }
    finally:
        engine.dispose()


def sealed(plane, payload: object) -> bytes:
    """One request from a machine coord has never seen, sealed to coord's real key."""
    server = crypto.decode_key(httpx.get(f"{plane.url}/key").json()["public_key"])
    import time

    return ClientCall(crypto.generate_private_key(), server, cm.encode(payload), time.time()).request


def stranger_requests(plane) -> list[tuple[str, bytes]]:
    node = crypto.encode_key(crypto.public_key(crypto.generate_private_key()))
    disco = crypto.encode_key(crypto.public_key(crypto.generate_private_key()))
    login = cm.LoginRequest(node_key=node, disco_key=disco, hostname="stranger")
    with_bad_key = cm.LoginRequest(
        node_key=node, disco_key=disco, hostname="stranger", auth_key="wmauth-0123456789ab-" + "x" * 32
    )
    return [
        *(("/machine/login", sealed(plane, login)) for _ in range(10)),
        *(("/machine/login", sealed(plane, with_bad_key)) for _ in range(10)),
        *(
            ("/machine/update", sealed(plane, cm.UpdateRequest(node_key=node, hostname="x")))
            for _ in range(10)
        ),
        *(("/machine/logout", sealed(plane, cm.LogoutRequest(node_key=node))) for _ in range(10)),
        *(("/machine/map", sealed(plane, cm.MapRequest(node_key=node))) for _ in range(10)),
    ]


def test_requests_from_unknown_machines_write_nothing(control_plane_factory):
    plane = control_plane_factory()
    coord_before, keys_before = row_counts(plane.coord_db), row_counts(plane.keys_db)
    statuses = [
        httpx.post(f"{plane.url}{path}", content=body).status_code for path, body in stranger_requests(plane)
    ]
    assert set(statuses) == {401}
    assert row_counts(plane.coord_db) == coord_before  # no replay-guard row, no user, no node
    assert row_counts(plane.keys_db) == keys_before


async def test_a_login_with_a_valid_auth_key_is_claimed_once_and_replays_are_refused(control_plane_factory):
    plane = control_plane_factory()
    key = plane.auth_key(reusable=True)
    node = crypto.encode_key(crypto.public_key(crypto.generate_private_key()))
    disco = crypto.encode_key(crypto.public_key(crypto.generate_private_key()))
    body = sealed(plane, cm.LoginRequest(node_key=node, disco_key=disco, hostname="newcomer", auth_key=key))
    assert httpx.post(f"{plane.url}/machine/login", content=body).status_code == 200
    replay = httpx.post(f"{plane.url}/machine/login", content=body)
    assert replay.status_code == 403 and "replayed" in replay.json()["detail"]
    used = [k["used_count"] for k in plane.admin("GET", "/authkeys")]
    assert used == [1]  # the replay did not count a use of the key


def test_agent_requests_over_the_per_source_budget_get_429(control_plane_factory):
    plane = control_plane_factory(coord_args=["--agent-rate-limit", "0.5", "--agent-rate-burst", "5"])
    statuses = [httpx.post(f"{plane.url}/machine/login", content=b"x" * 200).status_code for _ in range(8)]
    assert statuses[:5] == [403] * 5  # not a handshake: refused, but it cost coord a decrypt attempt
    assert statuses[5:] == [429] * 3
    response = httpx.post(f"{plane.url}/machine/update", content=b"x" * 200)
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert (
        httpx.get(f"{plane.url}/healthz").status_code == 200
    )  # probes and the admin API are not agent calls


def coord_streams(plane) -> float:
    with urllib.request.urlopen(f"{plane.url}/metrics", timeout=5) as r:
        match = re.search(r"^wiremesh_coord_streams (\S+)$", r.read().decode(), re.M)
    assert match is not None
    return float(match.group(1))


async def test_a_third_netmap_stream_of_a_node_closes_its_oldest(control_plane_factory):
    plane = control_plane_factory()
    agent = make_agent(plane.url, "streamer")
    await agent.login(plane.auth_key())
    first_frames: asyncio.Queue[object] = asyncio.Queue()  # the oldest stream's

    async def follow(queue: asyncio.Queue[object]) -> None:
        try:
            async for frame in agent.client.stream_frames(agent.node_key, keepalive=30):
                await queue.put(frame)
        except ControlRefused as exc:
            await queue.put(exc)

    queues: list[asyncio.Queue[object]] = [first_frames, asyncio.Queue(), asyncio.Queue()]
    tasks = []
    try:
        for queue in queues:
            tasks.append(asyncio.create_task(follow(queue)))
            first = await asyncio.wait_for(queue.get(), 30)
            assert isinstance(first, dict) and first["type"] == "netmap"
        ended = await asyncio.wait_for(first_frames.get(), 30)
        while isinstance(ended, dict):  # deltas sent before it was closed
            ended = await asyncio.wait_for(first_frames.get(), 30)
        assert isinstance(ended, ControlRefused) and ended.status == 409
        assert "superseded" in str(ended)
        assert coord_streams(plane) == 2
        assert all(not task.done() for task in tasks[1:])
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await agent.close()
