"""The policy's autoApprovers: which advertised routes and exit nodes coord approves by itself."""

from __future__ import annotations

import pytest

from wiremesh.core.policy import PolicyNode, auto_approved, check_policy, parse_policy

POLICY = parse_policy(
    """{
  "groups": {"group:net": ["bob@example.com"]},
  "hosts": {"office": "192.168.10.0/24"},
  "tagOwners": {"tag:router": [], "tag:exit": [], "tag:other": []},
  "autoApprovers": {
    "routes": {
      "10.0.0.0/8": ["tag:router"],
      "172.16.5.0/24": ["alice@example.com", "group:net"],
      "office": ["autogroup:member"],
      "fd00:1::/64": ["tag:router"],
    },
    "exitNode": ["tag:exit", "carol@example.com"],
  },
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}"""
)


def node(user: str = "", tags: tuple[str, ...] = ()) -> PolicyNode:
    return PolicyNode(id=1, user=user, tags=frozenset(tags))


def test_a_route_inside_an_approved_prefix_is_approved_for_the_named_tag() -> None:
    router = node("dave@example.com", ("tag:router",))
    assert auto_approved(POLICY, router, ("10.20.0.0/16", "10.0.0.0/8")) == ("10.20.0.0/16", "10.0.0.0/8")


def test_a_route_wider_than_the_approved_prefix_is_not_approved() -> None:
    router = node("dave@example.com", ("tag:router",))
    assert auto_approved(POLICY, router, ("10.0.0.0/7",)) == ()


def test_a_node_the_entry_does_not_name_gets_nothing() -> None:
    assert auto_approved(POLICY, node("dave@example.com"), ("10.1.0.0/16",)) == ()
    assert auto_approved(POLICY, node("dave@example.com", ("tag:other",)), ("10.1.0.0/16",)) == ()


def test_users_and_groups_approve_their_untagged_nodes() -> None:
    assert auto_approved(POLICY, node("alice@example.com"), ("172.16.5.0/24",)) == ("172.16.5.0/24",)
    assert auto_approved(POLICY, node("bob@example.com"), ("172.16.5.128/25",)) == ("172.16.5.128/25",)


def test_a_tagged_node_is_not_approved_by_its_users_entry() -> None:
    # Tagged nodes belong to their tags only, here as in acls.
    tagged = node("alice@example.com", ("tag:other",))
    assert auto_approved(POLICY, tagged, ("172.16.5.0/24",)) == ()


def test_a_host_alias_names_the_prefix_and_autogroup_member_any_user() -> None:
    assert auto_approved(POLICY, node("zed@example.com"), ("192.168.10.0/24",)) == ("192.168.10.0/24",)
    assert auto_approved(POLICY, node("zed@example.com", ("tag:router",)), ("192.168.10.0/24",)) == ()


def test_ipv6_routes_are_approved_like_ipv4() -> None:
    router = node(tags=("tag:router",))
    assert auto_approved(POLICY, router, ("fd00:1::/64", "fd00:2::/64")) == ("fd00:1::/64",)


def test_exit_routes_are_approved_only_through_exit_node() -> None:
    exit_routes = ("0.0.0.0/0", "::/0")
    assert auto_approved(POLICY, node(tags=("tag:exit",)), exit_routes) == exit_routes
    assert auto_approved(POLICY, node("carol@example.com"), exit_routes) == exit_routes
    # A router approved for 10.0.0.0/8 is not thereby an exit node.
    assert auto_approved(POLICY, node(tags=("tag:router",)), exit_routes) == ()


def test_no_policy_or_no_auto_approvers_approves_nothing() -> None:
    assert auto_approved(None, node("alice@example.com"), ("172.16.5.0/24",)) == ()
    plain = parse_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')
    assert auto_approved(plain, node(tags=("tag:router",)), ("10.0.0.0/24", "0.0.0.0/0")) == ()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ('{"routes": {"not-a-prefix": ["tag:r"]}}', "is not a CIDR, host alias or ipset"),
        ('{"routes": {"0.0.0.0/0": ["tag:r"]}}', "exit nodes are approved by 'exitNode'"),
        ('{"routes": {"10.0.0.0/8": ["tag:undefined"]}}', "has no owner"),
        ('{"routes": {"10.0.0.0/8": ["*"]}}', "must be a user, group:, tag:"),
        ('{"exitNode": ["10.0.0.1"]}', "must be a user, group:, tag:"),
        ('{"exitNode": "tag:r"}', "must be a list of strings"),
        ('{"services": {}}', "unknown field 'services'"),
    ],
)
def test_malformed_auto_approvers_are_errors_with_their_location(section: str, message: str) -> None:
    text = '{"tagOwners": {"tag:r": []},\n "autoApprovers": ' + section + "}"
    policy, diags = check_policy(text)
    errors = [d for d in diags if d.severity == "error"]
    assert policy is None
    assert any(message in d.message for d in errors), errors
    assert all(d.pos is not None and d.pos.line == 2 for d in errors)
