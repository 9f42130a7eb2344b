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


def _ip(*args: str) -> str:
    import subprocess

    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def test_mesh_routes_live_in_their_own_table_and_never_displace_the_hosts_routes(ns: str) -> None:
    """A CNI-style route in main for a prefix a peer also advertises keeps carrying its traffic."""

    def work() -> dict[str, str]:
        _ip("link", "add", "cni0", "type", "veth", "peer", "name", "cni0p")  # no dummy module here
        _ip("link", "set", "cni0p", "up")
        _ip("addr", "add", "10.244.1.1/24", "dev", "cni0")
        _ip("link", "set", "cni0", "up")
        _ip("route", "add", "10.244.2.0/24", "via", "10.244.1.2", "dev", "cni0")  # another node's pods
        _ip("route", "add", "default", "via", "10.244.1.254", "dev", "cni0")
        fd = tun.open_tun("wmtun4")
        try:
            netconf.set_link("wmtun4", mtu=1280, up=True)
            netconf.set_addresses("wmtun4", ["100.64.0.9/32"])
            netconf.install_rules()
            netconf.set_routes("wmtun4", ["100.64.0.0/10", "10.244.2.0/24", "10.99.0.0/16"])
            seen = {
                "main": _ip("route", "show", "table", "main"),
                "to_pod": _ip("route", "get", "10.244.2.7"),
                "to_peer": _ip("route", "get", "100.64.0.20"),
                "to_subnet": _ip("route", "get", "10.99.1.1"),
                "to_internet": _ip("route", "get", "198.51.100.1"),
                "rules": _ip("rule", "show"),
            }
            netconf.set_routes("wmtun4", [])  # as when the interface goes at stop
            netconf.remove_rules()
            seen["rules_after"] = _ip("rule", "show")
            seen["main_after"] = _ip("route", "show", "table", "main")
            return seen
        finally:
            os.close(fd)

    seen = call_in(ns, work)
    assert "10.244.2.0/24 via 10.244.1.2 dev cni0" in seen["main"]
    assert "wmtun4" not in seen["main"]
    assert "dev cni0" in seen["to_pod"]  # main's specific route wins over the mesh's
    assert "dev wmtun4" in seen["to_peer"] and "dev wmtun4" in seen["to_subnet"]
    assert "via 10.244.1.254 dev cni0" in seen["to_internet"]  # the default route stays the host's
    assert "5230:\tfrom all lookup main suppress_prefixlength 0" in seen["rules"]
    assert "5270:\tfrom all lookup 52" in seen["rules"]
    assert "5230" not in seen["rules_after"] and "5270" not in seen["rules_after"]
    assert seen["main_after"] == seen["main"]


def test_installing_rules_twice_adds_them_once_and_a_second_table_keeps_the_shared_rule(ns: str) -> None:
    def work() -> tuple[str, str, str]:
        netconf.install_rules(52)
        netconf.install_rules(52)
        netconf.install_rules(53)
        both = _ip("rule", "show")
        netconf.remove_rules(53)
        one = _ip("rule", "show")
        netconf.remove_rules(52)
        return both, one, _ip("rule", "show")

    both, one, none = call_in(ns, work)
    assert both.count("5270:") == 2 and both.count("5230:") == 1
    assert "lookup 53" not in one and "5230:" in one and "lookup 52" in one
    assert "5230:" not in none and "5270:" not in none


def test_rules_stay_while_another_interface_still_routes_through_the_table(ns: str) -> None:
    """A static tunnel and a mesh agent in one namespace share table 52: the first to stop must
    not take the rules the other's routes depend on."""

    def work() -> tuple[bool, str, bool, str]:
        fds = [tun.open_tun("wmtun5"), tun.open_tun("wmtun6")]
        try:
            for name, prefix in (("wmtun5", "10.81.0.0/16"), ("wmtun6", "10.82.0.0/16")):
                netconf.set_link(name, mtu=1280, up=True)
                netconf.install_rules()
                netconf.set_routes(name, [prefix])
            os.close(fds.pop(0))  # the first agent stops: its interface and routes go
            first = netconf.remove_rules()
            rules_after_first = _ip("rule", "show")
            os.close(fds.pop(0))
            second = netconf.remove_rules()
            return first, rules_after_first, second, _ip("rule", "show")
        finally:
            for fd in fds:
                os.close(fd)

    first, rules_after_first, second, rules_after_second = call_in(ns, work)
    assert first is False and "lookup 52" in rules_after_first and "5230:" in rules_after_first
    assert second is True and "lookup 52" not in rules_after_second and "5230:" not in rules_after_second
