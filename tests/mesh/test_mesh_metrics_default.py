"""wiremeshd serves /metrics on loopback by default, and only there: the metrics name peers,
keys and endpoints, so other hosts (and mesh peers) must not read them unless asked for."""

from __future__ import annotations

import pytest
from mesh_kit import METRICS_PORT, mesh_lab

pytestmark = [pytest.mark.netns, pytest.mark.timeout(180)]


def test_metrics_are_served_on_loopback_only_by_default():
    with mesh_lab() as mesh:
        host = mesh.lab.host("a")
        agent = mesh.agent("a", host, mesh.auth_key())  # no --metrics-listen
        assert "wiremesh_backend_state" in mesh.scrape(agent)  # 127.0.0.1 inside its namespace
        with pytest.raises(OSError):  # refused on the host's own address
            mesh.http(host.address, METRICS_PORT, "GET", "/metrics", node=host)
        assert "metrics_listening address=127.0.0.1:9586" in agent.log_text()
