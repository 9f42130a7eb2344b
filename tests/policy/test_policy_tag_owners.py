"""Who owns a tag, per the policy's tagOwners (what coord asks before granting a node's request)."""

from __future__ import annotations

import pytest

from wiremesh.core.control.channel import ControlError
from wiremesh.core.control.messages import check_tags
from wiremesh.core.policy import policy_from_obj

POLICY = policy_from_obj(
    {
        "groups": {"group:ops": ["bob@example.com"]},
        "tagOwners": {
            "tag:web": ["alice@example.com"],
            "tag:ops": ["group:ops"],
            "tag:any": ["autogroup:member"],
            "tag:child": ["tag:web"],
            "tag:admin-only": ["autogroup:admin"],
            "tag:nobody": [],
        },
    }
)


def test_a_user_named_in_tag_owners_owns_the_tag() -> None:
    assert POLICY.tag_owner_allows("alice@example.com", "tag:web")
    assert not POLICY.tag_owner_allows("bob@example.com", "tag:web")


def test_a_group_member_owns_the_groups_tags() -> None:
    assert POLICY.tag_owner_allows("bob@example.com", "tag:ops")
    assert not POLICY.tag_owner_allows("alice@example.com", "tag:ops")


def test_autogroup_member_owner_means_any_user() -> None:
    assert POLICY.tag_owner_allows("carol@example.com", "tag:any")
    assert not POLICY.tag_owner_allows("", "tag:any")


def test_a_tag_owned_by_a_tag_goes_to_nodes_carrying_the_owner_tag() -> None:
    assert POLICY.tag_owner_allows("carol@example.com", "tag:child", node_tags=("tag:web",))
    assert not POLICY.tag_owner_allows("carol@example.com", "tag:child")


def test_autogroup_admin_is_not_modelled_so_no_node_owns_its_tags() -> None:
    assert not POLICY.tag_owner_allows("alice@example.com", "tag:admin-only")


def test_a_tag_with_no_owners_or_not_defined_is_owned_by_nobody() -> None:
    assert not POLICY.tag_owner_allows("alice@example.com", "tag:nobody")
    assert not POLICY.tag_owner_allows("alice@example.com", "tag:undefined")


def test_undefined_tags_names_only_tags_missing_from_tag_owners() -> None:
    assert POLICY.undefined_tags(["tag:web", "tag:nope", "tag:nobody", "tag:nope"]) == ["tag:nope"]


def test_check_tags_drops_duplicates_and_refuses_malformed_tags() -> None:
    assert check_tags(["tag:a", "tag:b", "tag:a"]) == ("tag:a", "tag:b")
    for bad in (["web"], ["tag:"], ["tag:a b"], ["tag:" + "x" * 80], [f"tag:t{i}" for i in range(40)]):
        with pytest.raises(ControlError):
            check_tags(bad)
