"""An agent on a host with IPv6 disabled runs IPv4-only: one clear warning, no retry loop."""

from __future__ import annotations

import time

import pytest
from mesh_kit import mesh_lab, pings

pytestmark = pytest.mark.netns


def test_an_agent_without_ipv6_runs_ipv4_only_with_one_warning():
    with mesh_lab() as m:
        lab = m.lab
        v4only = lab.host("v4")
        for scope in ("all", "default"):
            lab.run(v4only, ["sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1"])
        a = m.agent("v4", v4only, m.auth_key())
        b = m.agent("b", lab.host("b"), m.auth_key())
        assert pings(lab, v4only, b.address())
        assert pings(lab, b.node, a.address())
        time.sleep(3)  # several of the agent's 1 s ticks: a failed apply would have been retried
        status = a.status()
        assert status["error"] == ""
        log = a.log_text()
        assert "apply_failed" not in log and "addresses_failed" not in log, log[-3000:]
        assert log.count("ipv6_unavailable") == 1, log[-3000:]
