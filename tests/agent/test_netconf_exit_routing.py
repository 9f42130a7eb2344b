"""Exit-node routing on a host (needs root, throwaway namespace): with the default route in the
mesh's table, the agent's marked sockets still use the host's own routes (rule 5210), unmarked
traffic goes into the tunnel, and LAN rules (5220) send the connected subnets to the tunnel too."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from agent_netns import call_in, namespace

from wiremesh.agent import bypass, netconf, tun

pytestmark = pytest.mark.netns


def _ip(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def ns():
    with namespace("wmexit") as name:
        yield name


def _host_with_lan() -> None:
    """eth0-like veth with a LAN (10.9.0.0/24) and the host's default route through it."""
    _ip("link", "add", "lan0", "type", "veth", "peer", "name", "lan0p")
    _ip("link", "set", "lan0p", "up")
    _ip("addr", "add", "10.9.0.5/24", "dev", "lan0")
    _ip("link", "set", "lan0", "up")
    _ip("route", "add", "default", "via", "10.9.0.1", "dev", "lan0")


def test_marked_sockets_bypass_the_exit_nodes_default_route_and_others_do_not(ns: str) -> None:
    def work() -> dict[str, str]:
        _host_with_lan()
        fd = tun.open_tun("wmexit0")
        try:
            netconf.set_link("wmexit0", mtu=1280, up=True)
            netconf.set_addresses("wmexit0", ["100.64.0.9/32"])
            netconf.install_rules()
            netconf.set_routes("wmexit0", ["100.64.0.0/10", "0.0.0.0/0"])
            return {
                "plain": _ip("route", "get", "198.51.100.1"),
                "marked": _ip("route", "get", "198.51.100.1", "mark", hex(bypass.BYPASS_MARK)),
                "lan": _ip("route", "get", "10.9.0.7"),
                "rules": _ip("rule", "show"),
            }
        finally:
            os.close(fd)

    seen = call_in(ns, work)
    assert "dev wmexit0" in seen["plain"]  # everything else goes to the exit node
    assert "via 10.9.0.1 dev lan0" in seen["marked"]  # the agent's own traffic does not
    assert "dev lan0" in seen["lan"]  # connected subnets win while no LAN rule says otherwise
    assert f"5210:\tfrom all fwmark {hex(bypass.BYPASS_MARK)}/0xff0000 lookup main" in seen["rules"]


def test_lan_rules_send_connected_subnets_to_the_tunnel_except_for_marked_traffic(ns: str) -> None:
    def work() -> dict[str, object]:
        _host_with_lan()
        fd = tun.open_tun("wmexit1")
        try:
            netconf.set_link("wmexit1", mtu=1280, up=True)
            netconf.install_rules()
            netconf.set_routes("wmexit1", ["0.0.0.0/0"])
            lan = netconf.connected_prefixes(exclude=("wmexit1",))
            netconf.set_lan_rules(lan)
            seen: dict[str, object] = {
                "connected": lan,
                "lan": _ip("route", "get", "10.9.0.7"),
                "lan_marked": _ip("route", "get", "10.9.0.7", "mark", hex(bypass.BYPASS_MARK)),
            }
            netconf.set_lan_rules(())
            seen["lan_allowed"] = _ip("route", "get", "10.9.0.7")
            netconf.set_lan_rules(lan)
        finally:
            os.close(fd)  # the interface goes, and its routes with it: then the rules may go
        netconf.remove_rules()
        seen["rules_after"] = _ip("rule", "show")
        return seen

    seen = call_in(ns, work)
    assert seen["connected"] == ("10.9.0.0/24",)
    assert "dev wmexit1" in str(seen["lan"])
    assert "dev lan0" in str(seen["lan_marked"])
    assert "dev lan0" in str(seen["lan_allowed"])
    rules = str(seen["rules_after"])
    assert "5210" not in rules and "5220" not in rules and "5230" not in rules


def test_a_marked_socket_carries_the_mark(ns: str) -> None:
    def work() -> int:
        with bypass.mark(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
            return int(sock.getsockopt(socket.SOL_SOCKET, bypass.SO_MARK))

    assert call_in(ns, work) == bypass.BYPASS_MARK
