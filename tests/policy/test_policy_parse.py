"""Policies in the shapes of Tailscale's and Headscale's documentation parse and their tests
pass; broken policies are rejected with errors pointing at the right line."""

from __future__ import annotations

import json
import pathlib
import textwrap

import pytest

from wiremesh.core.policy import (
    PolicyError,
    check_policy,
    check_policy_obj,
    parse_policy,
    policy_from_obj,
    run_tests,
)
from wiremesh.core.policy.model import Diagnostic, Policy

EXAMPLES = sorted((pathlib.Path(__file__).parent / "examples").glob("*.hujson"))


def errors(text: str) -> list[Diagnostic]:
    policy, diags = check_policy(textwrap.dedent(text))
    assert policy is None, "policy was expected to be rejected"
    return [d for d in diags if d.severity == "error"]


def only_error(text: str) -> Diagnostic:
    errs = errors(text)
    assert len(errs) == 1, [e.format() for e in errs]
    return errs[0]


def good(text: str) -> Policy:
    return parse_policy(textwrap.dedent(text))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_documentation_shaped_examples_parse_and_their_tests_pass(path: pathlib.Path) -> None:
    policy = parse_policy(path.read_text())
    assert policy.tests, "each example carries tests"
    assert run_tests(policy) == []


def test_there_are_at_least_three_examples() -> None:
    assert len(EXAMPLES) >= 3


def test_undefined_group_points_at_its_line() -> None:
    err = only_error("""\
        {
          "groups": {"group:eng": ["a@example.com"]},
          "acls": [
            {"action": "accept",
             "src": ["group:engineering"],
             "dst": ["*:*"]},
          ],
        }
        """)
    assert "group 'group:engineering' is not defined" in err.message
    assert err.pos is not None and (err.pos.line, err.pos.col) == (5, 14)


def test_tag_without_owner_points_at_its_line() -> None:
    err = only_error("""\
        {
          "tagOwners": {"tag:web": ["a@example.com"]},
          "acls": [
            {"action": "accept", "src": ["*"], "dst": ["tag:web:80"]},
            {"action": "accept", "src": ["*"], "dst": ["tag:db:5432"]},
          ],
        }
        """)
    assert "tag 'tag:db' has no owner" in err.message
    assert err.pos is not None and err.pos.line == 5


def test_undefined_host_points_at_its_line() -> None:
    err = only_error("""\
        {
          "hosts": {"db": "10.0.0.5"},
          "acls": [
            {"action": "accept", "src": ["*"],
             "dst": ["dbserver:5432"]},
          ],
        }
        """)
    assert "unknown dst 'dbserver'" in err.message
    assert err.pos is not None and err.pos.line == 5


def test_bad_port_range_points_at_its_line() -> None:
    err = only_error("""\
        {
          "acls": [
            {"action": "accept", "src": ["*"], "dst": ["*:22"]},
            {"action": "accept", "src": ["*"], "dst": ["*:2000-1000"]},
          ],
        }
        """)
    assert "first port is above last" in err.message
    assert err.pos is not None and err.pos.line == 4


def test_port_above_65535_is_rejected() -> None:
    err = only_error('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:70000"]}]}')
    assert "ports are 1-65535" in err.message


def test_destination_without_ports_says_how_to_fix_it() -> None:
    err = only_error("""\
        {
          "tagOwners": {"tag:web": []},
          "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:web"]}],
        }
        """)
    assert "has no ports" in err.message and "tag:web:*" in err.message
    assert err.pos is not None and err.pos.line == 3


def test_unsupported_action_points_at_the_action() -> None:
    err = only_error("""\
        {
          "acls": [
            {
              "action": "deny",
              "src": ["*"], "dst": ["*:*"],
            },
          ],
        }
        """)
    assert "unsupported action 'deny'" in err.message
    assert err.pos is not None and (err.pos.line, err.pos.col) == (4, 17)


def test_unknown_protocol_is_rejected() -> None:
    err = only_error('{"acls": [{"action": "accept", "proto": "tcpp", "src": ["*"], "dst": ["*:*"]}]}')
    assert "unknown protocol 'tcpp'" in err.message


