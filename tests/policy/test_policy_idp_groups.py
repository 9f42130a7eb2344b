"""Identity-provider groups in the policy, as Tailscale and Headscale name them:
`group:NAME@DOMAIN`, not defined in `groups`, whose members are the users the IdP put in that
group at their last login (coord hands them to the engine as PolicyNode.groups)."""

from __future__ import annotations

import textwrap

import pytest

from wiremesh.core.policy import PolicyCompiler, PolicyNode, check_policy, evaluate, parse_policy, run_tests
from wiremesh.core.policy.model import TCP, IdpGroupSel

ALICE = PolicyNode(1, "alice@example.com", addresses=("100.64.0.1", "fd7a:115c:a1e0::1"),
                   groups=frozenset({"engineering@example.com"}))  # fmt: skip
BOB = PolicyNode(2, "bob@example.com", addresses=("100.64.0.2", "fd7a:115c:a1e0::2"),
                 groups=frozenset({"ops@example.com"}))  # fmt: skip
SERVER = PolicyNode(3, "alice@example.com", tags=frozenset({"tag:server"}), addresses=("100.64.0.3", "fd7a:115c:a1e0::3"),
                    groups=frozenset({"engineering@example.com"}))  # fmt: skip


def policy(src: str, extra: str = "") -> str:
    return (
        '{"tagOwners": {"tag:server": []}, '
        f'"acls": [{{"action": "accept", "src": ["{src}"], "dst": ["tag:server:22"]}}]{extra}}}'
    )


def test_idp_group_reaches_its_members_nodes_only() -> None:
    p = parse_policy(policy("group:engineering@example.com"))
    nodes = [ALICE, BOB, SERVER]
    assert evaluate(p, nodes, "100.64.0.1", "100.64.0.3", TCP, 22)
    assert not evaluate(p, nodes, "100.64.0.2", "100.64.0.3", TCP, 22)
    compiled = PolicyCompiler(p, nodes).compiled(SERVER.id)
    [rule] = compiled.packet_filter()
    assert rule["src"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128"]


def test_idp_group_reference_folds_ascii_case_only() -> None:
    assert parse_policy(policy("group:Engineering@Example.COM")).rules[0].src == (
        IdpGroupSel("engineering@example.com"),
    )
    # The Kelvin sign folds to 'k' under full Unicode case folding: it must not here.
    kelvin = parse_policy(policy("group:\u212aube@example.com")).rules[0].src[0]
    assert kelvin == IdpGroupSel("\u212aube@example.com")


def test_tagged_node_of_a_member_is_not_in_the_group() -> None:
    p = parse_policy(
        '{"tagOwners": {"tag:server": []}, "acls": [{"action": "accept", "src": ["*"], '
        '"dst": ["group:engineering@example.com:80"]}]}'
    )
    nodes = [ALICE, BOB, SERVER]
    assert evaluate(p, nodes, "100.64.0.2", "100.64.0.1", TCP, 80)
    assert not evaluate(p, nodes, "100.64.0.2", "100.64.0.3", TCP, 80)


def test_group_nobody_is_in_grants_nothing() -> None:
    p = parse_policy(policy("group:nobody@example.com"))
    # The one rule that matches nothing: the node may receive nothing.
    assert PolicyCompiler(p, [ALICE, BOB, SERVER]).compiled(SERVER.id).packet_filter() == [
        {"src": [], "dst": [], "proto": [], "ports": []}
    ]


def test_idp_membership_never_joins_a_group_the_policy_defines() -> None:
    # A policy group of the same name (even one with an @) keeps only its listed members.
    text = (
        '{"groups": {"group:engineering@example.com": ["bob@example.com"]}, "tagOwners": {"tag:server": []},'
        ' "acls": [{"action": "accept", "src": ["group:engineering@example.com"], "dst": ["tag:server:22"]}]}'
    )
    p = parse_policy(text)
    nodes = [ALICE, BOB, SERVER]
    assert evaluate(p, nodes, "100.64.0.2", "100.64.0.3", TCP, 22)
    assert not evaluate(p, nodes, "100.64.0.1", "100.64.0.3", TCP, 22)


@pytest.mark.parametrize("ref", ["group:typo", "group:eng@", "group:@example.com", "group:eng@a@b"])
def test_undefined_group_that_is_not_an_idp_group_name_is_an_error(ref: str) -> None:
    _, diags = check_policy(policy(ref))
    [err] = [d for d in diags if d.severity == "error"]
    assert "not defined in groups" in err.message


def test_membership_change_recompiles_the_filter() -> None:
    p = parse_policy(policy("group:engineering@example.com"))
    compiler = PolicyCompiler(p, [ALICE, BOB, SERVER])
    bob_joins = PolicyNode(
        2, BOB.user, addresses=BOB.addresses, groups=frozenset({"engineering@example.com"})
    )
    changed = compiler.update_node(bob_joins)
    assert SERVER.id in changed
    [rule] = compiler.compiled(SERVER.id).packet_filter()
    assert rule["src"] == ["100.64.0.1/32", "100.64.0.2/32", "fd7a:115c:a1e0::1/128", "fd7a:115c:a1e0::2/128"]
    alice_leaves = PolicyNode(1, ALICE.user, addresses=ALICE.addresses)
    assert SERVER.id in compiler.update_node(alice_leaves)
    [rule] = compiler.compiled(SERVER.id).packet_filter()
    assert rule["src"] == ["100.64.0.2/32", "fd7a:115c:a1e0::2/128"]


def test_idp_group_owns_a_tag() -> None:
    p = parse_policy('{"tagOwners": {"tag:server": ["group:engineering@example.com"]}}')
    assert p.tag_owner_allows("alice@example.com", "tag:server", (), frozenset({"engineering@example.com"}))
    assert not p.tag_owner_allows("bob@example.com", "tag:server", (), frozenset({"ops@example.com"}))


def test_policy_tests_can_name_an_idp_group_as_source() -> None:
    text = textwrap.dedent("""\
        {
          "tagOwners": {"tag:server": []},
          "acls": [{"action": "accept", "src": ["group:engineering@example.com"], "dst": ["tag:server:22"]}],
          "tests": [
            {"src": "group:engineering@example.com", "proto": "tcp", "accept": ["tag:server:22"], "deny": ["tag:server:80"]},
            {"src": "bob@example.com", "proto": "tcp", "deny": ["tag:server:22"]},
          ],
        }
        """)
    assert run_tests(parse_policy(text)) == []
