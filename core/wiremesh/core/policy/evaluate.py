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
        if isinstance(sel, SelfSel):
            return False  # handled by the caller: it depends on both ends
        return node is not None and identity_matches(sel, node)

    def allowed(self, src: str | IPAddress, dst: str | IPAddress, proto: int, port: int = 0) -> bool:
        src_ip = ipaddress.ip_address(src) if isinstance(src, str) else src
        dst_ip = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
        if src_ip.version != dst_ip.version:
            return False
        src_node = self.by_address.get(src_ip)
        dst_node = self.by_address.get(dst_ip)
        for rule in self.policy.rules:
            if not any(pp.allows(proto, port) for pp in rule.allow):
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
    identity the tests name (a user's device, a tagged device), on addresses that no
    specific prefix in the policy covers."""

    def __init__(self, policy: Policy, nodes: Iterable[PolicyNode]) -> None:
        self.nodes = list(nodes)
        used = {ipaddress.ip_address(a) for n in self.nodes for a in n.addresses}
        named: list[Selector] = [sel for rule in policy.rules for sel in (*rule.src, *rule.dst)]
        for test in policy.tests:
            named += [test.src_sel, *(t.sel for t in test.accept), *(t.sel for t in test.deny)]
        specific = [
            p
            for sel in named
            if isinstance(sel, PrefixSel)
            for p in sel.prefixes
            if p.version == 4 and p.prefixlen >= 11
        ]
        self._used = used
        self._specific = specific
        self._next = int(ipaddress.IPv4Address("100.127.255.254"))
        self._synthetic: dict[tuple[str, str], PolicyNode] = {}

    def _address(self) -> str:
        while True:
            ip = ipaddress.IPv4Address(self._next)
            self._next -= 1
            if ip not in self._used and not any(ip in p for p in self._specific):
                self._used.add(ip)
                return str(ip)

    def node(self, role: str, key: str, user: str = "", tag: str = "") -> PolicyNode:
        if (role, key) not in self._synthetic:
            node = PolicyNode(
                id=-1 - len(self._synthetic),
                user=user,
                tags=frozenset({tag}) if tag else frozenset(),
                addresses=(self._address(),),
            )
            self._synthetic[(role, key)] = node
            self.nodes.append(node)
        return self._synthetic[(role, key)]

    def addresses(self, sel: Selector, role: str) -> list[str]:
        """Addresses standing for the principal(s) a test names."""
        if isinstance(sel, UserSel):
            return [self.node(role, sel.user, user=sel.user).addresses[0]]
        if isinstance(sel, GroupSel):
            return [self.node(role, u, user=u).addresses[0] for u in sel.users]
        if isinstance(sel, TagSel):
            return [self.node(role, sel.tag, tag=sel.tag).addresses[0]]
        if isinstance(sel, PrefixSel):
            return [str(sel.prefixes[0].network_address)] if sel.prefixes else []
        return []


def run_tests(policy: Policy, nodes: Iterable[PolicyNode] = ()) -> list[TestFailure]:
    """Run the policy's `tests`; returns one TestFailure per failing assertion."""
    universe = _Universe(policy, nodes)
    plan = []
    for test in policy.tests:
        srcs = universe.addresses(test.src_sel, "src")
        checks = [(t, True, universe.addresses(t.sel, "dst")) for t in test.accept]
        checks += [(t, False, universe.addresses(t.sel, "dst")) for t in test.deny]
        plan.append((test, srcs, checks))
    evaluator = Evaluator(policy, universe.nodes)
    failures = []
    for test, srcs, checks in plan:
        if not srcs:
            failures.append(
                TestFailure(test.index, f"tests[{test.index}]: src {test.src!r} names nobody", test.pos)
            )
            continue
        for target, expect, dsts in checks:
            for src in srcs:
                for dst in dsts:
                    verdict = _verdict(evaluator, test, src, dst, target.port)
                    if verdict is None:
                        failures.append(
                            TestFailure(
                                test.index,
                                f"{_describe(test, target)}: {src} and {dst} are of different IP versions",
                                target.pos,
                            )
                        )
                    elif verdict != ("all" if expect else "none"):
                        want, have = ("accept", "denied") if expect else ("deny", "accepted")
                        failures.append(
                            TestFailure(
                                test.index,
                                f"{_describe(test, target)}: expected {want}, but it is {have}",
                                target.pos or test.pos,
                            )
                        )
    return failures


def _verdict(evaluator: Evaluator, test: PolicyTest, src: str, dst: str, port: int) -> str | None:
    """ "all", "none" or "some" of the test's protocols allowed (None: different IP versions)."""
    version = ipaddress.ip_address(dst).version
    if ipaddress.ip_address(src).version != version:
        return None
    protos = [
        p for p in test.protos if not (p == ICMP and version == 6) and not (p == ICMPV6 and version == 4)
    ]
    results = [evaluator.allowed(src, dst, p, port) for p in protos]
    if all(results):
        return "all"
    return "some" if any(results) else "none"


def _describe(test: PolicyTest, target: object) -> str:
    text = getattr(target, "text", "?")
    return f"tests[{test.index}] {test.src} -> {text} ({test.proto_name})"
