"""Property: the compiled per-node filter (run through packetfilter.Filter on synthesised
packets) agrees with direct evaluation of the policy, for random small node sets, random
policies and random (source, destination, protocol, port) tuples."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from policy_packets import packet

from wiremesh.core.packetfilter import Filter
from wiremesh.core.policy import Evaluator, PolicyCompiler, PolicyNode, policy_from_obj

USERS = ["a@example.com", "b@example.com", "c@"]
TAGS = ["tag:t1", "tag:t2"]
ROUTES = ["10.0.0.0/24", "10.0.1.0/24", "10.0.0.0/16"]
SOURCES = [
    "*",
    "a@example.com",
    "c@",
    "group:g",
    "group:eng@example.com",  # an identity provider's group (PolicyNode.groups)
    "tag:t1",
    "tag:t2",
    "autogroup:member",
    "autogroup:tagged",
    "h1",
    "10.0.0.0/24",
    "100.64.0.0/30",
    "fd7a:115c:a1e0::/126",
]
DESTS = [*SOURCES, "autogroup:self", "h2"]
# autogroup:self only takes identity sources (users, groups, autogroups, *).
IDENTITY_SOURCES = [
    s for s in SOURCES if s == "*" or "@" in s or s.startswith(("group:", "tag:", "autogroup:"))
]
PORTS = ["*", "22", "22,80", "1000-2000", "80", "53"]
ACL_PROTOS = [None, "tcp", "udp", "icmp", "17"]
GRANT_IPS = ["*", "tcp:22", "udp:53", "icmp:*", "80", "tcp:1000-2000", "47:*"]
EXTERNAL = ["10.0.0.5", "10.0.1.9", "203.0.113.1", "fd7a:115c:a1e0::99"]
PROTOS = [6, 17, 1, 47]
PACKET_PORTS = [0, 22, 53, 80, 1500, 2001]


@st.composite
def nodes(draw: st.DrawFn) -> list[PolicyNode]:
    count = draw(st.integers(2, 6))
    out = []
    for i in range(1, count + 1):
        tagged = draw(st.booleans())
        tags = frozenset(draw(st.sets(st.sampled_from(TAGS), min_size=1))) if tagged else frozenset()
        user = draw(st.sampled_from(USERS))
        addresses = [f"100.64.0.{i}"]
        if draw(st.booleans()):
            addresses.append(f"fd7a:115c:a1e0::{i}")
        routes = tuple(draw(st.lists(st.sampled_from(ROUTES), max_size=1)))
        groups = frozenset(draw(st.sets(st.sampled_from(["eng@example.com", "ops@example.com"]))))
        out.append(
            PolicyNode(i, user=user, tags=tags, addresses=tuple(addresses), routes=routes, groups=groups)
        )
    return out


@st.composite
def policies(draw: st.DrawFn) -> dict:
    acls = []
    for _ in range(draw(st.integers(0, 4))):
        dests = draw(st.lists(st.sampled_from(DESTS), min_size=1, max_size=2))
        sources = IDENTITY_SOURCES if "autogroup:self" in dests else SOURCES
        acl: dict[str, Any] = {
            "action": "accept",
            "src": draw(st.lists(st.sampled_from(sources), min_size=1, max_size=3)),
            "dst": [],
        }
        proto = draw(st.sampled_from(ACL_PROTOS))
        portless = proto == "icmp"
        for target in dests:
            ports = "*" if portless else draw(st.sampled_from(PORTS))
            acl["dst"].append(f"{target}:{ports}")
        if proto is not None:
            acl["proto"] = proto
        acls.append(acl)
    grants = []
    for _ in range(draw(st.integers(0, 2))):
        dests = draw(st.lists(st.sampled_from(DESTS), min_size=1, max_size=2))
        sources = IDENTITY_SOURCES if "autogroup:self" in dests else SOURCES
        grants.append(
            {
                "src": draw(st.lists(st.sampled_from(sources), min_size=1, max_size=2)),
                "dst": dests,
                "ip": draw(st.lists(st.sampled_from(GRANT_IPS), min_size=1, max_size=2)),
            }
        )
    return {
        "groups": {"group:g": draw(st.lists(st.sampled_from(USERS), max_size=2))},
        "tagOwners": {t: ["a@example.com"] for t in TAGS},
        "hosts": {"h1": "100.64.0.1", "h2": "10.0.0.0/25"},
        "acls": acls,
        "grants": grants,
    }


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    node_set=nodes(),
    raw_policy=policies(),
    data=st.data(),
)
def test_compiled_filter_agrees_with_direct_evaluation(node_set, raw_policy, data) -> None:
    policy = policy_from_obj(raw_policy)
    compiler = PolicyCompiler(policy, node_set)
    evaluator = Evaluator(policy, node_set)
    for _ in range(25):
        receiver = data.draw(st.sampled_from(node_set))
        dst_choices = list(receiver.addresses) + [
            str(ipaddress.ip_network(r).network_address + 5) for r in receiver.routes
        ]
        dst = data.draw(st.sampled_from(dst_choices))
        version = ipaddress.ip_address(dst).version
        src_choices = [a for n in node_set for a in n.addresses] + EXTERNAL
        src_choices = [s for s in src_choices if ipaddress.ip_address(s).version == version]
        src = data.draw(st.sampled_from(src_choices))
        proto = data.draw(st.sampled_from(PROTOS))
        if proto == 1 and version == 6:
            proto = 58
        port = data.draw(st.sampled_from(PACKET_PORTS))
        flt = Filter(compiler.compiled(receiver.id).rules)
        got = flt.check_inbound(packet(src, dst, proto, sport=1234, dport=port), 0.0)
        want = evaluator.allowed(src, dst, proto, port)
        assert got == want, (src, dst, proto, port, receiver, compiler.compiled(receiver.id).rules)


@settings(max_examples=100, deadline=None)
@given(node_set=nodes(), raw_policy=policies(), order=st.randoms(use_true_random=False))
def test_incremental_compile_equals_fresh_compile(node_set, raw_policy, order) -> None:
    policy = policy_from_obj(raw_policy)
    first, rest = node_set[:1], node_set[1:]
    compiler = PolicyCompiler(policy, first)
    order.shuffle(rest)
    for n in rest:
        compiler.add_node(n)
    victim = order.choice(node_set)
    compiler.remove_node(victim.id)
    compiler.add_node(victim)
    fresh = PolicyCompiler(policy, node_set)
    for n in node_set:
        assert compiler.compiled(n.id) == fresh.compiled(n.id)
