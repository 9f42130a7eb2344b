"""Compile a policy against the node set: per node, the peers it may see and its inbound
packet-filter rules.

`PolicyCompiler` is what coord holds. It resolves every rule once into the set of nodes on
each side (indexed by user, tag and address, so a full compile costs about the size of
its output), caches each node's `CompiledNode`, and on `add_node` / `update_node` /
`remove_node` / `set_policy` recompiles only the nodes the change can affect, returning
the ids whose output actually changed (the netmaps coord must stream again).

Semantics (Tailscale's):
- A peer is visible when either side may reach the other; a node's approved subnet routes
  count as destinations it can be reached at.
- Identity selectors (users, groups, tags, autogroups) name node addresses, never routes;
  `*` and literal prefixes also reach routes. Tagged nodes belong to their tags, not users.
- With no policy set, everyone may reach everyone.
"""

from __future__ import annotations

import bisect
import dataclasses
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from wiremesh.core.policy.evaluate import identity_matches
from wiremesh.core.policy.model import (
    ANY_V4,
    ANY_V6,
    AnySel,
    FilterRule,
    GroupSel,
    IdpGroupSel,
    InternetSel,
    IPNetwork,
    MemberSel,
    Policy,
    PolicyNode,
    PrefixSel,
    Rule,
    Selector,
    SelfSel,
    TaggedSel,
    TagSel,
    UserSel,
    allow_all_policy,
    internet_prefixes,
)
from wiremesh.core.policy.prefixes import Span, compress_hosts, compress_spans, span_of

ANY_PREFIXES = (str(ANY_V4), str(ANY_V6))
DENY_ALL = FilterRule(src=(), dst=(), protos=(), ports=())  # matches no packet


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class CompiledNode:
    """A node's compiled output. `reach` is the set of nodes it may see, possibly including
    itself: the same frozenset object is shared by many nodes (with the default allow-all
    policy, by all of them), so 5,000 nodes do not hold 5,000 copies of a 5,000-entry set."""

    node_id: int
    reach: frozenset[int]
    rules: tuple[FilterRule, ...]

    @property
    def peers(self) -> frozenset[int]:
        """The nodes it may see (a copy without itself; prefer can_see/reach in hot paths)."""
        return self.reach - {self.node_id} if self.node_id in self.reach else self.reach

    def can_see(self, node_id: int) -> bool:
        return node_id != self.node_id and node_id in self.reach

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompiledNode):
            return NotImplemented
        if self.node_id != other.node_id or self.rules != other.rules:
            return False
        a, b = self.reach, other.reach
        if a is b or a == b:
            return True
        if abs(len(a) - len(b)) > 1:
            return False
        return (a ^ b) <= {self.node_id}

    __hash__ = None  # type: ignore[assignment]

    def packet_filter(self) -> list[dict[str, Any]]:
        """The netmap's `packet_filter` list. In the netmap an empty list means "no policy,
        allow all", so a node that may receive nothing gets one rule that matches nothing."""
        if not self.rules:
            return [DENY_ALL.to_dict()]
        return [r.to_dict() for r in self.rules]


