"""plan() with exit nodes: only the selected exit node keeps 0.0.0.0/0 and ::/0 in its allowed IPs,
the default routes go into the mesh's table while one is selected (even when it is missing: no
leak), and the LAN goes to it too unless allowed."""

from __future__ import annotations

from test_mesh_plan import NOW, netmap, node

from wiremesh.agent import exitnode
from wiremesh.agent.mesh.plan import MESH_ROUTES, plan
from wiremesh.core import crypto

EXIT = ("0.0.0.0/0", "::/0")


def exit_peer(i: int, name: str):
    addresses = (f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128")
    return node(i, name=name, hostname=name, allowed_ips=addresses + EXIT, approved_routes=EXIT)


def allowed(result, peer) -> tuple[str, ...]:
    return next(p.allowed_ips for p in result.peers if crypto.encode_key(p.public_key) == peer.node_key)


def test_without_a_selection_no_peer_keeps_exit_routes_and_no_default_route_is_added():
    e1 = exit_peer(2, "exit1")
    result = plan(netmap(e1), NOW, accept_routes=True)
    assert "0.0.0.0/0" not in allowed(result, e1)
    assert result.routes == MESH_ROUTES  # accept-routes never makes an exit node the default route


def test_the_selected_exit_node_alone_carries_the_default_routes():
    e1, e2 = exit_peer(2, "exit1"), exit_peer(3, "exit2")
    result = plan(netmap(e1, e2), NOW, exit_node="exit2")
    assert set(EXIT) <= set(allowed(result, e2))
    assert not set(EXIT) & set(allowed(result, e1))
    assert set(EXIT) <= set(result.routes)
    assert result.exit.node is not None and result.exit.node.name == "exit2" and not result.exit.error


def test_an_exit_node_is_selected_by_name_host_name_or_mesh_address():
    e1 = exit_peer(2, "exit1")
    for selector in ("exit1", "EXIT1", "100.64.0.2", "fd7a:115c:a1e0::2"):
        assert plan(netmap(e1), NOW, exit_node=selector).exit.node == e1, selector


def test_a_missing_or_unapproved_exit_node_keeps_the_default_routes_and_says_why():
    plain = node(2, name="box", hostname="box")
    missing = plan(netmap(plain), NOW, exit_node="nowhere")
    assert set(EXIT) <= set(missing.routes) and "not a peer" in missing.exit.error
    unapproved = plan(netmap(plain), NOW, exit_node="box")
    assert set(EXIT) <= set(unapproved.routes) and "does not offer" in unapproved.exit.error
    assert not set(EXIT) & set(allowed(unapproved, plain))


def test_the_lan_goes_to_the_exit_node_unless_allowed():
    e1 = exit_peer(2, "exit1")
    lan = ("192.168.1.0/24",)
    assert plan(netmap(e1), NOW, exit_node="exit1", lan_prefixes=lan).lan_rules == lan
    assert plan(netmap(e1), NOW, exit_node="exit1", lan_prefixes=lan, allow_lan=True).lan_rules == ()
    assert plan(netmap(e1), NOW, lan_prefixes=lan).lan_rules == ()


def test_an_exit_node_does_not_route_its_own_default_route_into_the_mesh():
    e1 = exit_peer(2, "exit1")
    result = plan(netmap(e1), NOW, exit_node="exit1", own_routes=EXIT)
    assert not set(EXIT) & set(result.routes)


def test_selectors_the_cli_cannot_mean_are_refused():
    assert exitnode.check_selector(" exit1 ") == "exit1"
    for bad in ("a b", "x" * 300, "bad\x00"):
        try:
            exitnode.check_selector(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
