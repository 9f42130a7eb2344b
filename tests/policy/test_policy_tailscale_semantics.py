"""Where an outside check of Tailscale policy files found our engine disagreeing with Tailscale,
it now agrees. Facts cross-checked against Headscale's captures of Tailscale's own answers
(hscontrol/policy/v2/testdata/policytest_results: proto-empty, ipv6-literal-dst, cidr-dst,
host-alias-cidr-dst, prefix32-dst, missing-accept-and-deny)."""

from __future__ import annotations

import textwrap

from wiremesh.core.policy import check_policy, parse_policy, run_tests
from wiremesh.core.policy.model import Diagnostic


def errors(text: str) -> list[Diagnostic]:
    policy, diags = check_policy(textwrap.dedent(text))
    assert policy is None, "policy was expected to be rejected"
    return [d for d in diags if d.severity == "error"]


def failures(text: str) -> list[str]:
    return [f.message for f in run_tests(parse_policy(textwrap.dedent(text)))]


# ---- 1. a test without `proto` passes when any default protocol is allowed ----


def test_test_without_proto_accepts_a_udp_only_rule() -> None:
    assert (
        failures("""\
        {
          "tagOwners": {"tag:dns": []},
          "acls": [{"action": "accept", "proto": "udp", "src": ["a@example.com"], "dst": ["tag:dns:53"]}],
          "tests": [{"src": "a@example.com", "accept": ["tag:dns:53"]}],
        }
        """)
        == []
    )


def test_test_without_proto_accepts_an_icmp_only_rule() -> None:
    assert (
        failures("""\
        {
          "acls": [{"action": "accept", "proto": "icmp", "src": ["a@example.com"], "dst": ["10.0.0.1:*"]}],
          "tests": [{"src": "a@example.com", "accept": ["10.0.0.1:22"]}],
        }
        """)
        == []
    )


def test_deny_without_proto_fails_when_any_default_protocol_is_allowed() -> None:
    [message] = failures("""\
        {
          "acls": [{"action": "accept", "proto": "udp", "src": ["a@example.com"], "dst": ["10.0.0.1:53"]}],
          "tests": [{"src": "a@example.com", "deny": ["10.0.0.1:53"]}],
        }
        """)
    assert "expected deny, but it is accepted" in message


def test_test_with_explicit_tcp_still_needs_tcp() -> None:
    [message] = failures("""\
        {
          "acls": [{"action": "accept", "proto": "udp", "src": ["a@example.com"], "dst": ["10.0.0.1:53"]}],
          "tests": [{"src": "a@example.com", "proto": "tcp", "accept": ["10.0.0.1:53"]}],
        }
        """)
    assert "expected accept, but it is denied" in message


# ---- 2. IPv6 test destinations are evaluated against IPv6 rules ----


def test_bracketed_ipv6_destination_is_checked_with_an_ipv6_source() -> None:
    assert (
        failures("""\
        {
          "tagOwners": {"tag:client": []},
          "grants": [{"src": ["tag:client"], "dst": ["fd7a:115c:a1e0::10"], "ip": ["tcp:22"]}],
          "tests": [{"src": "tag:client", "accept": ["[fd7a:115c:a1e0::10]:22"], "deny": ["[fd7a:115c:a1e0::10]:23"]}],
        }
        """)
        == []
    )


def test_host_alias_bound_to_an_ipv6_address_is_checked_with_an_ipv6_source() -> None:
    assert (
        failures("""\
        {
          "hosts": {"db6": "fd00:1::5"},
          "acls": [{"action": "accept", "src": ["a@example.com"], "dst": ["db6:5432"]}],
          "tests": [{"src": "a@example.com", "accept": ["db6:5432"], "deny": ["db6:22"]}],
        }
        """)
        == []
    )


def test_ipv6_destination_is_denied_when_only_ipv4_is_opened() -> None:
    [message] = failures("""\
        {
          "hosts": {"db4": "10.0.0.5", "db6": "fd00:1::5"},
          "acls": [{"action": "accept", "src": ["a@example.com"], "dst": ["db4:5432"]}],
          "tests": [{"src": "a@example.com", "accept": ["db6:5432"]}],
        }
        """)
    assert "expected accept, but it is denied" in message


