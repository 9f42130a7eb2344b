"""Hole punching through lab NATs works the way magicsock needs it to (the LAB.md pitfall)."""

from __future__ import annotations

import pytest

from wiremesh.lab import Lab, NatKind
from wiremesh.lab.probe import observed_source, recv, udp_socket

pytestmark = pytest.mark.netns

PUNCHABLE = [
    (NatKind.EIM_APDF, NatKind.EIM_APDF),
    (NatKind.EIM_ADF, NatKind.EIM_APDF),
    (NatKind.EIM_ADF, NatKind.EIM_ADF),
    (NatKind.PORTMAP, NatKind.EIM_APDF),
]


@pytest.mark.parametrize(("kind_a", "kind_b"), PUNCHABLE, ids=lambda k: k.value)
def test_early_packet_does_not_move_the_peer_mapping(lab: Lab, kind_a: NatKind, kind_b: NatKind) -> None:
    stun = lab.host("stun")
    a, b = lab.device("a", kind_a), lab.device("b", kind_b)
    server = udp_socket(lab, stun, 3478)
    sa, sb = udp_socket(lab, a, 41641), udp_socket(lab, b, 41641)
    # Each side learns its mapping from a STUN-like server, as magicsock does.
    mapped_a = observed_source(sa, server, (stun.address, 3478))
    mapped_b = observed_source(sb, server, (stun.address, 3478))
    # a's first packet reaches b's NAT before b has sent anything to a: it must be dropped
    # without creating state that would move b's mapping...
    assert b.behind is not None
    before = lab.drops(b.behind)
    sa.sendto(b"early", mapped_b)
    lab.wait_drops(b.behind, before)
    # ...so b's punch goes out through the mapping b learnt, opens b's side and passes a's NAT.
    sb.sendto(b"punch-b", mapped_a)
    data, src = recv(sa)
    assert (data, src) == (b"punch-b", mapped_b)
    sa.sendto(b"punch-a", mapped_b)
    data, src = recv(sb)
    assert (data, src) == (b"punch-a", mapped_a)


def test_double_nat_peers_punch_through_the_carrier(lab: Lab) -> None:
    stun = lab.host("stun")
    carrier = lab.nat_router("carrier", NatKind.EIM_APDF, cgnat=True)
    a = lab.host("a", behind=lab.nat_router("a-nat", NatKind.EIM_APDF, behind=carrier))
    b = lab.device("b", NatKind.EIM_APDF)
    server = udp_socket(lab, stun, 3478)
    sa, sb = udp_socket(lab, a, 41641), udp_socket(lab, b, 41641)
    mapped_a = observed_source(sa, server, (stun.address, 3478))
    mapped_b = observed_source(sb, server, (stun.address, 3478))
    assert mapped_a[0] == carrier.wan_address
    assert b.behind is not None
    before = lab.drops(b.behind)
    sa.sendto(b"early", mapped_b)
    lab.wait_drops(b.behind, before)
    sb.sendto(b"punch-b", mapped_a)
    assert recv(sa) == (b"punch-b", mapped_b)
    sa.sendto(b"punch-a", mapped_b)
    assert recv(sb) == (b"punch-a", mapped_a)


def test_symmetric_peer_reaches_an_adf_peer_from_a_new_port(lab: Lab) -> None:
    """EDM maps a new port towards the peer; only address-dependent filtering lets that in."""
    stun = lab.host("stun")
    a, b = lab.device("a", NatKind.EDM), lab.device("b", NatKind.EIM_ADF)
    server = udp_socket(lab, stun, 3478)
    sa, sb = udp_socket(lab, a, 41641), udp_socket(lab, b, 41641)
    mapped_a = observed_source(sa, server, (stun.address, 3478))
    mapped_b = observed_source(sb, server, (stun.address, 3478))
    sb.sendto(b"punch-b", mapped_a)  # lost at a's NAT (no mapping towards b), but opens b's
    sa.sendto(b"punch-a", mapped_b)
    data, src = recv(sb)
    assert (data, src[0]) == (b"punch-a", mapped_a[0])
    assert src[1] != mapped_a[1]


def test_symmetric_peer_cannot_reach_an_apdf_peer(lab: Lab) -> None:
    stun = lab.host("stun")
    a, b = lab.device("a", NatKind.EDM), lab.device("b", NatKind.EIM_APDF)
    server = udp_socket(lab, stun, 3478)
    sa, sb = udp_socket(lab, a, 41641), udp_socket(lab, b, 41641)
    mapped_a = observed_source(sa, server, (stun.address, 3478))
    mapped_b = observed_source(sb, server, (stun.address, 3478))
    sb.sendto(b"punch-b", mapped_a)
    assert b.behind is not None
    before = lab.drops(b.behind)
    sa.sendto(b"punch-a", mapped_b)
    lab.wait_drops(b.behind, before)
    server.sendto(b"marker", mapped_b)
    assert recv(sb)[0] == b"marker"
