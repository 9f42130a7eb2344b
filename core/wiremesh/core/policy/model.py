"""The policy model: what a parsed, validated policy file means.

Everything here is immutable. Names of things that only exist in the text (host aliases,
ipsets, groups) are resolved at parse time: a host becomes its prefixes, a group its set
of users. What remains refers to identities (users, tags, autogroups) that are resolved
against the node set, or to literal prefixes.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from collections.abc import Iterable
from typing import Any, Literal

from wiremesh.core.policy.hujson import Pos

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IP protocol numbers.
ICMP = 1
IGMP = 2
TCP = 6
UDP = 17
GRE = 47
ESP = 50
AH = 51
ICMPV6 = 58
SCTP = 132

PROTO_NAMES: dict[str, frozenset[int]] = {
    "tcp": frozenset({TCP}),
    "udp": frozenset({UDP}),
    "sctp": frozenset({SCTP}),
    # Like Tailscale, "icmp" in a policy covers ICMP for both IP versions.
    "icmp": frozenset({ICMP, ICMPV6}),
    "ipv6-icmp": frozenset({ICMPV6}),
    "icmpv6": frozenset({ICMPV6}),
    "igmp": frozenset({IGMP}),
    "gre": frozenset({GRE}),
    "esp": frozenset({ESP}),
    "ah": frozenset({AH}),
    "egp": frozenset({8}),
    "igp": frozenset({9}),
}
# Protocols whose packets carry ports; for every other protocol a rule's ports must be "*".
PORT_PROTOS = frozenset({TCP, UDP, SCTP})
# What a rule without `proto` allows (Tailscale's default): TCP, UDP and ICMP of both versions.
DEFAULT_PROTOS = frozenset({TCP, UDP, ICMP, ICMPV6})
ALL_PORTS: tuple[tuple[int, int], ...] = ((0, 65535),)
# An empty protocol set means "every IP protocol" (a grant's `ip: ["*"]`).
ANY_PROTO: frozenset[int] = frozenset()

ANY_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ANY_V6 = ipaddress.IPv6Network("::/0")
# What an exit node advertises (both, as Tailscale's --advertise-exit-node): its "routes" to
# everything. They are approved through `autoApprovers.exitNode` (or by an admin), never as
# ordinary subnet routes.
EXIT_ROUTES = (str(ANY_V4), str(ANY_V6))
# autogroup:internet: the public address space reached through exit nodes. Private, shared
# (CGNAT, the mesh's own 100.64.0.0/10), loopback, link-local, multicast and reserved ranges are
# not "the internet"; a LAN behind an exit node is reached as an ordinary subnet route.
NOT_INTERNET = tuple(
    ipaddress.ip_network(p)
    for p in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/3",
    )
)
INTERNET_V6 = ipaddress.IPv6Network("2000::/3")  # global unicast; the mesh's fd7a::/48 is outside


def is_exit_route(prefix: str) -> bool:
    return prefix in EXIT_ROUTES


@functools.cache
def internet_prefixes() -> tuple[IPNetwork, ...]:
    """autogroup:internet as CIDR prefixes: IPv4 minus NOT_INTERNET, and 2000::/3."""
    v4: list[IPNetwork] = [ANY_V4]
    for cut in NOT_INTERNET:
        out: list[IPNetwork] = []
        for net in v4:
            if net.overlaps(cut):
                if net.subnet_of(cut):  # type: ignore[arg-type]
                    continue
                out.extend(net.address_exclude(cut))  # type: ignore[arg-type]
            else:
                out.append(net)
        v4 = out
    return (*sorted(v4, key=lambda n: int(n.network_address)), INTERNET_V6)


@dataclasses.dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: Literal["error", "warning"]
    message: str
    pos: Pos | None = None
    path: str = ""  # where in the structure ("acls[0].src[1]"), for input without positions

    def format(self, filename: str = "policy") -> str:
        if self.pos:
            where = f"{filename}:{self.pos.line}:{self.pos.col}"
        elif self.path:
            where = f"{filename}: {self.path}"
        else:
            where = filename
        return f"{where}: {self.severity}: {self.message}"


class PolicyError(ValueError):
    """The policy is invalid; `diagnostics` holds every error (and warning) found."""

    def __init__(self, diagnostics: list[Diagnostic]) -> None:
        errors = [d for d in diagnostics if d.severity == "error"]
        first = errors[0].format() if errors else "invalid policy"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        super().__init__(first + more)
        self.diagnostics = diagnostics


# ---- selectors: what `src` / `dst` entries resolve to ----


@dataclasses.dataclass(frozen=True, slots=True)
class AnySel:
    """`*`: every node and every address."""


@dataclasses.dataclass(frozen=True, slots=True)
class UserSel:
    """The untagged nodes of one user. `user` is as written (`alice@example.com`, or
    Headscale's `alice@`)."""

    user: str


@dataclasses.dataclass(frozen=True, slots=True)
class GroupSel:
    name: str
    users: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class IdpGroupSel:
    """An identity provider's group, `group:NAME@DOMAIN` not defined in `groups` (Tailscale's
    and Headscale's way of naming one): the untagged nodes of the users the IdP put in it at
    their last login. `name` is folded to lower case (ASCII letters only, as the names coord
    stores are)."""

    name: str


@dataclasses.dataclass(frozen=True, slots=True)
class TagSel:
    tag: str


@dataclasses.dataclass(frozen=True, slots=True)
class MemberSel:
    """autogroup:member: every untagged node that belongs to a user."""


@dataclasses.dataclass(frozen=True, slots=True)
class TaggedSel:
    """autogroup:tagged: every tagged node."""


@dataclasses.dataclass(frozen=True, slots=True)
class SelfSel:
    """autogroup:self (destination only): the source's own untagged nodes."""


@dataclasses.dataclass(frozen=True, slots=True)
class InternetSel:
    """autogroup:internet (destination only): the public internet, through exit nodes."""


@dataclasses.dataclass(frozen=True, slots=True)
class PrefixSel:
    """Literal addresses: an IP, a CIDR, a host alias or an ipset (`label` says which)."""

    prefixes: tuple[IPNetwork, ...]
    label: str


Selector = (
    AnySel
    | UserSel
    | GroupSel
    | IdpGroupSel
    | TagSel
    | MemberSel
    | TaggedSel
    | SelfSel
    | PrefixSel
    | InternetSel
)
IdentitySel = UserSel | GroupSel | IdpGroupSel | TagSel | MemberSel | TaggedSel

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_group_name(name: str) -> str:
    """An IdP group name as stored and compared: ASCII letters folded to lower case, nothing
    else (full Unicode folding would let a look-alike, the Kelvin sign, name another group)."""
    return name.translate(_ASCII_LOWER)


def idp_group_name(ref: str) -> str | None:
    """`group:NAME@DOMAIN` -> its folded `name@domain`; None if `ref` is not shaped like one."""
    body = ref.removeprefix("group:")
    local, at, domain = body.partition("@")
    if not ref.startswith("group:") or not at or not local or not domain or "@" in domain:
        return None
    if any(c.isspace() or c == ":" for c in body):
        return None
    return fold_group_name(body)


def user_matches(pattern: str, user: str) -> bool:
    """Does policy user `pattern` name node owner `user`?

    Exact match, or Headscale's bare form `alice@` naming user `alice`.
    """
    if not user:
        return False
    if pattern == user:
        return True
    return pattern.endswith("@") and user == pattern[:-1]


@dataclasses.dataclass(frozen=True, slots=True)
class ProtoPorts:
    """Protocols and the destination port ranges allowed for them (ports only apply to
    PORT_PROTOS; other protocols are allowed whole)."""

    protos: frozenset[int]  # empty: every protocol
    ports: tuple[tuple[int, int], ...]

    def allows(self, proto: int, port: int) -> bool:
        if self.protos and proto not in self.protos:
            return False
        if proto not in PORT_PROTOS:
            return True
        return any(lo <= port <= hi for lo, hi in self.ports)

    def covers(self, proto: int, port: int) -> bool:
        """Like allows, but the port counts for every protocol (how a policy test reads a
        rule: rules on portless protocols carry `*`, which covers every port)."""
        if self.protos and proto not in self.protos:
            return False
        return any(lo <= port <= hi for lo, hi in self.ports)


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """One network-level allow rule: any of `src` may reach any of `dst` with `allow`.

    An ACL entry with several `dst` items becomes one Rule per item (each has its own
    ports); a grant becomes one Rule. `origin` names where it came from ("acls[3]").
    """

    src: tuple[Selector, ...]
    dst: tuple[Selector, ...]
    allow: tuple[ProtoPorts, ...]
    origin: str
    pos: Pos | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TestTarget:
    """One `accept`/`deny` entry of a policy test: a destination and a single port."""

    text: str
    sel: Selector
    port: int
    pos: Pos | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyTest:
    src: str
    src_sel: Selector
    protos: frozenset[int]
    proto_name: str
    accept: tuple[TestTarget, ...]
    deny: tuple[TestTarget, ...]
    index: int
    pos: Pos | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AutoApprovers:
    """The policy's `autoApprovers`: whose advertisements coord approves without an admin.

    `routes` maps a prefix to the identities that may advertise it or anything inside it;
    `exit_node` lists the identities whose exit-node advertisement is approved.
    """

    routes: tuple[tuple[IPNetwork, tuple[IdentitySel, ...]], ...] = ()
    exit_node: tuple[IdentitySel, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...]
    groups: dict[str, tuple[str, ...]]
    hosts: dict[str, tuple[IPNetwork, ...]]
    ipsets: dict[str, tuple[IPNetwork, ...]]
    tag_owners: dict[str, tuple[str, ...]]
    tests: tuple[PolicyTest, ...]
    warnings: tuple[Diagnostic, ...] = ()
    source: str = ""  # the text it was parsed from, kept so coord can hand it back verbatim
    auto_approvers: AutoApprovers = AutoApprovers()

    def tag_owner_allows(
        self, user: str, tag: str, node_tags: Iterable[str] = (), user_groups: Iterable[str] = ()
    ) -> bool:
        """May a node of `user` (in IdP groups `user_groups`), carrying `node_tags`, take `tag`?

        Owners are users, groups containing the user (policy groups, or IdP groups the user is
        in), `autogroup:member` (any user) and other tags (a node already carrying that tag may
        add this one). `autogroup:admin` and `autogroup:owner` are not modelled (coord has no
        admin users): such tags are applied through the admin API only.
        """
        carried = frozenset(node_tags)
        for owner in self.tag_owners.get(tag, ()):
            if owner.startswith("group:"):
                if owner in self.groups:
                    if any(user_matches(u, user) for u in self.groups[owner]):
                        return True
                elif user and idp_group_name(owner) in frozenset(user_groups):
                    return True
            elif owner.startswith("tag:"):
                if owner in carried:
                    return True
            elif owner == "autogroup:member":
                if user:
                    return True
            elif not owner.startswith("autogroup:") and user_matches(owner, user):
                return True
        return False

    def undefined_tags(self, tags: Iterable[str]) -> list[str]:
        """The tags this policy does not define in tagOwners (none may be applied to a node)."""
        return [t for t in dict.fromkeys(tags) if t not in self.tag_owners]


def allow_all_policy() -> Policy:
    """Tailscale's default when no policy is set: every node may reach every other."""
    rule = Rule(
        src=(AnySel(),), dst=(AnySel(),), allow=(ProtoPorts(DEFAULT_PROTOS, ALL_PORTS),), origin="default"
    )
    return Policy((rule,), {}, {}, {}, {}, ())


# ---- what coord gives the compiler, and what the compiler gives the agent ----


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyNode:
    """A node as the policy sees it. A tagged node does not belong to its user for policy
    purposes (as in Tailscale); `user` is kept only for bookkeeping."""

    id: int
    user: str = ""
    tags: frozenset[str] = frozenset()
    addresses: tuple[str, ...] = ()  # "100.64.0.1", "fd7a:115c:a1e0::1"
    routes: tuple[str, ...] = ()  # approved subnet routes, "192.168.1.0/24"
    groups: frozenset[str] = frozenset()  # the user's IdP groups, folded ("eng@example.com")

    @property
    def is_tagged(self) -> bool:
        return bool(self.tags)


MAX_RULE_ITEMS = 65536  # bound what from_dict accepts from the wire


@dataclasses.dataclass(frozen=True, slots=True)
class FilterRule:
    """One inbound packet-filter rule for a node: packets from any of `src` to any of
    `dst` with a protocol in `protos` and (for port protocols) a destination port in
    `ports` are allowed."""

    src: tuple[str, ...]
    dst: tuple[str, ...]
    protos: tuple[int, ...]  # empty: every protocol
    ports: tuple[tuple[int, int], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": list(self.src),
            "dst": list(self.dst),
            "proto": list(self.protos),
            "ports": [[lo, hi] for lo, hi in self.ports],
        }

    @classmethod
    def from_dict(cls, raw: Any) -> FilterRule:
        """Decode and validate; raises ValueError on anything malformed."""
        if not isinstance(raw, dict):
            raise ValueError("filter rule: not an object")
        unknown = set(raw) - {"src", "dst", "proto", "ports"}
        if unknown:
            raise ValueError(f"filter rule: unknown fields {sorted(unknown)}")

        def prefixes(name: str) -> tuple[str, ...]:
            items = raw.get(name)
            if not isinstance(items, list) or len(items) > MAX_RULE_ITEMS:
                raise ValueError(f"filter rule: {name} must be a list")
            out = []
            for item in items:
                if not isinstance(item, str):
                    raise ValueError(f"filter rule: {name} entries must be strings")
                try:
                    out.append(str(ipaddress.ip_network(item, strict=False)))
                except ValueError as exc:
                    raise ValueError(f"filter rule: bad {name} prefix {item!r}: {exc}") from None
            return tuple(out)

        protos = raw.get("proto")
        if not isinstance(protos, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 255 for p in protos
        ):
            raise ValueError("filter rule: proto must be a list of protocol numbers 0-255")
        ports = raw.get("ports")
        if not isinstance(ports, list) or len(ports) > MAX_RULE_ITEMS:
            raise ValueError("filter rule: ports must be a list of [first, last]")
        pairs = []
        for pr in ports:
            if (
                not isinstance(pr, list)
                or len(pr) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) for p in pr)
                or not 0 <= pr[0] <= pr[1] <= 65535
            ):
                raise ValueError(f"filter rule: bad port range {pr!r}")
            pairs.append((pr[0], pr[1]))
        return cls(prefixes("src"), prefixes("dst"), tuple(protos), tuple(pairs))
