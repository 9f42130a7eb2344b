"""A replayed agent request is refused by every coord replica, exactly.

Each agent request is its own Noise IK handshake. The replicas record every accepted
handshake's ephemeral key in their shared database under a uniqueness constraint before
acting on it, so the same sealed request sent to two replicas at once is accepted by one
and refused (403 replayed) by the other, whether or not NATS announced it in time.
The same tests run on a SQLite file and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from control_helpers import make_agent
from fixtures_services import FAST_COORD_ARGS, _planes
from test_control_bad_input import login_call, snapshot

from wiremesh.core import crypto
from wiremesh.core.control import messages as cm
from wiremesh.core.control.channel import FRESHNESS_WINDOW, ClientCall, FrameReader

ROUNDS = 25  # concurrent pairs per test: the old race (NATS vs the second request) lost nearly every time
MUTE = 2  # the replica started with --no-handshake-sharing: it never hears NATS announcements


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def replicas(request, tmp_path_factory):
    database_url = None
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_server").create_database()
    with _planes(tmp_path_factory.mktemp(f"replay-{request.param}")) as make:
        plane = make(database_url=database_url, coord_args=FAST_COORD_ARGS, replicas=2)
        mute = plane.add_coord(["--no-handshake-sharing"])
        mute.start()
        yield plane


def counts(plane) -> tuple[int, int]:
    """(nodes, uses of every auth key): what an accepted login changes."""
    nodes, keys = snapshot(plane)
    return len(nodes), sum(k["used_count"] for k in keys)


def handshake_rows(plane) -> int:
    from sqlalchemy import func, select

    from wiremesh.coord import store
    from wiremesh.shell import service

    engine = service.make_engine(plane.coord_db)
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(store.HandshakeRow)).scalar_one())
    finally:
        engine.dispose()


async def test_same_login_sent_to_two_replicas_at_once_is_accepted_by_exactly_one(replicas):
    key = replicas.auth_key(reusable=True)
    nodes0, uses0 = counts(replicas)
    urls = [f"{replicas.coords[i].url}/machine/login" for i in (0, 1)]
    async with httpx.AsyncClient(timeout=30) as first, httpx.AsyncClient(timeout=30) as second:
        # Warm both connections, so the two copies of each request leave together.
        await asyncio.gather(
            first.get(f"{replicas.coords[0].url}/healthz"), second.get(f"{replicas.coords[1].url}/healthz")
        )
        outcomes = []
        for _ in range(ROUNDS):
            call = login_call(replicas, key)
            a, b = await asyncio.gather(
                first.post(urls[0], content=call.request), second.post(urls[1], content=call.request)
            )
            outcomes.append(sorted((a.status_code, b.status_code)))
            refused = a if a.status_code == 403 else b
            if outcomes[-1] == [200, 403]:
                assert "replayed" in refused.json()["detail"]
    assert outcomes == [[200, 403]] * ROUNDS
    assert counts(replicas) == (nodes0 + ROUNDS, uses0 + ROUNDS)


async def test_first_logins_of_a_new_user_on_two_replicas_at_once_both_succeed(replicas):
    # Two different machines, not a replay: both create the user's row at once on their replica.
    server = crypto.decode_key(httpx.get(f"{replicas.coords[0].url}/key").json()["public_key"])
    statuses = []
    async with httpx.AsyncClient(timeout=30) as first, httpx.AsyncClient(timeout=30) as second:
        for i in range(10):
            key = replicas.auth_key(user=f"newcomer{i}", reusable=True)
            calls = [login_call(replicas, key, server_public=server) for _ in (0, 1)]
            a, b = await asyncio.gather(
                first.post(f"{replicas.coords[0].url}/machine/login", content=calls[0].request),
                second.post(f"{replicas.coords[1].url}/machine/login", content=calls[1].request),
            )
            statuses.append((a.status_code, b.status_code))
    assert statuses == [(200, 200)] * 10


def test_login_replayed_to_a_replica_that_heard_no_announcement_is_refused(replicas):
    call = login_call(replicas, replicas.auth_key(reusable=True))
    accepted = httpx.post(f"{replicas.coords[0].url}/machine/login", content=call.request)
    assert accepted.status_code == 200
    before = snapshot(replicas)
    replay = httpx.post(f"{replicas.coords[MUTE].url}/machine/login", content=call.request)
    assert replay.status_code == 403 and "replayed" in replay.json()["detail"]
    assert snapshot(replicas) == before


async def test_netmap_request_replayed_to_a_replica_that_heard_no_announcement_is_refused(replicas):
    machine_key = crypto.generate_private_key()
    agent = make_agent(replicas.coords[0].url, "streamer", machine_key=machine_key)
    try:
        await agent.login(replicas.auth_key())
        server = crypto.decode_key(httpx.get(f"{replicas.coords[0].url}/key").json()["public_key"])
        request = cm.encode(cm.MapRequest(node_key=agent.node_key, keepalive=30))
        call = ClientCall(machine_key, server, request, time.time())
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream(
                "POST", f"{replicas.coords[0].url}/machine/map", content=call.request
            ) as r:
                assert r.status_code == 200
                reader = FrameReader()
                async for chunk in r.aiter_bytes():
                    if reader.feed(chunk):
                        break  # the stream opened: the handshake was accepted
            replay = await http.post(f"{replicas.coords[MUTE].url}/machine/map", content=call.request)
        assert replay.status_code == 403 and "replayed" in replay.json()["detail"]
    finally:
        await agent.close()


def test_every_accepted_handshake_is_recorded_in_the_shared_database(replicas):
    before = handshake_rows(replicas)
    call = login_call(replicas, replicas.auth_key(reusable=True))
    assert httpx.post(f"{replicas.coords[1].url}/machine/login", content=call.request).status_code == 200
    assert handshake_rows(replicas) == before + 1


def test_handshake_row_is_kept_past_the_freshness_window_with_a_margin_for_clock_skew(replicas):
    from sqlalchemy import select

    from wiremesh.coord import store
    from wiremesh.coord.core import HANDSHAKE_CLOCK_MARGIN
    from wiremesh.shell import service

    sent_at = time.time()
    call = login_call(replicas, replicas.auth_key(reusable=True), now=sent_at)
    assert httpx.post(f"{replicas.coords[0].url}/machine/login", content=call.request).status_code == 200
    engine = service.make_engine(replicas.coord_db)
    try:
        with engine.connect() as connection:
            expires_at = connection.execute(
                select(store.HandshakeRow.expires_at).where(store.HandshakeRow.ephemeral == call.request[:32])
            ).scalar_one()
    finally:
        engine.dispose()
    # A replay is refused as stale once the timestamp is FRESHNESS_WINDOW old on a replica's clock;
    # until then (plus replicas' clock disagreement) the row must be there to refuse it.
    assert expires_at == pytest.approx(sent_at + FRESHNESS_WINDOW + HANDSHAKE_CLOCK_MARGIN, abs=1e-3)


def test_replicas_delete_handshake_rows_once_their_requests_are_stale(replicas):
    from wiremesh.coord import store
    from wiremesh.shell import service

    now = time.time()
    engine = service.make_engine(replicas.coord_db)
    try:
        with engine.begin() as connection:
            sessionless = store.HandshakeRow.__table__
            connection.execute(
                sessionless.insert(),
                [
                    {"ephemeral": b"\x01" * 32, "expires_at": now - 1},  # stale everywhere by now
                    {"ephemeral": b"\x02" * 32, "expires_at": now + FRESHNESS_WINDOW},
                ],
            )

        def remaining() -> set[bytes]:
            with engine.connect() as connection:
                rows = connection.execute(
                    sessionless.select().where(sessionless.c.ephemeral.in_([b"\x01" * 32, b"\x02" * 32]))
                )
                return {bytes(row.ephemeral) for row in rows}

        deadline = time.monotonic() + 15  # heartbeat interval is 1 s in FAST_COORD_ARGS
        while b"\x01" * 32 in remaining():
            assert time.monotonic() < deadline, "no replica deleted the expired handshake row"
            time.sleep(0.1)
        assert remaining() == {b"\x02" * 32}
    finally:
        engine.dispose()
