"""keys and two coord replicas running against a real PostgreSQL (the Helm chart's setup)."""

from __future__ import annotations

from control_helpers import make_agent
from fixtures_services import FAST_COORD_ARGS


async def test_replicas_on_postgresql_register_stream_and_fan_out(control_plane_factory, postgres_url):
    plane = control_plane_factory(database_url=postgres_url, coord_args=FAST_COORD_ARGS, replicas=2)
    key = plane.auth_key(reusable=True)
    watcher = make_agent(plane.coords[1].url, "pg-watcher")
    newcomer = make_agent(plane.coords[0].url, "pg-newcomer")
    try:
        await watcher.login(key)
        watcher.watch(keepalive=1)
        result = await newcomer.login(key)
        await watcher.watcher.wait_for(lambda nm: nm.peer(result.node_id) is not None, timeout=10)
        plane.admin("DELETE", f"/nodes/{result.node_id}", coord=0)
        await watcher.watcher.wait_for(lambda nm: nm.peer(result.node_id) is None, timeout=5)
    finally:
        await watcher.close()
        await newcomer.close()
