"""Compressing a rule's source set into CIDR prefixes keeps exactly the same members."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from wiremesh.core.policy import PolicyCompiler, PolicyNode, policy_from_obj
from wiremesh.core.policy.prefixes import compress_hosts, compress_prefixes

V4_BASE = int(ipaddress.IPv4Address("100.64.0.0"))
V6_BASE = int(ipaddress.IPv6Address("fd7a:115c:a1e0::"))
UNIVERSE = 256  # addresses per version the property looks at: small enough to probe every one


@st.composite
def prefix_sets(draw: st.DrawFn) -> list[str]:
    out = []
    for _ in range(draw(st.integers(0, 24))):
        version = draw(st.sampled_from([4, 6]))
        bits = 32 if version == 4 else 128
        plen = draw(st.integers(bits - 8, bits))
        offset = draw(st.integers(0, UNIVERSE - 1))
        if version == 4:
            out.append(f"{ipaddress.IPv4Address(V4_BASE + offset)}/{plen}")
        else:
            out.append(f"{ipaddress.IPv6Address(V6_BASE + offset)}/{plen}")
    return out


def members(prefixes: list[str] | tuple[str, ...]) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    nets = [ipaddress.ip_network(p, strict=False) for p in prefixes]
    probes = [ipaddress.IPv4Address(V4_BASE + i) for i in range(-1, UNIVERSE + 1)]
    probes += [ipaddress.IPv6Address(V6_BASE + i) for i in range(-1, UNIVERSE + 1)]
    return {ip for ip in probes if any(ip.version == n.version and ip in n for n in nets)}


@settings(max_examples=300, deadline=None)
@given(prefix_sets())
def test_compression_keeps_exactly_the_same_addresses(prefixes: list[str]) -> None:
    assert members(compress_prefixes(prefixes)) == members(prefixes)


@settings(max_examples=300, deadline=None)
@given(prefix_sets())
def test_compression_is_the_minimal_cidr_cover(prefixes: list[str]) -> None:
    nets = [ipaddress.ip_network(p, strict=False) for p in prefixes]
    expected = [str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == 4)]
    expected += [str(n) for n in ipaddress.collapse_addresses(n for n in nets if n.version == 6)]
    assert list(compress_prefixes(prefixes)) == expected


def test_sequential_addresses_collapse_to_a_few_prefixes() -> None:
    addresses = [str(ipaddress.IPv4Address(V4_BASE + i)) for i in range(1, 1001)]
    assert compress_prefixes(addresses) == (
        "100.64.0.1/32",
        "100.64.0.2/31",
        "100.64.0.4/30",
        "100.64.0.8/29",
        "100.64.0.16/28",
        "100.64.0.32/27",
        "100.64.0.64/26",
        "100.64.0.128/25",
        "100.64.1.0/24",
        "100.64.2.0/24",
        "100.64.3.0/25",
        "100.64.3.128/26",
        "100.64.3.192/27",
        "100.64.3.224/29",
        "100.64.3.232/32",
    )


def test_shared_server_filter_names_few_prefixes_for_many_sources() -> None:
    policy = policy_from_obj(
        {
            "tagOwners": {"tag:hub": []},
            "acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:hub:443"]}],
        }
    )
    nodes = [PolicyNode(1, user="ops", tags=frozenset({"tag:hub"}), addresses=("100.64.0.1",))]
    nodes += [
        PolicyNode(i, user=f"u{i % 7}", addresses=(str(ipaddress.IPv4Address(V4_BASE + i)),))
        for i in range(2, 2001)
    ]
    rules = PolicyCompiler(policy, nodes).compiled(1).rules
    assert len(rules) == 1
    assert len(rules[0].src) <= 22  # a run of N addresses needs at most 2*log2(N) prefixes, not N
    nets = [ipaddress.ip_network(p) for p in rules[0].src]
    covered = {i for i in range(0, 2100) if any(ipaddress.IPv4Address(V4_BASE + i) in n for n in nets)}
    assert covered == set(range(2, 2001))


@settings(max_examples=300, deadline=None)
@given(st.sets(st.integers(0, UNIVERSE - 1)), st.sets(st.integers(0, UNIVERSE - 1)))
def test_host_compression_matches_the_general_one(v4: set[int], v6: set[int]) -> None:
    hosts = [str(ipaddress.IPv4Address(V4_BASE + i)) for i in v4]
    hosts += [str(ipaddress.IPv6Address(V6_BASE + i)) for i in v6]
    assert compress_hosts([V4_BASE + i for i in v4], [V6_BASE + i for i in v6]) == compress_prefixes(hosts)
