"""Two agents behind one office NAT, both on port 41641, and a peer behind a symmetric NAT
(namespaces), with the clash forced.

Regression (issue 4 follow-up; `make demo` left office1 <-> sym relayed in about 1 of 5 runs).
Linux masquerade gives a LAN host's new flow the public port of that host's newest mapping when
the resulting tuple is free, and otherwise keeps its source port or picks a random one. So an
office host that lost the race for 41641 towards one destination gets a random port there, and
from then on its new destinations see that random port, while the STUN servers, where it won,
still report 41641: what it publishes is not where a new peer sees it. A symmetric-NAT peer's
pings (plain, or from its birthday probe sockets) then go to the published port, where the
office NAT has nobody for them, and the office host's own pings leave from a port the peer's
NAT never opened: the pair stayed on the relay for good.

Forced here before the agents start, with unanswered datagrams whose conntrack entries live
30 s: office1 takes 41641 towards a silent lab address, office2 takes 41641 towards both STUN
servers, then office2 sends to the silent address too and gets a random port there, its newest
mapping, which its flows to sym then reuse.
"""

from __future__ import annotations

import io
import pathlib

from natlab import send_from_port

from wiremesh.lab import Lab, meshdemo
from wiremesh.lab.meshdemo import EDM, PUBLIC, SAME_NAT, AgentSpec, MeshDemo, Schedule

AGENTS = (
    AgentSpec("pub", PUBLIC),
    AgentSpec("office1", SAME_NAT),
    AgentSpec("office2", SAME_NAT),
    AgentSpec("sym", EDM),
)
SILENT_PORT = 9  # discard: nothing listens there on the control host


def test_agent_whose_new_flows_leave_from_another_port_than_it_publishes_goes_direct_with_a_symmetric_nat_peer(
    tmp_path: pathlib.Path,
) -> None:
    with Lab() as lab:
        demo = MeshDemo(
            lab,
            tmp_path,
            AGENTS,
            Schedule(reach_timeout=8.0, direct_timeout=10.0, iperf_seconds=0),
            io.StringIO(),
        )
        try:
            demo.build()
            demo.start_services()
            office1, office2 = demo.agents["office1"].host, demo.agents["office2"].host
            port, silent = meshdemo.AGENT_PORT, (demo.control.address, SILENT_PORT)
            send_from_port(lab, office1, port, silent)
            for relay in demo.relays:
                send_from_port(lab, office2, port, (relay.address, meshdemo.STUN_PORT))
            send_from_port(lab, office2, port, silent)
            demo.start_agents()
            results = demo.probe()
        finally:
            demo.stop_watching()
        pair = next(r for r in results if {r.a, r.b} == {"office2", "sym"})
        assert pair.path == "direct", pair
