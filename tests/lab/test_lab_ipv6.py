"""Lab(ipv6=True): public IPv6 everywhere a home router sits directly on the internet, no NAT66."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from wiremesh.lab import Lab, NatKind
from wiremesh.lab.probe import first_arrival, observed_source, recv, udp_socket

pytestmark = pytest.mark.netns

V6 = socket.AF_INET6


@pytest.fixture
def lab6() -> Iterator[Lab]:
    with Lab(ipv6=True) as lab:
        yield lab


def udp6(lab: Lab, node, port: int = 0) -> socket.socket:
    return udp_socket(lab, node, port, family=V6)


def test_public_hosts_reach_each_other_over_ipv6(lab6: Lab) -> None:
    a, b = lab6.host("a"), lab6.host("b")
    assert a.address6 is not None and b.address6 is not None
    sa, sb = udp6(lab6, a), udp6(lab6, b, 3478)
    assert observed_source(sa, sb, (b.address6, 3478))[0] == a.address6


def test_host_behind_a_router_reaches_the_internet_from_its_own_ipv6_address(lab6: Lab) -> None:
    pub = lab6.host("pub")
    a = lab6.device("a", NatKind.EIM_APDF)
    assert a.address6 is not None and pub.address6 is not None
    assert a.behind is not None and a.behind.lan_subnet6 is not None
    sa, server = udp6(lab6, a), udp6(lab6, pub, 3478)
    src = observed_source(sa, server, (pub.address6, 3478))
    assert src[0] == a.address6
    server.sendto(b"reply", src)
    assert recv(sa)[0] == b"reply"


def test_router_firewall_drops_unsolicited_inbound_ipv6(lab6: Lab) -> None:
    pub = lab6.host("pub")
    a = lab6.device("a", NatKind.EIM_APDF)
    assert a.address6 is not None and a.behind is not None
    inside = udp6(lab6, a, 41641)
    before = lab6.drops(a.behind)
    udp6(lab6, pub).sendto(b"unsolicited", (a.address6, 41641))
    lab6.wait_drops(a.behind, before)
    udp6(lab6, lab6.host("lanpeer", behind=a.behind)).sendto(b"marker", (a.address6, 41641))
    assert first_arrival(inside) == b"marker"


def test_ipv6_hole_punch_between_two_firewalled_hosts(lab6: Lab) -> None:
    a, b = lab6.device("a", NatKind.EIM_APDF), lab6.device("b", NatKind.EDM)
    assert a.address6 is not None and b.address6 is not None
    assert b.behind is not None
    sa, sb = udp6(lab6, a, 41641), udp6(lab6, b, 41641)
    before = lab6.drops(b.behind)
    sa.sendto(b"early", (b.address6, 41641))  # dropped by b's firewall, opens a's
    lab6.wait_drops(b.behind, before)
    sb.sendto(b"punch-b", (a.address6, 41641))
    assert recv(sa)[0] == b"punch-b"
    sa.sendto(b"punch-a", (b.address6, 41641))
    assert recv(sb)[0] == b"punch-a"


def test_udp_blocked_router_drops_ipv6_udp(lab6: Lab) -> None:
    pub, other = lab6.host("pub"), lab6.host("other")
    a = lab6.device("a", NatKind.UDP_BLOCKED)
    assert pub.address6 is not None
    assert a.behind is not None
    server = udp6(lab6, pub, 3478)
    before = lab6.drops(a.behind)
    udp6(lab6, a).sendto(b"blocked", (pub.address6, 3478))
    lab6.wait_drops(a.behind, before)
    udp6(lab6, other).sendto(b"marker", (pub.address6, 3478))
    assert first_arrival(server) == b"marker"


def test_drop_between_takes_an_ipv6_address(lab6: Lab) -> None:
    pub, other = lab6.host("pub"), lab6.host("other")
    a = lab6.device("a", NatKind.EIM_APDF)
    assert a.behind is not None and pub.address6 is not None
    sa, server = udp6(lab6, a), udp6(lab6, pub, 3478)
    handle = lab6.drop_between(a.behind, pub.address6)
    before = lab6.drops(a.behind)
    with contextlib.suppress(PermissionError):
        sa.sendto(b"dropped", (pub.address6, 3478))
    lab6.wait_drops(a.behind, before)
    udp6(lab6, other).sendto(b"marker", (pub.address6, 3478))
    assert first_arrival(server) == b"marker"
    lab6.remove_rule(handle)
    assert observed_source(sa, server, (pub.address6, 3478))[0] == a.address6


def test_hosts_behind_a_carrier_nat_get_no_ipv6(lab6: Lab) -> None:
    carrier = lab6.nat_router("carrier", NatKind.EIM_APDF, cgnat=True)
    home = lab6.nat_router("home", NatKind.EIM_APDF, behind=carrier)
    a = lab6.host("a", behind=home)
    assert (carrier.lan_subnet6, home.wan_address6, a.address6) == (None, None, None)


def test_labs_are_ipv4_only_unless_asked(lab: Lab) -> None:
    a = lab.device("a", NatKind.EIM_APDF)
    assert a.address6 is None
    addrs = lab.run(a, ["ip", "-6", "addr", "show", "scope", "global"]).stdout
    assert addrs.strip() == ""
