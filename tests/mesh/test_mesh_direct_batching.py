"""Mesh mode's direct path uses the Engine's batched sends (UDP_SEGMENT), as static mode does.

Two wiremeshd agents in mesh mode on public lab hosts, coord serving a relay map (so magicsock
hands WireGuard its own endpoint objects), one relay region for disco's CallMeMaybe. Once both
sides report a direct path, a bulk TCP transfer must leave the sender in UDP_SEGMENT batches
resolved from the magicsock endpoint (the agent's wiremesh_io_total counters).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from mesh_kit import MeshLab, RelayMapMeshLab, peer_endpoint, pings, wait_until

from wiremesh.agent.state import StateDir
from wiremesh.core import crypto
from wiremesh.lab import Lab
from wiremesh.lab.demo import metric_sum

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "nat"))
from natlab import NatWorld

pytestmark = [pytest.mark.netns]

TRANSFER = "16M"  # iperf3 -n: a fixed amount, so the test asserts volume, never speed


def io_counters(m: MeshLab, agent) -> dict[str, float]:
    text = m.scrape(agent)
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("wiremesh_io_total{"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return {
        op: metric_sum(samples, "wiremesh_io_total", op=op)
        for op in ("udp_gso_sends", "udp_gso_datagrams", "udp_gso_resolved_runs")
    }


def test_mesh_mode_direct_traffic_leaves_in_udp_segment_batches():
    with Lab() as lab:
        world = NatWorld(lab, regions=1)
        derp_map = Path(lab.tmpdir) / "derp-map.json"
        derp_map.write_text(json.dumps(world.derp_map()))
        m = RelayMapMeshLab(lab, str(derp_map))
        hosts = {"a": lab.host("a"), "b": lab.host("b")}
        for name in hosts:
            keys = StateDir(m.dir / f"state-{name}").load_or_create_keys()
            world.extra_keys.append(crypto.public_key(keys.node))
        world.start_relay(1)
        m.start_services()
        key = m.auth_key("--reusable")
        a = m.agent("a", hosts["a"], key, wait=False, metrics=True)
        b = m.agent("b", hosts["b"], key, wait=False, metrics=True)
        m.wait_running(a)
        m.wait_running(b)
        assert pings(lab, a.node, b.address(), timeout=30), a.log_text()[-3000:]

        def direct() -> bool:
            pings(lab, a.node, b.address(), timeout=2)
            return peer_endpoint(a, "b").startswith("198.18.") and peer_endpoint(b, "a").startswith("198.18.")

        wait_until(direct, 30, "a and b to go direct")
        before = io_counters(m, a)
        server = lab.popen(b.node, ["iperf3", "-s", "-1", "-B", b.address()])
        try:
            wait_until(
                lambda: ":5201 " in lab.run(b.node, ["ss", "-Hltn"], check=False).stdout, 10, "iperf3 -s"
            )
            sent = lab.run(
                a.node, ["iperf3", "-c", b.address(), "-n", TRANSFER, "-J"], check=False, timeout=60
            )
            assert sent.returncode == 0, sent.stdout[-2000:] + sent.stderr[-2000:]
        finally:
            lab.stop(server)
        after = io_counters(m, a)
        # Only a trusted direct path resolves, so these counters rise only on the direct path.
        assert after["udp_gso_resolved_runs"] > before["udp_gso_resolved_runs"]
        batched = after["udp_gso_datagrams"] - before["udp_gso_datagrams"]
        sends = after["udp_gso_sends"] - before["udp_gso_sends"]
        # 16 MiB at MTU 1280 is ~13,000 datagrams; a good share must have left in batches.
        assert batched >= 1000 and batched > 2 * sends, (before, after)
