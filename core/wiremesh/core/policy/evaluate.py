"""Direct evaluation of a policy for one packet, and the policy's `tests` runner.

This is deliberately written apart from the compiler (compile.py): it walks the rules for
each question asked, so it is slow but obviously right, and the property test checks the
compiled filters against it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from wiremesh.core.policy.hujson import Pos
from wiremesh.core.policy.model import (
    ICMP,
    ICMPV6,
    AnySel,
    GroupSel,
    IdpGroupSel,
    InternetSel,
    IPAddress,
    MemberSel,
    Policy,
    PolicyNode,
    PolicyTest,
    PrefixSel,
    Selector,
    SelfSel,
    TaggedSel,
    TagSel,
    UserSel,
    internet_prefixes,
    user_matches,
)


def identity_matches(sel: Selector, node: PolicyNode) -> bool:
    """Does an identity selector name this node? (Tagged nodes belong to their tags only.)"""
    if isinstance(sel, AnySel):
        return True
    if isinstance(sel, TagSel):
        return sel.tag in node.tags
    if isinstance(sel, TaggedSel):
        return bool(node.tags)
    if node.tags or not node.user:
        return False
    if isinstance(sel, UserSel):
        return user_matches(sel.user, node.user)
    if isinstance(sel, GroupSel):
        return any(user_matches(u, node.user) for u in sel.users)
    if isinstance(sel, IdpGroupSel):
        return sel.name in node.groups
    return isinstance(sel, MemberSel)


class Evaluator:
    """Answers "may src_ip reach dst_ip with proto/port?" for one policy and node set."""

    def __init__(self, policy: Policy, nodes: Iterable[PolicyNode]) -> None:
        self.policy = policy
        self.by_address: dict[IPAddress, PolicyNode] = {}
        for node in nodes:
            for addr in node.addresses:
                self.by_address[ipaddress.ip_address(addr)] = node

    def _matches(self, sel: Selector, ip: IPAddress, node: PolicyNode | None) -> bool:
        if isinstance(sel, AnySel):
            return True
        if isinstance(sel, PrefixSel):
            return any(ip in p for p in sel.prefixes)
        if isinstance(sel, InternetSel):
            # Internet addresses belong to no node; an exit node forwards to them.
            return node is None and any(ip in p for p in internet_prefixes() if p.version == ip.version)
        if isinstance(sel, SelfSel):
            return False  # handled by the caller: it depends on both ends
        return node is not None and identity_matches(sel, node)

    def allowed(self, src: str | IPAddress, dst: str | IPAddress, proto: int, port: int = 0) -> bool:
        """May this packet pass? (Ports only count for protocols that carry them.)"""
        return self._allowed(src, dst, proto, port, ports_always=False)

    def test_allows(self, src: str | IPAddress, dst: str | IPAddress, proto: int, port: int) -> bool:
        """Does a rule open `dst:port` for `proto`, as a policy test asks it? A test names a
        port, and it is compared with the rule's ports even for ICMP (which a packet filter
        lets through on any rule naming the host): `deny: ["web:22"]` holds when the rules
        open only web:443, whatever the protocol."""
        return self._allowed(src, dst, proto, port, ports_always=True)

    def _allowed(
        self, src: str | IPAddress, dst: str | IPAddress, proto: int, port: int, *, ports_always: bool
    ) -> bool:
        src_ip = ipaddress.ip_address(src) if isinstance(src, str) else src
        dst_ip = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
        if src_ip.version != dst_ip.version:
            return False
        src_node = self.by_address.get(src_ip)
        dst_node = self.by_address.get(dst_ip)
        for rule in self.policy.rules:
            if not any(
                pp.covers(proto, port) if ports_always else pp.allows(proto, port) for pp in rule.allow
            ):
                continue
            if not any(self._matches(s, src_ip, src_node) for s in rule.src):
                continue
            for d in rule.dst:
                if isinstance(d, SelfSel):
                    if (
                        src_node is not None
                        and dst_node is not None
                        and not src_node.tags
                        and not dst_node.tags
                        and src_node.user
                        and src_node.user == dst_node.user
                    ):
                        return True
                elif self._matches(d, dst_ip, dst_node):
                    return True
        return False


def evaluate(
    policy: Policy, nodes: Iterable[PolicyNode], src_ip: str, dst_ip: str, proto: int, port: int = 0
) -> bool:
    """May a packet from src_ip to dst_ip (protocol number, destination port) pass?"""
    return Evaluator(policy, nodes).allowed(src_ip, dst_ip, proto, port)


# ---- tests ----


@dataclasses.dataclass(frozen=True, slots=True)
class TestFailure:
    index: int
    message: str
    pos: Pos | None = None

    def format(self, filename: str = "policy") -> str:
        where = f"{filename}:{self.pos.line}:{self.pos.col}" if self.pos else filename
        return f"{where}: test failed: {self.message}"


class _Universe:
    """The nodes a test talks about: real nodes if given, plus one synthetic node per
    identity the tests name (a user's device, a tagged device), each with an IPv4 and an
    IPv6 address that no specific prefix in the policy covers."""

    def __init__(self, policy: Policy, nodes: Iterable[PolicyNode]) -> None:
        self.nodes = list(nodes)
        used = {ipaddress.ip_address(a) for n in self.nodes for a in n.addresses}
        named: list[Selector] = [sel for rule in policy.rules for sel in (*rule.src, *rule.dst)]
        for test in policy.tests:
            named += [test.src_sel, *(t.sel for t in test.accept), *(t.sel for t in test.deny)]
        prefixes = [p for sel in named if isinstance(sel, PrefixSel) for p in sel.prefixes]
        # Prefixes narrower than the mesh ranges (100.64.0.0/10, fd7a:115c:a1e0::/48) would make
        # a synthetic node look like a host the policy names.
        self._specific = [p for p in prefixes if p.prefixlen > (10 if p.version == 4 else 48)]
        self._used = used
        self._next = {
            4: int(ipaddress.IPv4Address("100.127.255.254")),
            6: int(ipaddress.IPv6Address("fd7a:115c:a1e0:ffff:ffff:ffff:ffff:fffe")),
        }
        self._synthetic: dict[tuple[str, str], PolicyNode] = {}

    def _address(self, version: int) -> str:
        while True:
            ip = ipaddress.ip_address(self._next[version])
            self._next[version] -= 1
            if ip not in self._used and not any(ip in p for p in self._specific):
                self._used.add(ip)
                return str(ip)

    def node(self, role: str, key: str, user: str = "", tag: str = "", group: str = "") -> PolicyNode:
        if (role, key) not in self._synthetic:
            node = PolicyNode(
                id=-1 - len(self._synthetic),
                user=user,
                tags=frozenset({tag}) if tag else frozenset(),
                addresses=(self._address(4), self._address(6)),
                groups=frozenset({group}) if group else frozenset(),
            )
            self._synthetic[(role, key)] = node
            self.nodes.append(node)
        return self._synthetic[(role, key)]

    def addresses(self, sel: Selector, role: str, version: int = 4) -> list[str]:
        """Addresses standing for the principal(s) a test names; identities are given the
        address of the IP version asked for (the other end's), literal addresses their own."""
        if isinstance(sel, UserSel):
            nodes = [self.node(role, sel.user, user=sel.user)]
        elif isinstance(sel, GroupSel):
            nodes = [self.node(role, u, user=u) for u in sel.users]
        elif isinstance(sel, TagSel):
            nodes = [self.node(role, sel.tag, tag=sel.tag)]
        elif isinstance(sel, IdpGroupSel):
            # A member of the group who is named nowhere else in the policy.
            nodes = [self.node(role, f"group:{sel.name}", user=f"member of {sel.name}", group=sel.name)]
        elif isinstance(sel, PrefixSel):
            return [str(sel.prefixes[0].network_address)] if sel.prefixes else []
        else:
            return []
        return [next(a for a in n.addresses if ipaddress.ip_address(a).version == version) for n in nodes]


def _version(sel: Selector) -> int:
    """The IP version a test destination is asked about: a literal address's own, IPv4 for
    identities (rules on identities cover both of a node's addresses alike)."""
    if isinstance(sel, PrefixSel) and sel.prefixes:
        return sel.prefixes[0].version
    return 4


def run_tests(policy: Policy, nodes: Iterable[PolicyNode] = ()) -> list[TestFailure]:
    """Run the policy's `tests`; returns one TestFailure per failing assertion."""
    universe = _Universe(policy, nodes)
    plan = []
    for test in policy.tests:
        checks = []
        for targets, expect in ((test.accept, True), (test.deny, False)):
            for t in targets:
                version = _version(t.sel)
                srcs = universe.addresses(test.src_sel, "src", version)
                checks.append((t, expect, srcs, universe.addresses(t.sel, "dst", version)))
        named = universe.addresses(test.src_sel, "src")
        plan.append((test, named, checks))
    evaluator = Evaluator(policy, universe.nodes)
    failures = []
    for test, named, checks in plan:
        if not named:
            failures.append(
                TestFailure(test.index, f"tests[{test.index}]: src {test.src!r} names nobody", test.pos)
            )
            continue
        for target, expect, srcs, dsts in checks:
            for src in srcs:
                for dst in dsts:
                    accepted = _accepted(evaluator, test, src, dst, target.port)
                    if accepted is None:
                        failures.append(
                            TestFailure(
                                test.index,
                                f"{_describe(test, target)}: {src} and {dst} are of different IP versions",
                                target.pos,
                            )
                        )
                    elif accepted != expect:
                        want, have = ("accept", "denied") if expect else ("deny", "accepted")
                        failures.append(
                            TestFailure(
                                test.index,
                                f"{_describe(test, target)}: expected {want}, but it is {have}",
                                target.pos or test.pos,
                            )
                        )
    return failures


def _accepted(evaluator: Evaluator, test: PolicyTest, src: str, dst: str, port: int) -> bool | None:
    """Is the flow accepted for any of the test's protocols (that exist for this IP version)?
    Tailscale's rule: `accept` holds when one of them passes, `deny` when none does.
    None: the two ends are of different IP versions."""
    version = ipaddress.ip_address(dst).version
    if ipaddress.ip_address(src).version != version:
        return None
    protos = [
        p for p in test.protos if not (p == ICMP and version == 6) and not (p == ICMPV6 and version == 4)
    ]
    return any(evaluator.test_allows(src, dst, p, port) for p in protos)


def _describe(test: PolicyTest, target: object) -> str:
    text = getattr(target, "text", "?")
    return f"tests[{test.index}] {test.src} -> {text} ({test.proto_name or 'tcp, udp or icmp'})"
