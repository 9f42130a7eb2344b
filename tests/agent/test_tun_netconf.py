"""TUN creation and netlink configuration inside a throwaway namespace (needs root)."""

from __future__ import annotations

import ipaddress
import os

import pytest
from agent_netns import call_in, namespace
from pyroute2 import IPRoute

from wiremesh.agent import netconf, tun

pytestmark = pytest.mark.netns


@pytest.fixture
def ns():
    with namespace("wmtun") as name:
        yield name


def test_open_tun_creates_the_interface_and_closing_removes_it(ns: str) -> None:
    fd = call_in(ns, lambda: tun.open_tun("wmtun0"))
    try:
        assert call_in(ns, lambda: netconf.interface_exists("wmtun0"))
    finally:
        os.close(fd)
    assert not call_in(ns, lambda: netconf.interface_exists("wmtun0"))


def test_addresses_mtu_and_routes_are_reconciled(ns: str) -> None:
    def work() -> tuple[object, ...]:
        fd = tun.open_tun("wmtun1")
        try:
            netconf.set_link("wmtun1", mtu=1380, up=True)
            netconf.set_addresses("wmtun1", ["10.77.0.1/24", "fd77::1/64"])
            netconf.set_routes("wmtun1", ["10.78.0.0/16", "fd78::/64", "10.79.0.1/32"])
            first = (set(netconf.get_addresses("wmtun1")), set(netconf.get_routes("wmtun1")))
            netconf.set_addresses("wmtun1", ["10.77.0.2/24"])
            netconf.set_routes("wmtun1", ["10.79.0.1/32"])
            second = (set(netconf.get_addresses("wmtun1")), set(netconf.get_routes("wmtun1")))
            with IPRoute() as ipr:
                mtu = ipr.get_links(ifname="wmtun1")[0].get("mtu")
            return first, second, mtu
        finally:
            os.close(fd)

    (addrs1, routes1), (addrs2, routes2), mtu = call_in(ns, work)  # type: ignore[misc]
    ip = ipaddress.ip_interface
    net = ipaddress.ip_network
    assert addrs1 == {ip("10.77.0.1/24"), ip("fd77::1/64")}
    assert routes1 == {net("10.78.0.0/16"), net("fd78::/64"), net("10.79.0.1/32")}
    assert addrs2 == {ip("10.77.0.2/24")}
    assert routes2 == {net("10.79.0.1/32")}
    assert mtu == 1380


def test_remove_interface_reports_whether_it_existed(ns: str) -> None:
    def work() -> tuple[bool, bool]:
        fd = tun.open_tun("wmtun2")
        try:
            return netconf.remove_interface("wmtun2"), netconf.remove_interface("wmtun2")
        finally:
            os.close(fd)

    assert call_in(ns, work) == (True, False)


def test_configuring_a_missing_interface_is_a_clear_error(ns: str) -> None:
    with pytest.raises(netconf.NetconfError, match="does not exist"):
        call_in(ns, lambda: netconf.set_link("wmnothere"))


def test_interface_names_the_kernel_would_refuse_are_rejected() -> None:
    for bad in ["", "x" * 16, "a/b", "a b"]:
        with pytest.raises(ValueError):
            tun.validate_ifname(bad)
