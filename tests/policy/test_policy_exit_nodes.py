"""Exit nodes in the policy: autogroup:internet governs who may use one; `*` includes it (as in
Tailscale); an exit node's 0.0.0.0/0 never makes it a source or a subnet of its own."""

from __future__ import annotations

from policy_packets import TCP, packet

from wiremesh.core.packetfilter import Filter
from wiremesh.core.policy import PolicyCompiler, PolicyNode, evaluate, parse_policy

INTERNET_POLICY = parse_policy("""
{
  "groups": {"group:travel": ["alice@example.com"]},
  "tagOwners": {"tag:exit": []},
  "acls": [
    {"action": "accept", "src": ["group:travel"], "dst": ["autogroup:internet:*"]},
  ],
}
""")
EVERYTHING = parse_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')

ALICE = PolicyNode(1, user="alice@example.com", addresses=("100.64.0.1", "fd7a:115c:a1e0::1"))
BOB = PolicyNode(2, user="bob@example.com", addresses=("100.64.0.2",))
EXIT = PolicyNode(
    3,
    tags=frozenset({"tag:exit"}),
    addresses=("100.64.0.3", "fd7a:115c:a1e0::3"),
    routes=("0.0.0.0/0", "::/0"),
)
NODES = [ALICE, BOB, EXIT]
PUBLIC = "198.18.0.7"


def exit_filter(policy=INTERNET_POLICY) -> Filter:
    return Filter(PolicyCompiler(policy, NODES).compiled(EXIT.id).rules)


def test_autogroup_internet_lets_the_named_users_forward_through_the_exit_node() -> None:
    f = exit_filter()
    assert f.check_inbound(packet("100.64.0.1", PUBLIC, TCP, 40000, 443), 0.0)
    assert f.check_inbound(packet("fd7a:115c:a1e0::1", "2001:2::9", TCP, 40000, 443), 0.0)


def test_autogroup_internet_denies_everyone_else() -> None:
    assert not exit_filter().check_inbound(packet("100.64.0.2", PUBLIC, TCP, 40000, 443), 0.0)


def test_autogroup_internet_is_not_private_space_nor_the_exit_node_itself() -> None:
    f = exit_filter()
    for private in ("10.1.2.3", "192.168.1.1", "172.16.0.1", "100.64.0.3", "127.0.0.1"):
        assert not f.check_inbound(packet("100.64.0.1", private, TCP, 40000, 22), 0.0), private


def test_only_users_of_the_exit_node_see_it_as_a_peer() -> None:
    c = PolicyCompiler(INTERNET_POLICY, NODES)
    assert c.compiled(ALICE.id).peers == {EXIT.id}
    assert c.compiled(BOB.id).peers == frozenset()
    assert c.compiled(EXIT.id).peers == {ALICE.id}


def test_star_destination_includes_the_internet_through_exit_nodes() -> None:
    f = exit_filter(EVERYTHING)
    assert f.check_inbound(packet("100.64.0.2", PUBLIC, TCP, 40000, 80), 0.0)
    assert f.check_inbound(packet("100.64.0.2", "10.9.9.9", TCP, 40000, 80), 0.0)


def test_an_exit_node_is_not_a_source_for_address_rules() -> None:
    # "0.0.0.0/0 overlaps everything" must not make the exit node a member of every src prefix.
    policy = parse_policy("""
    {"tagOwners": {"tag:exit": []},
     "acls": [{"action": "accept", "src": ["10.0.0.0/8"], "dst": ["alice@example.com:*"]}]}
    """)
    c = PolicyCompiler(policy, NODES)
    assert EXIT.id not in c.compiled(ALICE.id).peers


def test_adding_an_exit_route_incrementally_matches_a_full_compile() -> None:
    plain_exit = PolicyNode(3, tags=frozenset({"tag:exit"}), addresses=("100.64.0.3",))
    c = PolicyCompiler(INTERNET_POLICY, [ALICE, BOB, plain_exit])
    assert c.compiled(ALICE.id).peers == frozenset()
    changed = c.update_node(EXIT)
    assert {ALICE.id, EXIT.id} <= changed
    full = PolicyCompiler(INTERNET_POLICY, NODES)
    for n in NODES:
        assert c.compiled(n.id) == full.compiled(n.id)


def test_direct_evaluation_agrees_on_internet_destinations() -> None:
    assert evaluate(INTERNET_POLICY, NODES, "100.64.0.1", PUBLIC, TCP, 443)
    assert not evaluate(INTERNET_POLICY, NODES, "100.64.0.2", PUBLIC, TCP, 443)
    assert not evaluate(INTERNET_POLICY, NODES, "100.64.0.1", "10.0.0.1", TCP, 443)
    # A mesh node's own address is not "the internet".
    assert not evaluate(INTERNET_POLICY, NODES, "100.64.0.1", "100.64.0.3", TCP, 443)
