"""plan(): what the agent configures for a netmap, decided without any I/O."""

from __future__ import annotations

from wiremesh.agent.mesh.plan import MESH_ROUTES, choose_endpoint, plan
from wiremesh.core import crypto
from wiremesh.core.netmap import NetworkMap, Node

NOW = 1_800_000_000.0


def node(i: int, **kw) -> Node:
    key = crypto.encode_key(crypto.public_key(crypto.generate_private_key()))
    addresses = (f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128")
    fields = {
        "id": i,
        "name": f"n{i}",
        "hostname": f"n{i}",
        "user": "alice",
        "node_key": key,
        "disco_key": key,
        "addresses": addresses,
        "allowed_ips": addresses,
        "endpoints": (f"198.18.1.{i}:41641",),
    }
    fields.update(kw)
    return Node(**fields)


def netmap(*peers: Node, packet_filter=()) -> NetworkMap:
    return NetworkMap(version=1, self_node=node(1), peers=peers, packet_filter=packet_filter)


def test_every_live_peer_becomes_a_wireguard_peer_with_its_allowed_ips_and_endpoint():
    p2, p3 = node(2), node(3)
    result = plan(netmap(p2, p3), NOW)
    by_key = {crypto.encode_key(p.public_key): p for p in result.peers}
    assert set(by_key) == {p2.node_key, p3.node_key}
    assert by_key[p2.node_key].allowed_ips == p2.allowed_ips
    assert by_key[p2.node_key].endpoint == ("198.18.1.2", 41641)


def test_self_addresses_and_mesh_routes_are_configured():
    result = plan(netmap(node(2)), NOW)
    assert result.addresses == ("100.64.0.1/32", "fd7a:115c:a1e0::1/128")
    assert result.routes == MESH_ROUTES


def test_expired_peer_is_left_out():
    result = plan(netmap(node(2, expired=True), node(3)), NOW)
    assert len(result.peers) == 1


def test_peer_whose_key_expiry_has_passed_is_left_out_and_the_next_expiry_is_reported():
    soon = node(2, key_expiry=NOW + 30)
    result = plan(netmap(soon, node(3, key_expiry=NOW - 1)), NOW)
    assert len(result.peers) == 1 and result.next_expiry == NOW + 30
    assert plan(netmap(soon), NOW + 31).peers == ()


def test_approved_routes_of_peers_are_routed_into_the_tunnel_with_accept_routes():
    router = node(2, approved_routes=("192.168.7.0/24",), allowed_ips=("100.64.0.2/32", "192.168.7.0/24"))
    assert "192.168.7.0/24" in plan(netmap(router), NOW, accept_routes=True).routes


def test_approved_routes_of_peers_are_not_routed_by_default_but_stay_allowed():
    router = node(2, approved_routes=("192.168.7.0/24",), allowed_ips=("100.64.0.2/32", "192.168.7.0/24"))
    result = plan(netmap(router), NOW)
    assert result.routes == MESH_ROUTES
    # Replies from the subnet (a router that keeps source addresses) are still accepted.
    assert "192.168.7.0/24" in result.peers[0].allowed_ips


def test_advertised_but_unapproved_routes_are_not_routed():
    router = node(2, advertised_routes=("192.168.7.0/24",))
    assert "192.168.7.0/24" not in plan(netmap(router), NOW, accept_routes=True).routes


def test_a_route_this_node_advertises_itself_stays_local():
    other = node(2, approved_routes=("10.9.0.0/24",), allowed_ips=("100.64.0.2/32", "10.9.0.0/24"))
    result = plan(netmap(other), NOW, own_routes=("10.9.0.0/24",), accept_routes=True)
    assert "10.9.0.0/24" not in result.routes


def test_down_keeps_addresses_but_no_peers_or_routes():
    result = plan(netmap(node(2)), NOW, running=False)
    assert result.peers == () and result.routes == () and result.addresses


def test_peer_with_a_malformed_key_or_prefix_is_skipped_not_fatal():
    bad = node(2, node_key="not-a-key")
    odd = node(3, allowed_ips=("100.64.0.3/32", "garbage"))
    result = plan(netmap(bad, odd), NOW)
    assert len(result.peers) == 1 and result.peers[0].allowed_ips == ("100.64.0.3/32",)


def test_packet_filter_rules_are_carried_into_the_plan():
    rule = {"src": ["100.64.0.2/32"], "dst": ["100.64.0.1/32"], "proto": [6], "ports": [[22, 22]]}
    assert plan(netmap(node(2), packet_filter=(rule,)), NOW).packet_filter == (rule,)


def test_no_netmap_means_nothing_configured():
    result = plan(None, NOW)
    assert result.peers == () and result.routes == () and result.addresses == ()


def test_endpoint_choice_takes_the_first_well_formed_one():
    assert choose_endpoint(["bogus", "[fd00::1]:5", "198.18.0.9:41641"]) == ("fd00::1", 5)
    assert choose_endpoint(["1.2.3.4:0", "nohost:1"]) is None


def test_a_path_selector_can_supply_the_endpoint_of_a_peer():
    p2, p3 = node(2), node(3)
    relay = ("derp", 1)
    result = plan(netmap(p2, p3), NOW, endpoints={p2.node_key: relay})
    by_key = {crypto.encode_key(p.public_key): p.endpoint for p in result.peers}
    assert by_key == {p2.node_key: relay, p3.node_key: ("198.18.1.3", 41641)}