class _Node:
    """A PolicyNode with its addresses parsed once."""

    __slots__ = (
        "addr_prefixes",
        "addr_spans",
        "addr_strs",
        "addrs",
        "exit_routes",
        "node",
        "own",
        "reached",
        "routes",
        "v4",
        "v6",
    )

    def __init__(self, node: PolicyNode) -> None:
        self.node = node
        self.addrs = tuple(ipaddress.ip_address(a) for a in node.addresses)
        self.addr_prefixes: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(a) for a in self.addrs)
        self.addr_strs = tuple(str(p) for p in self.addr_prefixes)
        self.addr_spans: tuple[Span, ...] = tuple((a.version, int(a), int(a)) for a in self.addrs)
        self.v4 = tuple(lo for v, lo, _ in self.addr_spans if v == 4)
        self.v6 = tuple(lo for v, lo, _ in self.addr_spans if v == 6)
        approved = tuple(ipaddress.ip_network(r, strict=False) for r in node.routes)
        # An exit node's 0.0.0.0/0 and ::/0 are not subnets it is reached at: they make it a
        # destination for `*`, literal addresses and autogroup:internet, never a source.
        self.routes: tuple[IPNetwork, ...] = tuple(r for r in approved if r.prefixlen)
        self.exit_routes: tuple[IPNetwork, ...] = tuple(r for r in approved if not r.prefixlen)
        # Everything this node can be reached at (its own addresses and subnets)...
        self.own = self.addr_prefixes + self.routes
        # ... and everything it forwards to, as an exit node too.
        self.reached = self.own + self.exit_routes

    def overlaps(
        self, prefixes: tuple[IPNetwork, ...], with_routes: bool = True, exits: bool = False
    ) -> bool:
        mine = (self.reached if exits else self.own) if with_routes else self.addr_prefixes
        return any(a.version == p.version and a.overlaps(p) for a in mine for p in prefixes)

    def internet(self) -> tuple[IPNetwork, ...]:
        """autogroup:internet on this node: the internet's prefixes of the families it exits."""
        versions = {r.version for r in self.exit_routes}
        return tuple(p for p in internet_prefixes() if p.version in versions)


def _intersect(mine: tuple[IPNetwork, ...], prefixes: tuple[IPNetwork, ...]) -> list[IPNetwork]:
    out = []
    for a in mine:
        for p in prefixes:
            if a.version != p.version:
                continue
            if p.supernet_of(a):  # type: ignore[arg-type]
                out.append(a)
            elif a.supernet_of(p):  # type: ignore[arg-type]
                out.append(p)
    return out