def test_ports_on_a_portless_protocol_are_rejected() -> None:
    err = only_error('{"acls": [{"action": "accept", "proto": "icmp", "src": ["*"], "dst": ["*:22"]}]}')
    assert "ports must be '*'" in err.message


def test_every_error_is_reported_not_just_the_first() -> None:
    errs = errors("""\
        {
          "acls": [
            {"action": "accept", "src": ["group:a"], "dst": ["*:*"]},
            {"action": "accept", "src": ["*"], "dst": ["tag:b:*"]},
            {"action": "accept", "src": ["*"], "dst": ["*:x"]},
          ],
        }
        """)
    assert sorted(e.pos.line for e in errs if e.pos) == [3, 4, 5]


def test_syntax_error_is_reported_with_line() -> None:
    err = only_error('{\n  "acls": [\n    {"action": "accept"\n     "src": ["*"]}\n  ]\n}')
    assert err.pos is not None and err.pos.line == 4


def test_unknown_section_is_an_error() -> None:
    err = only_error('{\n  "acl": []\n}')
    assert "unknown section 'acl'" in err.message
    assert err.pos is not None and err.pos.line == 2


def test_unimplemented_harmless_sections_are_warnings() -> None:
    policy, diags = check_policy('{"ssh": [], "nodeAttrs": [], "derpMap": {}, "acls": []}')
    assert policy is not None
    warned = {d.message.split("'")[1] for d in diags if d.severity == "warning"}
    assert warned == {"ssh", "nodeAttrs", "derpMap"}


def test_posture_conditions_are_errors_because_ignoring_them_would_widen_access() -> None:
    err = only_error('{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "srcPosture": ["posture:x"]}]}')
    assert "srcPosture is not supported" in err.message


def test_grant_via_is_an_error() -> None:
    err = only_error('{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"], "via": ["tag:r"]}]}')
    assert "via" in err.message


def test_grant_app_capabilities_are_reported_unsupported() -> None:
    policy, diags = check_policy(
        '{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["tcp:443"], "app": {"example.com/cap": [{}]}}]}'
    )
    assert policy is not None
    assert any("application capabilities" in d.message for d in diags if d.severity == "warning")


def test_bad_grant_ip_entry_points_at_it() -> None:
    err = only_error('{"grants": [{"src": ["*"], "dst": ["*"],\n "ip": ["tcp:22", "icmp:8"]}]}')
    assert "ports must be '*'" in err.message
    assert err.pos is not None and err.pos.line == 2


def test_autogroup_internet_is_a_destination_only() -> None:
    err = only_error('{"acls": [{"action": "accept", "src": ["autogroup:internet"], "dst": ["*:*"]}]}')
    assert "autogroup:internet can only be used as a destination" in err.message


def test_autogroup_self_as_source_is_rejected() -> None:
    err = only_error('{"acls": [{"action": "accept", "src": ["autogroup:self"], "dst": ["*:*"]}]}')
    assert "only be used as a destination" in err.message


def test_nested_groups_are_rejected() -> None:
    err = only_error('{"groups": {"group:a": ["x@y"], "group:b": ["group:a"]}}')
    assert "cannot contain other groups" in err.message


def test_ipset_with_a_cycle_is_rejected() -> None:
    errs = errors('{"ipsets": {"ipset:a": ["ipset:b"], "ipset:b": ["ipset:a"]}}')
    assert any("refers to itself" in e.message for e in errs)


def test_ipset_remove_excludes_addresses() -> None:
    policy = good("""\
        {"ipsets": {"ipset:lan": ["10.0.0.0/24", "remove 10.0.0.128/25"]}}
        """)
    assert [str(n) for n in policy.ipsets["ipset:lan"]] == ["10.0.0.0/25"]


def test_legacy_users_and_ports_fields_are_accepted() -> None:
    policy = good('{"acls": [{"action": "accept", "users": ["*"], "ports": ["*:22"]}]}')
    assert len(policy.rules) == 1


def test_ipv6_destination_with_port_splits_at_the_last_colon() -> None:
    policy = good(
        '{"acls": [{"action": "accept", "src": ["*"], "dst": ["fd7a:115c:a1e0::1:22", "[fd7a::2]:80"]}]}'
    )
    assert len(policy.rules) == 2


