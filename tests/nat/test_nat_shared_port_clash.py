"""Two agents behind one office NAT, both on port 41641, with the clash forced (namespaces).

Regression (issue 4 follow-up, 1 in 5 `make demo` runs): office1 reached cgnat first, so towards
cgnat the office NAT gave office1 public port 41641 and office2 a random one, while office2 held
41641 towards the STUN servers (what it publishes). cgnat's pings to that address reached
office1 and the pair stayed on the relay for good. Here the clash is forced before the agents
start: office1 sends one datagram from 41641 to cgnat's public 41641, office2 one to each STUN
server, and the unreplied conntrack entries (30 s) fix who holds which port.
"""

from __future__ import annotations

import io
import pathlib

from natlab import send_from_port

from wiremesh.lab import Lab, meshdemo
from wiremesh.lab.meshdemo import DOUBLE, PUBLIC, SAME_NAT, AgentSpec, MeshDemo, Schedule

AGENTS = (
    AgentSpec("pub", PUBLIC),
    AgentSpec("office1", SAME_NAT),
    AgentSpec("office2", SAME_NAT),
    AgentSpec("cgnat", DOUBLE),
)


def test_agent_whose_port_its_office_neighbour_holds_towards_a_peer_still_goes_direct(
    tmp_path: pathlib.Path,
) -> None:
    with Lab() as lab:
        demo = MeshDemo(
            lab,
            tmp_path,
            AGENTS,
            Schedule(reach_timeout=20.0, direct_timeout=20.0, iperf_seconds=0),
            io.StringIO(),
        )
        try:
            demo.build()
            demo.start_services()
            office1, office2, cgnat = (demo.agents[n] for n in ("office1", "office2", "cgnat"))
            port = meshdemo.AGENT_PORT
            send_from_port(lab, office1.host, port, (cgnat.host.public_address, port))
            for relay in demo.relays:
                send_from_port(lab, office2.host, port, (relay.address, meshdemo.STUN_PORT))
            demo.start_agents()
            results = demo.probe()
        finally:
            demo.stop_watching()
        pair = next(r for r in results if {r.a, r.b} == {"office2", "cgnat"})
        assert pair.path == "direct", pair