# ---- 3. a test entry with neither accept nor deny is invalid ----


def test_test_without_accept_or_deny_is_invalid() -> None:
    [err] = errors("""\
        {
          "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
          "tests": [
            {"src": "a@example.com"},
          ],
        }
        """)
    assert "neither 'accept' nor 'deny'" in err.message
    assert err.pos is not None and err.pos.line == 4


def test_test_with_only_empty_lists_is_invalid() -> None:
    [err] = errors('{"tests": [{"src": "a@example.com", "accept": [], "deny": []}]}')
    assert "neither 'accept' nor 'deny'" in err.message


# ---- 4. port 0 is invalid ('*' means every port) ----


def test_port_zero_in_an_acl_destination_is_invalid() -> None:
    [err] = errors('{"acls": [{"action": "accept", "src": ["*"], "dst": ["10.0.0.1:0"]}]}')
    assert "port 0" in err.message and "'*'" in err.message


def test_port_range_starting_at_zero_is_invalid() -> None:
    [err] = errors('{"acls": [{"action": "accept", "src": ["*"], "dst": ["10.0.0.1:0-1023"]}]}')
    assert "port 0" in err.message


def test_port_zero_in_a_grant_is_invalid() -> None:
    [err] = errors('{"grants": [{"src": ["*"], "dst": ["10.0.0.1"], "ip": ["tcp:0"]}]}')
    assert "port 0" in err.message


def test_port_zero_in_a_test_destination_is_invalid() -> None:
    [err] = errors("""\
        {
          "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
          "tests": [{"src": "a@example.com", "accept": ["10.0.0.1:0"]}],
        }
        """)
    assert "port 0" in err.message


# ---- 5. a test destination is a single host, never a CIDR ----


def test_cidr_test_destination_is_invalid_even_when_a_rule_opens_it() -> None:
    [err] = errors("""\
        {
          "tagOwners": {"tag:client": []},
          "grants": [{"src": ["tag:client"], "dst": ["10.0.0.0/8"], "ip": ["tcp:22"]}],
          "tests": [{"src": "tag:client", "accept": ["10.0.0.0/8:22"]}],
        }
        """)
    assert "single host" in err.message


def test_slash_32_test_destination_is_invalid_too() -> None:
    [err] = errors('{"tests": [{"src": "a@example.com", "deny": ["100.64.0.16/32:22"]}]}')
    assert "single host" in err.message


def test_host_alias_bound_to_a_cidr_is_not_a_test_destination() -> None:
    [err] = errors("""\
        {
          "hosts": {"internal": "10.0.0.0/8"},
          "acls": [{"action": "accept", "src": ["*"], "dst": ["internal:22"]}],
          "tests": [{"src": "a@example.com", "accept": ["internal:22"]}],
        }
        """)
    assert "single host" in err.message


def test_host_alias_bound_to_one_address_is_a_test_destination() -> None:
    assert (
        failures("""\
        {
          "hosts": {"webserver": "100.64.0.16"},
          "acls": [{"action": "accept", "src": ["a@example.com"], "dst": ["webserver:443"]}],
          "tests": [{"src": "a@example.com", "accept": ["webserver:443"], "deny": ["webserver:22"]}],
        }
        """)
        == []
    )


def test_deny_without_proto_holds_on_another_port_of_a_host_the_source_may_ping() -> None:
    # web:443 without proto opens ICMP to web too, but a test compares its port with the
    # rule's ports for every protocol (as Tailscale's test runner does).
    assert (
        failures("""\
        {
          "hosts": {"web": "10.0.0.8"},
          "acls": [{"action": "accept", "src": ["a@example.com"], "dst": ["web:443"]}],
          "tests": [{"src": "a@example.com", "accept": ["web:443"], "deny": ["web:22"]}],
        }
        """)
        == []
    )
