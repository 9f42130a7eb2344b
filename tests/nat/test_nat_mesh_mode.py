"""wiremeshd in mesh mode with coord serving a relay map (--derp-map): agents behind NATs find
each other through coord's netmap and magicsock, and go direct."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from natlab import NatWorld, wait_for

from wiremesh.agent.cli.local import call as local_call
from wiremesh.agent.state import StateDir
from wiremesh.core import crypto
from wiremesh.lab import Lab, NatKind

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mesh"))
from mesh_kit import RelayMapMeshLab, peer_endpoint, pings

pytestmark = [pytest.mark.netns]


def test_mesh_mode_agents_behind_nats_go_direct_using_coords_relay_map():
    with Lab() as lab:
        world = NatWorld(lab)
        derp_map = Path(lab.tmpdir) / "derp-map.json"
        derp_map.write_text(json.dumps(world.derp_map()))
        m = RelayMapMeshLab(lab, str(derp_map))
        hosts = {"a": lab.device("a", NatKind.EIM_APDF), "b": lab.device("b", NatKind.EIM_ADF)}
        for name in hosts:
            keys = StateDir(m.dir / f"state-{name}").load_or_create_keys()
            world.extra_keys.append(crypto.public_key(keys.node))
        for rid in world.regions:
            world.start_relay(rid)
        m.start_services()
        key = m.auth_key("--reusable")
        a = m.agent("a", hosts["a"], key, wait=False)
        b = m.agent("b", hosts["b"], key, wait=False)
        m.wait_running(a)
        m.wait_running(b)
        assert pings(lab, a.node, b.address(), timeout=30), a.log_text()[-3000:]
        direct = wait_for(
            lambda: (
                pings(lab, a.node, b.address(), timeout=2)
                and peer_endpoint(a, "b").startswith("198.18.")
                and peer_endpoint(b, "a").startswith("198.18.")
            ),
            30.0,
        )
        assert direct, (peer_endpoint(a, "b"), peer_endpoint(b, "a"), a.log_text()[-3000:])
        # magicsock, not a raw endpoint guess, chose that path: it answers netcheck and ping.
        code, report = local_call(a.socket_path, "POST", "netcheck")
        assert code == 200 and report["preferred_region"] in (1, 2), report
        code, answer = local_call(a.socket_path, "POST", "ping/b")
        assert code == 200 and answer["path"]["path"] == "direct", answer
