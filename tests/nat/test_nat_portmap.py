"""The agent's minimal PCP and NAT-PMP clients against a real miniupnpd in a lab router."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wiremesh.agent.magicsock.portmapper import natpmp_map, pcp_map
from wiremesh.lab import Host, Lab, NatKind, netns

pytestmark = [pytest.mark.netns]


@pytest.fixture(scope="module")
def lab_host() -> Iterator[tuple[Lab, Host, Host]]:
    with Lab() as lab:
        yield lab, lab.device("p", NatKind.PORTMAP), lab.device("q", NatKind.EIM_APDF)


def test_pcp_map_returns_the_routers_public_address_and_port(lab_host):
    lab, host, _ = lab_host
    lab.ns_of(host)
    assert netns.call_in(host.ns, lambda: pcp_map(host.gateway, 41641)) == (host.public_address, 41641)


def test_nat_pmp_map_returns_the_routers_public_address_and_port(lab_host):
    lab, host, _ = lab_host
    lab.ns_of(host)
    assert netns.call_in(host.ns, lambda: natpmp_map(host.gateway, 41650)) == (host.public_address, 41650)


def test_router_without_port_mapping_gives_none_quickly(lab_host):
    lab, _, plain = lab_host
    lab.ns_of(plain)
    assert netns.call_in(plain.ns, lambda: pcp_map(plain.gateway, 41641)) is None
    assert netns.call_in(plain.ns, lambda: natpmp_map(plain.gateway, 41641)) is None