class _RuleState:
    """One rule resolved against the node set (a rule whose dst mixes autogroup:self with
    other targets is split in two, since self is resolved per user)."""

    __slots__ = (
        "_dst_frozen",
        "_src_frozen",
        "_src_prefixes",
        "dst",
        "dst_nodes",
        "is_self",
        "literal_spans",
        "literal_src",
        "rule",
        "self_src",
        "src",
        "src_any",
        "src_ident",
        "src_nodes",
        "templates",
    )

    def __init__(self, rule: Rule, dst: tuple[Selector, ...], is_self: bool) -> None:
        self.rule = rule
        self.src = rule.src
        self.dst = dst
        self.is_self = is_self
        self.src_any = any(isinstance(s, AnySel) for s in rule.src)
        literal: list[str] = list(ANY_PREFIXES) if self.src_any else []
        if not self.src_any:
            for s in rule.src:
                if isinstance(s, PrefixSel):
                    literal.extend(str(p) for p in s.prefixes)
        self.literal_src = tuple(dict.fromkeys(literal))
        self.literal_spans = tuple(span_of(p) for p in self.literal_src)
        self.templates = tuple((tuple(sorted(pp.protos)), pp.ports) for pp in dict.fromkeys(rule.allow))
        self.src_ident: set[int] = set()  # nodes named by identity: their addresses are sources
        self.src_nodes: set[int] = set()  # every node counted as a source (for visibility)
        self.dst_nodes: set[int] = set()
        self.self_src: dict[str, set[int]] = {}  # self rules: user -> that user's source nodes
        self._src_prefixes: tuple[str, ...] | None = None
        self._src_frozen: frozenset[int] | None = None
        self._dst_frozen: frozenset[int] | None = None

    def src_set(self, freeze: Callable[[set[int]], frozenset[int]]) -> frozenset[int]:
        if self._src_frozen is None:
            self._src_frozen = freeze(self.src_nodes)
        return self._src_frozen

    def dst_set(self, freeze: Callable[[set[int]], frozenset[int]]) -> frozenset[int]:
        if self._dst_frozen is None:
            self._dst_frozen = freeze(self.dst_nodes)
        return self._dst_frozen

    def src_prefixes(self, nodes: dict[int, _Node]) -> tuple[str, ...]:
        if self._src_prefixes is None:
            if self.src_any:
                self._src_prefixes = self.literal_src
            else:
                # Compressed: sequentially allocated node addresses collapse into a few prefixes,
                # so a rule naming every node stays small (the filter matches the same sources).
                if self.literal_spans:
                    spans = list(self.literal_spans)
                    for nid in self.src_ident:
                        spans.extend(nodes[nid].addr_spans)
                    self._src_prefixes = compress_spans(spans)
                else:
                    members = [nodes[nid] for nid in self.src_ident]
                    self._src_prefixes = compress_hosts(
                        [a for n in members for a in n.v4], [a for n in members for a in n.v6]
                    )
        return self._src_prefixes

    def invalidate(self) -> None:
        self._src_prefixes = None

    # Membership of one node, evaluated directly (used for incremental changes).
    def src_membership(self, n: _Node) -> tuple[bool, bool]:
        """(named by identity, counted as a source at all)"""
        ident = False
        member = False
        for s in self.src:
            if isinstance(s, PrefixSel):
                # For autogroup:self only the node's own addresses can be its user's source.
                if n.overlaps(s.prefixes, with_routes=not self.is_self):
                    member = True
            elif isinstance(s, AnySel):
                member = True
            elif identity_matches(s, n.node):
                ident = member = True
        return ident, member

    def dst_member(self, n: _Node) -> bool:
        for d in self.dst:
            if isinstance(d, PrefixSel):
                if n.overlaps(d.prefixes, exits=True):
                    return True
            elif isinstance(d, InternetSel):
                if n.exit_routes:
                    return True
            elif isinstance(d, AnySel) or identity_matches(d, n.node):
                return True
        return False

    def dst_prefixes(self, n: _Node) -> tuple[str, ...]:
        """The prefixes on node n that this rule's destinations cover."""
        out: list[IPNetwork] = []
        ident = False
        for d in self.dst:
            if isinstance(d, AnySel):
                return tuple(str(p) for p in n.reached)
            if isinstance(d, PrefixSel):
                out.extend(_intersect(n.reached, d.prefixes))
            elif isinstance(d, InternetSel):
                out.extend(n.internet())
            elif not ident and identity_matches(d, n.node):
                ident = True
        if not out:
            return n.addr_strs if ident else ()
        if ident:
            out.extend(n.addr_prefixes)
        return tuple(dict.fromkeys(str(p) for p in out))


class _DiffMemo:
    """Compares many nodes' old and new output cheaply: their reach sets are mostly the same
    few shared objects, so each pair's difference is computed once."""

    def __init__(self) -> None:
        # Holding a and b keeps their ids from being reused while the memo lives.
        self._diffs: dict[tuple[int, int], tuple[frozenset[int], frozenset[int], frozenset[int]]] = {}

    def same(self, before: CompiledNode, after: CompiledNode) -> bool:
        if before.rules != after.rules:
            return False
        a, b = before.reach, after.reach
        if a is b:
            return True
        key = (id(a), id(b))
        hit = self._diffs.get(key)
        if hit is None:
            hit = self._diffs[key] = (a, b, a ^ b)
        return hit[2] <= {after.node_id}


def _self_eligible(n: PolicyNode) -> bool:
    return not n.tags and bool(n.user)


