"""The per-node compiler: visible peers, inbound filter rules, and incremental recompiles."""

from __future__ import annotations

import json

from policy_packets import TCP, UDP, packet

from wiremesh.core.packetfilter import Filter
from wiremesh.core.policy import FilterRule, PolicyCompiler, PolicyNode, parse_policy

POLICY = parse_policy("""
{
  "groups": {"group:dev": ["alice@example.com"]},
  "tagOwners": {"tag:web": ["alice@example.com"], "tag:db": ["alice@example.com"]},
  "hosts": {"lan": "192.168.1.0/24"},
  "acls": [
    {"action": "accept", "src": ["group:dev"], "dst": ["tag:web:22,443"]},
    {"action": "accept", "src": ["tag:web"], "dst": ["tag:db:5432"]},
    {"action": "accept", "src": ["group:dev"], "dst": ["lan:80"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]},
  ],
}
""")

ALICE = PolicyNode(1, user="alice@example.com", addresses=("100.64.0.1", "fd7a:115c:a1e0::1"))
ALICE2 = PolicyNode(2, user="alice@example.com", addresses=("100.64.0.2",))
BOB = PolicyNode(3, user="bob@example.com", addresses=("100.64.0.3",))
WEB = PolicyNode(4, user="alice@example.com", tags=frozenset({"tag:web"}), addresses=("100.64.0.4",))
DB = PolicyNode(5, tags=frozenset({"tag:db"}), addresses=("100.64.0.5",))
ROUTER = PolicyNode(6, tags=frozenset({"tag:router"}), addresses=("100.64.0.6",), routes=("192.168.1.0/24",))
ALL = [ALICE, ALICE2, BOB, WEB, DB, ROUTER]


def compiler(nodes: list[PolicyNode] = ALL) -> PolicyCompiler:
    return PolicyCompiler(POLICY, nodes)


def test_peers_include_those_a_node_can_reach_and_those_that_can_reach_it() -> None:
    c = compiler()
    assert c.compiled(WEB.id).peers == {ALICE.id, ALICE2.id, DB.id}
    assert c.compiled(DB.id).peers == {WEB.id}


def test_node_granted_nothing_sees_nobody() -> None:
    assert compiler().compiled(BOB.id).peers == frozenset()


def test_subnet_route_counts_as_a_reachable_destination() -> None:
    c = compiler()
    assert ROUTER.id in c.compiled(ALICE.id).peers
    assert c.compiled(ROUTER.id).peers == {ALICE.id, ALICE2.id}


def test_subnet_router_filter_covers_the_route_not_its_own_address() -> None:
    [rule] = compiler().compiled(ROUTER.id).rules
    assert rule.dst == ("192.168.1.0/24",)
    assert rule.ports == ((80, 80),)


def test_tagged_node_is_not_its_users_device() -> None:
    # WEB is tagged, so autogroup:self between alice's devices does not include it.
    c = compiler()
    f = Filter(c.compiled(ALICE2.id).rules)
    assert not f.check_inbound(packet("100.64.0.4", "100.64.0.2", TCP, 1, 22), 0.0)


def test_autogroup_self_lets_a_users_devices_reach_each_other() -> None:
    c = compiler()
    assert ALICE2.id in c.compiled(ALICE.id).peers
    f = Filter(c.compiled(ALICE2.id).rules)
    assert f.check_inbound(packet("100.64.0.1", "100.64.0.2", UDP, 1, 9999), 0.0)
    assert not f.check_inbound(packet("100.64.0.3", "100.64.0.2", UDP, 1, 9999), 0.0)


def test_inbound_rules_allow_exactly_the_policy_ports() -> None:
    f = Filter(compiler().compiled(WEB.id).rules)
    assert f.check_inbound(packet("100.64.0.1", "100.64.0.4", TCP, 1, 443), 0.0)
    assert (
        f.check_inbound(packet("fd7a:115c:a1e0::1", "100.64.0.4", TCP, 1, 22), 0.0) is False
    )  # mixed versions
    assert not f.check_inbound(packet("100.64.0.1", "100.64.0.4", TCP, 1, 80), 0.0)


def test_no_policy_means_everyone_reaches_everyone() -> None:
    c = PolicyCompiler(None, ALL)
    assert c.compiled(BOB.id).peers == {n.id for n in ALL} - {BOB.id}
    f = Filter(c.compiled(BOB.id).rules)
    assert f.check_inbound(packet("100.64.0.5", "100.64.0.3", TCP, 1, 12345), 0.0)


def test_packet_filter_is_json_serialisable_and_round_trips() -> None:
    compiled = compiler().compiled(WEB.id)
    wire = json.loads(json.dumps(compiled.packet_filter()))
    assert tuple(FilterRule.from_dict(r) for r in wire) == compiled.rules


def test_node_that_may_receive_nothing_gets_a_non_empty_deny_filter() -> None:
    wire = compiler().compiled(BOB.id).packet_filter()
    assert wire
    assert not Filter.from_netmap(wire).check_inbound(packet("100.64.0.1", "100.64.0.3", TCP, 1, 22), 0.0)


def test_adding_a_node_recompiles_only_affected_nodes() -> None:
    c = compiler()
    before = {n.id: c.compiled(n.id) for n in ALL}
    db2 = PolicyNode(7, tags=frozenset({"tag:db"}), addresses=("100.64.0.7",))
    changed = c.add_node(db2)
    # The new db is visible to the web server (it may reach it); nobody else is affected.
    assert changed == {db2.id, WEB.id}
    for n in ALL:
        if n.id != WEB.id:
            assert c.compiled(n.id) is before[n.id]


def test_adding_a_source_node_changes_the_destinations_filters() -> None:
    c = compiler()
    web2 = PolicyNode(8, tags=frozenset({"tag:web"}), addresses=("100.64.0.8",))
    changed = c.add_node(web2)
    assert changed == {web2.id, DB.id, ALICE.id, ALICE2.id}
    f = Filter(c.compiled(DB.id).rules)
    assert f.check_inbound(packet("100.64.0.8", "100.64.0.5", TCP, 1, 5432), 0.0)


def test_removing_a_node_updates_its_peers() -> None:
    c = compiler()
    changed = c.remove_node(DB.id)
    assert changed == {DB.id, WEB.id}
    assert DB.id not in c.compiled(WEB.id).peers


def test_retagging_a_node_moves_its_access() -> None:
    c = compiler()
    changed = c.update_node(PolicyNode(3, tags=frozenset({"tag:web"}), addresses=("100.64.0.3",)))
    assert BOB.id in changed and DB.id in changed
    f = Filter(c.compiled(DB.id).rules)
    assert f.check_inbound(packet("100.64.0.3", "100.64.0.5", TCP, 1, 5432), 0.0)


def test_unchanged_update_recompiles_nothing() -> None:
    c = compiler()
    assert c.update_node(WEB) == set()


def test_incremental_result_equals_a_fresh_compile() -> None:
    c = compiler(ALL[:3])
    for n in ALL[3:]:
        c.add_node(n)
    c.update_node(PolicyNode(2, user="alice@example.com", addresses=("100.64.0.22",)))
    c.remove_node(BOB.id)
    fresh = PolicyCompiler(POLICY, c.nodes())
    for n in c.nodes():
        assert c.compiled(n.id) == fresh.compiled(n.id)


def test_set_policy_reports_only_nodes_whose_output_changed() -> None:
    c = compiler()
    new = parse_policy(POLICY.source.replace('"dst": ["tag:db:5432"]', '"dst": ["tag:db:5433"]'))
    assert c.set_policy(new) == {DB.id}
