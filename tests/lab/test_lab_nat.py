"""What each NAT kind of the lab does to UDP and TCP, measured with probes from real sockets."""

from __future__ import annotations

import errno
import select
import socket

import pytest

from wiremesh.lab import Lab, NatKind
from wiremesh.lab.probe import first_arrival, observed_source, recv, tcp_connects, udp_socket

pytestmark = pytest.mark.netns

ROUTER_KINDS = [k for k in NatKind if k.is_router]
UDP_KINDS = [k for k in ROUTER_KINDS if k is not NatKind.UDP_BLOCKED]
EIM_KINDS = [NatKind.EIM_APDF, NatKind.EIM_ADF, NatKind.PORTMAP]


def tcp_listener(lab: Lab, node, port: int = 0) -> socket.socket:
    sock = lab.socket(node, socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(8)
    return sock


@pytest.mark.parametrize("kind", ROUTER_KINDS, ids=lambda k: k.value)
def test_host_behind_nat_pings_public_host(lab: Lab, kind: NatKind) -> None:
    pub = lab.host("pub")
    a = lab.device("a", kind)
    lab.run(a, ["ping", "-c1", "-W2", pub.address])


@pytest.mark.parametrize("kind", UDP_KINDS, ids=lambda k: k.value)
def test_udp_from_behind_nat_arrives_from_router_wan_address(lab: Lab, kind: NatKind) -> None:
    pub = lab.host("pub")
    a = lab.device("a", kind)
    inside, server = udp_socket(lab, a), udp_socket(lab, pub, 3478)
    src = observed_source(inside, server, (pub.address, 3478))
    assert src[0] == a.public_address
    server.sendto(b"reply", src)
    assert recv(inside)[0] == b"reply"


@pytest.mark.parametrize("kind", ROUTER_KINDS, ids=lambda k: k.value)
def test_public_host_cannot_send_unsolicited_udp_inwards(lab: Lab, kind: NatKind) -> None:
    pub = lab.host("pub")
    a = lab.device("a", kind)
    assert a.behind is not None
    inside = udp_socket(lab, a, 41641)
    outside = udp_socket(lab, pub)
    before = lab.drops(a.behind)
    outside.sendto(b"unsolicited", (a.behind.wan_address, 41641))
    lab.wait_drops(a.behind, before)
    # Marker: the LAN side of the router delivers in order, so a leak would arrive first.
    marker = udp_socket(lab, lab.host("lanpeer", behind=a.behind))
    marker.sendto(b"marker", (a.address, 41641))
    assert first_arrival(inside) == b"marker"


@pytest.mark.parametrize("kind", ROUTER_KINDS, ids=lambda k: k.value)
def test_public_host_cannot_open_tcp_inwards(lab: Lab, kind: NatKind) -> None:
    pub = lab.host("pub")
    a = lab.device("a", kind)
    assert a.behind is not None
    listener = tcp_listener(lab, a, 8080)
    assert tcp_connects(lab, lab.host("lanpeer", behind=a.behind), (a.address, 8080))
    outside = lab.socket(pub, socket.AF_INET, socket.SOCK_STREAM)
    outside.setblocking(False)
    before = lab.drops(a.behind)
    assert outside.connect_ex((a.behind.wan_address, 8080)) == errno.EINPROGRESS
    lab.wait_drops(a.behind, before)  # the SYN was dropped, so no SYN-ACK can be on its way
    _, writable, _ = select.select([], [outside], [], 0)
    assert not writable
    outside.close()
    listener.close()


@pytest.mark.parametrize("kind", EIM_KINDS, ids=lambda k: k.value)
def test_eim_keeps_the_mapping_for_different_destinations(lab: Lab, kind: NatKind) -> None:
    pub1, pub2 = lab.host("pub1"), lab.host("pub2")
    a = lab.device("a", kind)
    inside = udp_socket(lab, a)
    s1, s1b, s2 = udp_socket(lab, pub1, 3478), udp_socket(lab, pub1, 3479), udp_socket(lab, pub2, 3478)
    first = observed_source(inside, s1, (pub1.address, 3478))
    other_port = observed_source(inside, s1b, (pub1.address, 3479))
    other_host = observed_source(inside, s2, (pub2.address, 3478))
    assert first == other_port == other_host


def test_edm_changes_the_mapping_per_destination(lab: Lab) -> None:
    pub1, pub2 = lab.host("pub1"), lab.host("pub2")
    a = lab.device("a", NatKind.EDM)
    inside = udp_socket(lab, a)
    s1, s1b, s2 = udp_socket(lab, pub1, 3478), udp_socket(lab, pub1, 3479), udp_socket(lab, pub2, 3478)
    first = observed_source(inside, s1, (pub1.address, 3478))
    other_port = observed_source(inside, s1b, (pub1.address, 3479))
    other_host = observed_source(inside, s2, (pub2.address, 3478))
    assert first[0] == other_port[0] == other_host[0] == a.public_address
    assert len({first[1], other_port[1], other_host[1]}) == 3


def _inbound_from_other_port(lab: Lab, kind: NatKind) -> bytes:
    """Inside talks to pub:3478; pub then sends from :3479, then (marker) from :3478 again."""
    pub = lab.host("pub")
    a = lab.device("a", kind)
    inside = udp_socket(lab, a)
    known, other = udp_socket(lab, pub, 3478), udp_socket(lab, pub, 3479)
    mapped = observed_source(inside, known, (pub.address, 3478))
    assert a.behind is not None
    before = lab.drops(a.behind)
    other.sendto(b"other-port", mapped)
    known.sendto(b"marker", mapped)
    arrived = first_arrival(inside)
    if arrived == b"marker":  # then the other-port packet must have been dropped, not delayed
        lab.wait_drops(a.behind, before)
    return arrived


def test_apdf_drops_inbound_from_another_port_of_a_known_address(lab: Lab) -> None:
    assert _inbound_from_other_port(lab, NatKind.EIM_APDF) == b"marker"


def test_adf_admits_inbound_from_another_port_of_a_known_address(lab: Lab) -> None:
    assert _inbound_from_other_port(lab, NatKind.EIM_ADF) == b"other-port"


def test_adf_replies_to_the_new_port_keep_the_same_mapping(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.EIM_ADF)
    inside = udp_socket(lab, a)
    known, other = udp_socket(lab, pub, 3478), udp_socket(lab, pub, 3479)
    mapped = observed_source(inside, known, (pub.address, 3478))
    other.sendto(b"other-port", mapped)
    _, src = recv(inside)
    assert observed_source(inside, other, src) == mapped


def test_adf_drops_inbound_from_an_unknown_address(lab: Lab) -> None:
    pub, stranger = lab.host("pub"), lab.host("stranger")
    a = lab.device("a", NatKind.EIM_ADF)
    inside = udp_socket(lab, a)
    known, strange = udp_socket(lab, pub, 3478), udp_socket(lab, stranger, 3478)
    mapped = observed_source(inside, known, (pub.address, 3478))
    assert a.behind is not None
    before = lab.drops(a.behind)
    strange.sendto(b"stranger", mapped)
    lab.wait_drops(a.behind, before)
    known.sendto(b"marker", mapped)
    assert first_arrival(inside) == b"marker"


def test_udp_blocked_drops_udp(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.UDP_BLOCKED)
    inside, server = udp_socket(lab, a), udp_socket(lab, pub, 3478)
    assert a.behind is not None
    before = lab.drops(a.behind)
    inside.sendto(b"blocked", (pub.address, 3478))
    lab.wait_drops(a.behind, before)
    # Marker from another public host proves the first datagram is not merely late.
    udp_socket(lab, lab.host("pub2")).sendto(b"marker", (pub.address, 3478))
    assert first_arrival(server) == b"marker"


def test_udp_blocked_passes_tcp(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.UDP_BLOCKED)
    listener = tcp_listener(lab, pub, 443)
    assert tcp_connects(lab, a, (pub.address, 443))
    listener.close()


def test_hosts_behind_the_same_nat_reach_each_other_on_the_lan(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.EIM_APDF)
    a, b = lab.host("a", behind=nat), lab.host("b", behind=nat)
    sa, sb = udp_socket(lab, a), udp_socket(lab, b, 41641)
    assert observed_source(sa, sb, (b.address, 41641)) == (a.address, sa.getsockname()[1])


def test_double_nat_reaches_public_host_from_the_carrier_address(lab: Lab) -> None:
    pub = lab.host("pub")
    carrier = lab.nat_router("carrier", NatKind.EIM_APDF, cgnat=True)
    home = lab.nat_router("home", NatKind.EIM_APDF, behind=carrier)
    a = lab.host("a", behind=home)
    assert home.wan_address.startswith("100.127.")
    inside, server = udp_socket(lab, a), udp_socket(lab, pub, 3478)
    src = observed_source(inside, server, (pub.address, 3478))
    assert src[0] == carrier.wan_address == a.public_address
    server.sendto(b"reply", src)
    assert recv(inside)[0] == b"reply"


def test_flushing_an_adf_router_also_forgets_its_filter_state(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.EIM_ADF)
    assert a.behind is not None
    inside = udp_socket(lab, a)
    known, other = udp_socket(lab, pub, 3478), udp_socket(lab, pub, 3479)
    mapped = observed_source(inside, known, (pub.address, 3478))
    lab.flush_conntrack(a.behind)
    before = lab.drops(a.behind)
    other.sendto(b"other-port", mapped)
    lab.wait_drops(a.behind, before)


def _public_mappings(lab: Lab, router, names=("a", "b")):
    stun = lab.host("stun")
    server = udp_socket(lab, stun, 3478)
    hosts = [lab.host(name, behind=router) for name in names]
    socks = [udp_socket(lab, host, 41641 + i) for i, host in enumerate(hosts)]
    mapped = [observed_source(sock, server, (stun.address, 3478)) for sock in socks]
    return hosts, socks, mapped


@pytest.mark.parametrize("kind", [NatKind.EIM_APDF, NatKind.EIM_ADF], ids=lambda k: k.value)
def test_hairpin_router_loops_lan_traffic_to_a_public_mapping_back(lab: Lab, kind: NatKind) -> None:
    nat = lab.nat_router("home", kind, hairpin=True)
    _, (sa, sb), (mapped_a, mapped_b) = _public_mappings(lab, nat)
    sa.sendto(b"hairpin", mapped_b)
    assert recv(sb) == (b"hairpin", mapped_a)
    sb.sendto(b"back", mapped_a)
    assert recv(sa) == (b"back", mapped_b)


def test_routers_do_not_hairpin_by_default(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.EIM_APDF)
    (_, b), (sa, sb), (_, mapped_b) = _public_mappings(lab, nat)
    sa.sendto(b"hairpin", mapped_b)
    sa.sendto(b"marker", (b.address, sb.getsockname()[1]))
    assert first_arrival(sb) == b"marker"


def test_hairpin_is_refused_for_endpoint_dependent_mapping(lab: Lab) -> None:
    with pytest.raises(ValueError, match="hairpinning"):
        lab.nat_router("home", NatKind.EDM, hairpin=True)
    assert lab.namespaces == ()


@pytest.mark.parametrize("kind", ROUTER_KINDS, ids=lambda k: k.value)
def test_router_does_not_forward_to_its_lan_even_when_routed_there(lab: Lab, kind: NatKind) -> None:
    pub = lab.host("pub")
    a = lab.device("a", kind)
    assert a.behind is not None
    # A hostile neighbour on the internet points a route at the router's WAN address.
    lab.run(pub, ["ip", "route", "add", a.behind.lan_subnet, "via", a.behind.wan_address])
    inside = udp_socket(lab, a, 41641)
    before = lab.drops(a.behind)
    udp_socket(lab, pub).sendto(b"routed-in", (a.address, 41641))
    lab.wait_drops(a.behind, before)
    udp_socket(lab, lab.host("lanpeer", behind=a.behind)).sendto(b"marker", (a.address, 41641))
    assert first_arrival(inside) == b"marker"