class PolicyCompiler:
    """Holds the policy and the node set; compiles per-node output, incrementally."""

    def __init__(self, policy: Policy | None = None, nodes: Iterable[PolicyNode] = ()) -> None:
        self._policy = policy if policy is not None else allow_all_policy()
        self._nodes: dict[int, _Node] = {n.id: _Node(n) for n in nodes}
        self._cache: dict[int, CompiledNode] = {}
        self._rebuild()

    @property
    def policy(self) -> Policy:
        return self._policy

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._nodes

    def nodes(self) -> list[PolicyNode]:
        return [n.node for n in self._nodes.values()]

    # ---- public API ----

    def compiled(self, node_id: int) -> CompiledNode:
        """The node's compiled peers and filter; KeyError for an unknown node."""
        cached = self._cache.get(node_id)
        if cached is None:
            cached = self._compile(self._nodes[node_id])
            self._cache[node_id] = cached
        return cached

    def set_policy(self, policy: Policy | None) -> set[int]:
        """Replace the policy (None: allow all); returns the nodes whose output changed."""
        old = {nid: self.compiled(nid) for nid in self._nodes}
        self._policy = policy if policy is not None else allow_all_policy()
        self._rebuild()
        memo = _DiffMemo()
        return {nid for nid, before in old.items() if not memo.same(before, self.compiled(nid))}

    def add_node(self, node: PolicyNode) -> set[int]:
        if node.id in self._nodes:
            raise ValueError(f"node {node.id} already present")
        return self._change(None, _Node(node))

    def update_node(self, node: PolicyNode) -> set[int]:
        old = self._nodes.get(node.id)
        if old is None:
            raise KeyError(node.id)
        if old.node == node:
            return set()
        return self._change(old, _Node(node))

    def remove_node(self, node_id: int) -> set[int]:
        old = self._nodes.get(node_id)
        if old is None:
            return set()
        return self._change(old, None)

    # ---- full build ----

    def _rebuild(self) -> None:
        self._intern: dict[frozenset[int], frozenset[int]] = {}
        self._states: list[_RuleState] = []
        for rule in self._policy.rules:
            plain = tuple(d for d in rule.dst if not isinstance(d, SelfSel))
            if plain:
                self._states.append(_RuleState(rule, plain, False))
            if len(plain) != len(rule.dst):
                self._states.append(_RuleState(rule, (SelfSel(),), True))
        self._self_states = [i for i, s in enumerate(self._states) if s.is_self]
        self._dst_rules: dict[int, list[int]] = {nid: [] for nid in self._nodes}
        self._src_rules: dict[int, list[int]] = {nid: [] for nid in self._nodes}
        self._index_nodes()
        for i, st in enumerate(self._states):
            ident, member = self._resolve(st.src, with_routes=not st.is_self)
            st.src_ident = ident
            st.src_nodes = member
            if st.is_self:
                for nid in member:
                    n = self._nodes[nid].node
                    if _self_eligible(n):
                        st.self_src.setdefault(n.user, set()).add(nid)
                continue
            _, st.dst_nodes = self._resolve(st.dst, with_routes=True, exits=True)
            for nid in st.dst_nodes:
                self._dst_rules[nid].append(i)
            for nid in st.src_nodes:
                self._src_rules[nid].append(i)
        self._cache = {}
        for nid in self._nodes:
            self.compiled(nid)

    def _index_nodes(self) -> None:
        self._by_user: dict[str, set[int]] = {}
        self._by_idp_group: dict[str, set[int]] = {}
        self._by_tag: dict[str, set[int]] = {}
        self._members: set[int] = set()
        self._tagged: set[int] = set()
        self._addr_index: list[tuple[int, int, int]] = []  # sorted (version, int address, node id)
        self._routed: list[tuple[IPNetwork, int]] = []
        self._exits: set[int] = set()  # nodes with an approved exit route
        for n in self._nodes.values():
            self._index_add(n, bulk=True)
        self._addr_index.sort()

    def _index_add(self, n: _Node, bulk: bool = False) -> None:
        nid = n.node.id
        if n.node.tags:
            self._tagged.add(nid)
            for t in n.node.tags:
                self._by_tag.setdefault(t, set()).add(nid)
        elif n.node.user:
            self._members.add(nid)
            self._by_user.setdefault(n.node.user, set()).add(nid)
            for g in n.node.groups:
                self._by_idp_group.setdefault(g, set()).add(nid)
        for a in n.addrs:
            if bulk:
                self._addr_index.append((a.version, int(a), nid))
            else:
                bisect.insort(self._addr_index, (a.version, int(a), nid))
        for r in n.routes:
            self._routed.append((r, nid))
        if n.exit_routes:
            self._exits.add(nid)

    def _index_remove(self, n: _Node) -> None:
        nid = n.node.id
        self._tagged.discard(nid)
        self._members.discard(nid)
        for t in n.node.tags:
            self._by_tag.get(t, set()).discard(nid)
        self._by_user.get(n.node.user, set()).discard(nid)
        for g in n.node.groups:
            self._by_idp_group.get(g, set()).discard(nid)
        for a in n.addrs:
            key = (a.version, int(a), nid)
            i = bisect.bisect_left(self._addr_index, key)
            if i < len(self._addr_index) and self._addr_index[i] == key:
                del self._addr_index[i]
        self._routed = [(r, x) for r, x in self._routed if x != nid]
        self._exits.discard(nid)

    def _prefix_nodes(self, prefixes: tuple[IPNetwork, ...], with_routes: bool, exits: bool) -> set[int]:
        out: set[int] = set()
        if exits and prefixes:
            families = {p.version for p in prefixes}
            out.update(
                nid for nid in self._exits if families & {r.version for r in self._nodes[nid].exit_routes}
            )
        index = self._addr_index
        for p in prefixes:
            lo = bisect.bisect_left(index, (p.version, int(p.network_address)))
            hi = bisect.bisect_left(index, (p.version, int(p.broadcast_address) + 1))
            out.update(entry[2] for entry in index[lo:hi])
            if with_routes:
                for r, nid in self._routed:
                    if r.version == p.version and r.overlaps(p):
                        out.add(nid)
        return out

    def _resolve(
        self, sels: tuple[Selector, ...], with_routes: bool, exits: bool = False
    ) -> tuple[set[int], set[int]]:
        """(nodes named by identity, all nodes covered) for a src or dst list (`exits`: a dst
        list, which exit nodes are covered by as forwarders)."""
        ident: set[int] = set()
        covered: set[int] = set()
        for s in sels:
            if isinstance(s, AnySel):
                covered.update(self._nodes)
            elif isinstance(s, PrefixSel):
                covered |= self._prefix_nodes(s.prefixes, with_routes, exits and with_routes)
            elif isinstance(s, InternetSel):
                covered |= self._exits
            elif isinstance(s, UserSel):
                ident |= self._by_user.get(s.user, set())
                if s.user.endswith("@"):
                    ident |= self._by_user.get(s.user[:-1], set())
            elif isinstance(s, GroupSel):
                for u in s.users:
                    ident |= self._by_user.get(u, set())
                    if u.endswith("@"):
                        ident |= self._by_user.get(u[:-1], set())
            elif isinstance(s, IdpGroupSel):
                ident |= self._by_idp_group.get(s.name, set())
            elif isinstance(s, TagSel):
                ident |= self._by_tag.get(s.tag, set())
            elif isinstance(s, MemberSel):
                ident |= self._members
            elif isinstance(s, TaggedSel):
                ident |= self._tagged
        return ident, covered | ident

    # ---- per-node compile ----

    def _compile(self, n: _Node) -> CompiledNode:
        nid = n.node.id
        rules: list[FilterRule] = []
        peer_sets: dict[int, frozenset[int]] = {}  # by id(): the same shared set counts once
        for i in self._dst_rules.get(nid, ()):
            st = self._states[i]
            fs = st.src_set(self._freeze)
            peer_sets[id(fs)] = fs
            src = st.src_prefixes(self._nodes)
            dst = st.dst_prefixes(n)
            if src and dst:
                for protos, ports in st.templates:
                    rules.append(FilterRule(src, dst, protos, ports))
        for i in self._src_rules.get(nid, ()):
            fs = self._states[i].dst_set(self._freeze)
            peer_sets[id(fs)] = fs
        if _self_eligible(n.node):
            same_user = self._by_user.get(n.node.user, set())
            for i in self._self_states:
                st = self._states[i]
                sources = st.self_src.get(n.node.user)
                if not sources:
                    continue
                fs = frozenset(same_user if nid in sources else sources)
                peer_sets[id(fs)] = fs
                members = [self._nodes[sid] for sid in sources]
                src = compress_hosts([a for m in members for a in m.v4], [a for m in members for a in m.v6])
                if src and n.addr_strs:
                    for protos, ports in st.templates:
                        rules.append(FilterRule(src, n.addr_strs, protos, ports))
        sets = list(peer_sets.values())
        if not sets:
            reach: frozenset[int] = frozenset()
        elif len(sets) == 1:
            reach = sets[0]
        else:
            reach = frozenset().union(*sets)
        return CompiledNode(nid, reach, tuple(rules))

    def _freeze(self, nodes: set[int]) -> frozenset[int]:
        """A frozen copy, interned: rules covering the same nodes share one set object."""
        fs = frozenset(nodes)
        return self._intern.setdefault(fs, fs)

    def _reintern(self) -> None:
        """Keep the intern table to the sets rule states hold now (no growth over time)."""
        table: dict[frozenset[int], frozenset[int]] = {}
        for st in self._states:
            for fs in (st._src_frozen, st._dst_frozen):
                if fs is not None:
                    table.setdefault(fs, fs)
        self._intern = table

    # ---- incremental change ----

    def _change(self, old: _Node | None, new: _Node | None) -> set[int]:
        node_id = (new or old).node.id  # type: ignore[union-attr]
        affected: set[int] = {node_id}
        addresses_changed = old is None or new is None or old.addrs != new.addrs
        users = {x.node.user for x in (old, new) if x is not None and _self_eligible(x.node)}
        # Index updates first, so set lookups below see the new node set.
        if old is not None:
            self._index_remove(old)
        if new is None:
            del self._nodes[node_id]
        else:
            self._nodes[node_id] = new
            self._index_add(new)
        self._dst_rules.setdefault(node_id, [])
        self._src_rules.setdefault(node_id, [])
        for i, st in enumerate(self._states):
            was_ident = node_id in st.src_ident
            was_src = node_id in st.src_nodes
            was_dst = node_id in st.dst_nodes
            ident, is_src = st.src_membership(new) if new is not None else (False, False)
            is_dst = (not st.is_self) and new is not None and st.dst_member(new)
            if st.is_self:
                for members in st.self_src.values():
                    members.discard(node_id)
                if new is not None and is_src and _self_eligible(new.node):
                    st.self_src.setdefault(new.node.user, set()).add(node_id)
                # The node's own user's devices may gain or lose it as a source or a peer.
                for u in users:
                    affected |= self._by_user.get(u, set())
            if was_ident != ident or (ident and addresses_changed):
                st.invalidate()
            if ident:
                st.src_ident.add(node_id)
            else:
                st.src_ident.discard(node_id)
            if was_src != is_src:
                st._src_frozen = None
            if was_dst != is_dst:
                st._dst_frozen = None
            if was_src != is_src and st.is_self:
                if is_src:
                    st.src_nodes.add(node_id)
                else:
                    st.src_nodes.discard(node_id)
            elif was_src != is_src:
                if is_src:
                    st.src_nodes.add(node_id)
                    self._src_rules[node_id].append(i)
                else:
                    st.src_nodes.discard(node_id)
                    self._src_rules[node_id].remove(i)
            if (was_src or is_src) and (
                was_src != is_src or was_ident != ident or (ident and addresses_changed)
            ):
                affected |= st.dst_nodes
            if was_dst != is_dst:
                if is_dst:
                    st.dst_nodes.add(node_id)
                    self._dst_rules[node_id].append(i)
                else:
                    st.dst_nodes.discard(node_id)
                    self._dst_rules[node_id].remove(i)
                affected |= st.src_nodes
        if new is None:
            self._dst_rules.pop(node_id, None)
            self._src_rules.pop(node_id, None)
        self._reintern()
        changed: set[int] = set()
        memo = _DiffMemo()
        for nid in affected:
            before = self._cache.pop(nid, None)
            if nid not in self._nodes:
                if before is not None:
                    changed.add(nid)
                continue
            if before is None or not memo.same(before, self.compiled(nid)):
                changed.add(nid)
        return changed
