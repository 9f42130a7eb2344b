"""Service shell: metrics, health, and a clean SIGTERM with agents still streaming."""

from __future__ import annotations

import time

import httpx
from control_helpers import make_agent
from fixtures_services import FAST_COORD_ARGS


async def test_coord_metrics_count_logins_and_streams(control_plane):
    agent = make_agent(control_plane.url, "metered")
    try:
        await agent.login(control_plane.auth_key())
        agent.watch(keepalive=1)
        await agent.watcher.wait_for(lambda nm: True)
        text = httpx.get(f"{control_plane.url}/metrics").text
        assert 'wiremesh_coord_logins_total{outcome="ok"}' in text
        streams = [line for line in text.splitlines() if line.startswith("wiremesh_coord_streams ")]
        assert streams and float(streams[0].split()[1]) >= 1
    finally:
        await agent.close()


def test_keys_metrics_count_requests(control_plane):
    control_plane.auth_key()
    text = httpx.get(f"{control_plane.keys.url}/metrics").text
    assert 'wiremesh_keys_requests_total{outcome="ok",subject="wiremesh.keys.authkey.create"}' in text


def test_health_and_readiness_probes_answer(control_plane):
    for url in (control_plane.url, control_plane.keys.url):
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
        assert httpx.get(f"{url}/readyz").status_code == 200


async def test_sigterm_with_open_streams_exits_zero_promptly(control_plane_factory):
    plane = control_plane_factory(coord_args=FAST_COORD_ARGS)
    agent = make_agent(plane.url, "streaming")
    try:
        await agent.login(plane.auth_key())
        agent.watch(keepalive=5)
        await agent.watcher.wait_for(lambda nm: True)
        start = time.monotonic()
        assert plane.coord.stop() == 0
        # coord closed the streams itself: uvicorn did not have to cut them after its 5 s
        # graceful-shutdown timeout (a bound on the time alone failed on a busy machine).
        assert "timeout graceful shutdown exceeded" not in plane.coord.log_path.read_text()
        assert time.monotonic() - start < 60  # and nothing hangs
        assert agent.watcher.error is None  # told to retry, not to log in again
    finally:
        await agent.close()