def test_failing_policy_test_is_named_with_its_line() -> None:
    policy = good("""\
        {
          "tagOwners": {"tag:web": []},
          "acls": [{"action": "accept", "src": ["a@example.com"], "dst": ["tag:web:443"]}],
          "tests": [
            {"src": "a@example.com", "accept": ["tag:web:443"]},
            {"src": "a@example.com",
             "accept": ["tag:web:80"]},
          ],
        }
        """)
    failures = run_tests(policy)
    assert len(failures) == 1
    assert failures[0].index == 1
    assert "expected accept, but it is denied" in failures[0].message
    assert failures[0].pos is not None and failures[0].pos.line == 7


def test_deny_test_fails_when_access_is_granted() -> None:
    policy = good("""\
        {
          "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
          "tests": [{"src": "a@example.com", "deny": ["b@example.com:22"]}],
        }
        """)
    [failure] = run_tests(policy)
    assert "expected deny, but it is accepted" in failure.message


def test_tagged_test_source_does_not_act_as_a_user() -> None:
    policy = good("""\
        {
          "tagOwners": {"tag:ci": ["a@example.com"]},
          "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["*:22"]}],
          "tests": [{"src": "tag:ci", "deny": ["10.0.0.1:22"]}, {"src": "a@example.com", "accept": ["10.0.0.1:22"]}],
        }
        """)
    assert run_tests(policy) == []


def test_policy_from_decoded_structure_validates_too() -> None:
    with pytest.raises(PolicyError, match="not defined"):
        policy_from_obj({"acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]})


def test_tag_owner_allows_users_and_group_members() -> None:
    policy = good("""\
        {
          "groups": {"group:ops": ["b@example.com"]},
          "tagOwners": {"tag:a": ["a@example.com", "group:ops"], "tag:b": []},
        }
        """)
    assert policy.tag_owner_allows("a@example.com", "tag:a")
    assert policy.tag_owner_allows("b@example.com", "tag:a")
    assert not policy.tag_owner_allows("c@example.com", "tag:a")
    assert not policy.tag_owner_allows("a@example.com", "tag:b")


def test_autogroup_self_with_address_sources_is_rejected() -> None:
    err = only_error(
        '{"hosts": {"h": "10.0.0.1"},\n "acls": [{"action": "accept", "src": ["h"], "dst": ["autogroup:self:*"]}]}'
    )
    assert "autogroup:self needs sources" in err.message
    assert err.pos is not None and err.pos.line == 2


def test_ipset_removals_that_explode_are_bounded() -> None:
    removes = [f"remove fd00:{i:x}::1" for i in range(1, 2000)]
    errs = errors(json.dumps({"ipsets": {"ipset:big": ["fd00::/16", *removes]}}))
    assert any("more than" in e.message for e in errs)


def test_ipset_remove_in_the_middle_leaves_both_sides() -> None:
    policy = good('{"ipsets": {"ipset:x": ["10.0.0.0/30", "remove 10.0.0.1", "remove 10.0.0.2"]}}')
    assert [str(n) for n in policy.ipsets["ipset:x"]] == ["10.0.0.0/32", "10.0.0.3/32"]


def test_test_whose_source_names_nobody_fails() -> None:
    policy = good(
        '{"groups": {"group:empty": []}, "tests": [{"src": "group:empty", "accept": ["10.0.0.1:22"]}]}'
    )
    [failure] = run_tests(policy)
    assert "names nobody" in failure.message


def test_decoded_structure_errors_name_their_place_in_the_structure() -> None:
    policy, diags = check_policy_obj({"acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]})
    assert policy is None
    assert diags[0].format("acl/default") == (
        "acl/default: acls[0].src[0]: error: group 'group:x' is not defined in groups"
        " (an identity provider's group is written group:NAME@DOMAIN)"
    )


def test_bad_port_after_a_tag_is_reported_as_a_bad_port() -> None:
    err = only_error(
        '{"tagOwners": {"tag:web": []}, "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:web:http"]}]}'
    )
    assert "bad port 'http'" in err.message
