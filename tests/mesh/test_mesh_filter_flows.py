"""The agent's use of the packet filter: which outbound packets open a flow for replies.

A policy change must be able to cut a TCP connection a peer opened: our replies (SYN-ACK,
ACKs, data) therefore must not record it as a flow of ours; only our own SYN does.
"""

from __future__ import annotations

import ipaddress
import struct

from wiremesh.core.packetfilter import Filter
from wiremesh.core.policy.model import FilterRule

ME, PEER = "100.64.0.1", "100.64.0.2"
SYN, ACK = 0x02, 0x10


def tcp(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(segment),
        0,
        0,
        64,
        6,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + segment


def ssh_from_peer() -> FilterRule:
    return FilterRule(src=(f"{PEER}/32",), dst=(f"{ME}/32",), protos=(6,), ports=((22, 22),))


def test_a_connection_the_peer_opened_is_cut_when_the_rule_goes():
    f = Filter([ssh_from_peer()])
    assert f.check_inbound(tcp(PEER, ME, 40000, 22, SYN), 0.0)
    f.note_outbound(tcp(ME, PEER, 22, 40000, SYN | ACK), 0.0)
    f.note_outbound(tcp(ME, PEER, 22, 40000, ACK), 0.1)
    assert f.check_inbound(tcp(PEER, ME, 40000, 22, ACK), 0.2)
    f.set_rules([], allow_all=False)
    assert not f.check_inbound(tcp(PEER, ME, 40000, 22, ACK), 0.3)


def test_replies_to_a_connection_we_opened_pass_without_a_rule():
    f = Filter([ssh_from_peer()])
    f.note_outbound(tcp(ME, PEER, 50000, 80, SYN), 0.0)
    assert f.check_inbound(tcp(PEER, ME, 80, 50000, SYN | ACK), 0.1)
    f.note_outbound(tcp(ME, PEER, 50000, 80, ACK), 0.2)
    assert f.check_inbound(tcp(PEER, ME, 80, 50000, ACK), 0.3)


class QuietEngine:
    """Only what MeshAgent configures on an Engine; no interface (the filter is what is tested)."""

    listen_port = 0
    packet_filter = None

    def set_peers(self, peers: object) -> None:
        pass

    def set_addresses(self, addresses: object) -> None:
        pass

    def set_routes(self, prefixes: object) -> None:
        pass

    def set_filter_rules(self, rules: object, allow_all: bool) -> None:
        self.packet_filter.set_rules(rules, allow_all=allow_all)  # type: ignore[attr-defined]


def test_the_agent_filters_every_packet_from_the_start_so_the_first_policy_cuts_older_flows(tmp_path):
    from wiremesh.agent.mesh.config import MeshConfig
    from wiremesh.agent.mesh.controller import MeshAgent, Plan
    from wiremesh.agent.state import StateDir

    state = StateDir(str(tmp_path))
    engine = QuietEngine()
    agent = MeshAgent(
        MeshConfig(
            login_server="http://127.0.0.1:9",
            state_dir=str(tmp_path),
            tun="wmtest",
            insecure_learn_coord_key=True,
        ),
        state,
        state.load_or_create_keys(),
        engine,
    )
    try:
        agent._apply_plan(Plan(packet_filter=()))  # a netmap without a policy: allow all
        flt = engine.packet_filter
        assert flt is not None
        # The peer opens a connection while no policy is set; we answer it.
        assert flt.filter_inbound([tcp(PEER, ME, 40000, 80, SYN)], 0.0)
        flt.note_outbound_batch([tcp(ME, PEER, 80, 40000, SYN | ACK)], 0.1)
        agent._apply_plan(Plan(packet_filter=(ssh_from_peer().to_dict(),)))
        flt.note_outbound_batch([tcp(ME, PEER, 80, 40000, ACK)], 0.2)
        assert flt.filter_inbound([tcp(PEER, ME, 40000, 80, ACK)], 0.3) == []
    finally:
        agent._executor.shutdown(wait=True)
