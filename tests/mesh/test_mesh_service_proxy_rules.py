"""A Service proxy's forwarding rules, decided without I/O (svcproxy.py): which address each side
is, and the nftables script for them."""

from __future__ import annotations

import pytest
from test_mesh_plan import node

from wiremesh.agent import svcproxy
from wiremesh.core.netmap import NetworkMap

NETMAP = NetworkMap(
    version=1,
    self_node=node(1),
    peers=(node(2, name="laptop", hostname="laptop"),),
    dns={"domain": "mesh.test"},
)


def test_an_egress_proxy_finds_its_device_by_name_magicdns_name_or_address():
    for target in ("laptop", "laptop.mesh.test", "LAPTOP.mesh.test.", "100.64.0.2"):
        assert svcproxy.wanted(NETMAP, ingress_to="", egress_to=target).egress_to == "100.64.0.2", target
    assert svcproxy.wanted(NETMAP, ingress_to="", egress_to="laptop.other.test").egress_to == ""


def test_an_ingress_proxy_forwards_from_its_own_mesh_address_once_it_has_one():
    rules = svcproxy.wanted(NETMAP, ingress_to="10.96.0.5", egress_to="")
    assert (rules.ingress_from, rules.ingress_to) == ("100.64.0.1", "10.96.0.5")
    assert svcproxy.wanted(None, ingress_to="10.96.0.5", egress_to="").empty


def test_the_ruleset_forwards_tcp_and_udp_only_and_keeps_the_agents_own_ports():
    rules = svcproxy.ProxyRules(egress_to="100.64.0.2", keep_udp=(41641,), keep_tcp=(9586,))
    script = svcproxy.ruleset("wm0", rules)
    assert 'iifname != "wm0" udp dport { 41641 } return' in script
    assert 'iifname != "wm0" tcp dport { 9586 } return' in script
    assert "meta l4proto { tcp, udp } dnat to 100.64.0.2" in script
    assert script.index("41641") < script.index("dnat to")  # kept before anything is forwarded
    assert 'oifname "wm0" ip daddr 100.64.0.2 masquerade' in script


def test_the_ruleset_refuses_what_is_not_an_ipv4_address_or_interface_name():
    with pytest.raises(ValueError):
        svcproxy.ruleset("wm0", svcproxy.ProxyRules(egress_to="100.64.0.2; flush ruleset"))
    with pytest.raises(ValueError):
        svcproxy.ruleset("wm0 }", svcproxy.ProxyRules(egress_to="100.64.0.2"))
