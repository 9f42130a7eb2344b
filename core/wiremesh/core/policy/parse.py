"""Parse and validate a policy file (Tailscale's format, Headscale's subset).

`parse_policy(text)` returns a Policy or raises PolicyError carrying every problem found,
each with the line and column it refers to. Sections we do not implement are never
silently ignored: those that cannot widen access when ignored (ssh, nodeAttrs,
autoApprovers, derpMap, ...) are warnings; anything whose absence would let through
traffic the author meant to restrict (posture conditions, `via` routing, deny actions)
is an error.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable
from typing import Any

from wiremesh.core.policy.hujson import Document, HujsonError, Path, Pos, parse
from wiremesh.core.policy.model import (
    ALL_PORTS,
    DEFAULT_PROTOS,
    PORT_PROTOS,
    AnySel,
    AutoApprovers,
    Diagnostic,
    GroupSel,
    IdentitySel,
    IdpGroupSel,
    InternetSel,
    IPNetwork,
    MemberSel,
    Policy,
    PolicyError,
    PolicyTest,
    PrefixSel,
    ProtoPorts,
    Rule,
    Selector,
    SelfSel,
    TaggedSel,
    TagSel,
    TestTarget,
    UserSel,
    idp_group_name,
)
from wiremesh.core.policy.syntax import (
    MAX_ITEMS,
    parse_ip_capability,
    parse_ip_range,
    parse_ports,
    parse_proto,
    split_target_ports,
    subtract_prefixes,
)

SECTIONS = {"groups", "hosts", "tagOwners", "ipsets", "acls", "grants", "tests", "autoApprovers"}
# Ignoring these cannot let more traffic through our filter: warn.
HARMLESS_SECTIONS = {
    "ssh": "Tailscale SSH rules are not supported yet; the section is ignored",
    "sshTests": "SSH tests are not supported yet; the section is ignored",
    "nodeAttrs": "node attributes are not supported yet; the section is ignored",
    "derpMap": "the relay map is configured on coord, not in the policy; the section is ignored",
    "disableIPv4": "disableIPv4 is not supported yet; the setting is ignored",
    "randomizeClientPort": "randomizeClientPort is not supported yet; the setting is ignored",
    "OneCGNATRoute": "OneCGNATRoute is not supported yet; the setting is ignored",
    "postures": "device postures are not supported yet; the definitions are ignored",
    "attrConfig": "attrConfig is not supported yet; the section is ignored",
}
# Ignoring these would widen access: refuse.
UNSAFE_SECTIONS = {
    "defaultSrcPosture": "defaultSrcPosture is not supported yet (ignoring it would allow "
    "devices that fail the posture check)",
}
SUPPORTED_AUTOGROUPS = {"autogroup:member", "autogroup:tagged", "autogroup:self", "autogroup:internet"}

_TAG_RE = re.compile(r"^tag:[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_GROUP_RE = re.compile(r"^group:[^\s:]+$")
_IPSET_RE = re.compile(r"^ipset:[^\s:]+$")
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _path_text(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


class _Builder:
    def __init__(self, doc: Document | None, value: Any) -> None:
        self.doc = doc
        self.value = value
        self.diags: list[Diagnostic] = []
        self.groups: dict[str, tuple[str, ...]] = {}
        self.hosts: dict[str, tuple[IPNetwork, ...]] = {}
        self.ipsets: dict[str, tuple[IPNetwork, ...]] = {}
        self.tag_owners: dict[str, tuple[str, ...]] = {}

    # -- diagnostics --

    def pos(self, path: Path, key: bool = False) -> Pos | None:
        if self.doc is None:
            return None
        if key:
            return self.doc.key_pos(path) or self.doc.pos(path)
        return self.doc.pos(path)

    def error(self, message: str, path: Path, key: bool = False) -> None:
        self.diags.append(Diagnostic("error", message, self.pos(path, key), _path_text(path)))

    def warn(self, message: str, path: Path, key: bool = False) -> None:
        self.diags.append(Diagnostic("warning", message, self.pos(path, key), _path_text(path)))

    # -- shape helpers --

    def obj(self, value: Any, path: Path, what: str) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(f"{what} must be an object", path)
            return None
        return value

    def str_list(self, value: Any, path: Path, what: str) -> list[tuple[str, Path]]:
        if isinstance(value, str):  # a lone string where a list belongs is a common slip
            self.error(f"{what} must be a list of strings, not a single string", path)
            return []
        if not isinstance(value, list):
            self.error(f"{what} must be a list of strings", path)
            return []
        if len(value) > MAX_ITEMS:
            self.error(f"{what} has more than {MAX_ITEMS} entries", path)
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                out.append((item, (*path, i)))
            else:
                self.error(f"{what} entries must be strings", (*path, i))
        return out

    def check_keys(self, entry: dict[str, Any], path: Path, allowed: set[str], what: str) -> None:
        for key in entry:
            if key not in allowed:
                self.error(f"unknown field {key!r} in {what}", (*path, key), key=True)

    # -- sections --

    def build(self) -> Policy | None:
        top = self.obj(self.value, (), "the policy")
        if top is None:
            return None
        for key in top:
            if key in SECTIONS:
                continue
            if key in HARMLESS_SECTIONS:
                self.warn(f"section {key!r}: {HARMLESS_SECTIONS[key]}", (key,), key=True)
            elif key in UNSAFE_SECTIONS:
                self.error(f"section {key!r}: {UNSAFE_SECTIONS[key]}", (key,), key=True)
            else:
                self.error(f"unknown section {key!r}", (key,), key=True)
        # Order matters: later sections refer to names the earlier ones define.
        self.parse_groups(top.get("groups", {}))
        self.parse_hosts(top.get("hosts", {}))
        self.parse_tag_owners(top.get("tagOwners", {}))
        self.parse_ipsets(top.get("ipsets", {}))
        rules = self.parse_acls(top.get("acls", [])) + self.parse_grants(top.get("grants", []))
        tests = self.parse_tests(top.get("tests", []))
        approvers = self.parse_auto_approvers(top.get("autoApprovers", {}))
        if any(d.severity == "error" for d in self.diags):
            return None
        return Policy(
            rules=tuple(rules),
            groups=self.groups,
            hosts=self.hosts,
            ipsets=self.ipsets,
            tag_owners=self.tag_owners,
            tests=tuple(tests),
            warnings=tuple(self.diags),
            auto_approvers=approvers,
        )

    def parse_groups(self, value: Any) -> None:
        section = self.obj(value, ("groups",), "groups")
        if section is None:
            return
        for name, members in section.items():
            path: Path = ("groups", name)
            if not _GROUP_RE.match(name):
                self.error(f"group name {name!r} must start with 'group:'", path, key=True)
                continue
            users = []
            for member, mpath in self.str_list(members, path, f"members of {name}"):
                if member.startswith("group:"):
                    self.error(f"{name}: groups cannot contain other groups ({member!r})", mpath)
                elif member.startswith(("tag:", "autogroup:")) or "@" not in member:
                    self.error(f"{name}: member {member!r} is not a user (user@domain, or user@)", mpath)
                else:
                    users.append(member)
            self.groups[name] = tuple(users)

    def parse_hosts(self, value: Any) -> None:
        section = self.obj(value, ("hosts",), "hosts")
        if section is None:
            return
        for name, addr in section.items():
            path: Path = ("hosts", name)
            if not _HOST_RE.match(name) or "@" in name:
                self.error(
                    f"host alias {name!r} must be a plain name (letters, digits, '-', '.')", path, True
                )
                continue
            if not isinstance(addr, str):
                self.error(f"host {name!r} must be an IP address or CIDR string", path)
                continue
            try:
                self.hosts[name] = (ipaddress.ip_network(addr, strict=False),)
            except ValueError:
                self.error(f"host {name!r}: {addr!r} is not an IP address or CIDR", path)

    def parse_tag_owners(self, value: Any) -> None:
        section = self.obj(value, ("tagOwners",), "tagOwners")
        if section is None:
            return
        for tag in section:
            if not _TAG_RE.match(tag):
                self.error(f"tag {tag!r} must look like 'tag:name'", ("tagOwners", tag), key=True)
        for tag, owners in section.items():
            path: Path = ("tagOwners", tag)
            if not _TAG_RE.match(tag):
                continue
            ok = []
            for owner, opath in self.str_list(owners, path, f"owners of {tag}"):
                if owner.startswith("group:"):
                    if owner not in self.groups and idp_group_name(owner) is None:
                        self.error(f"{tag}: owner group {owner!r} is not defined in groups", opath)
                        continue
                elif owner.startswith("tag:"):
                    if owner not in section:
                        self.error(f"{tag}: owner tag {owner!r} is not defined in tagOwners", opath)
                        continue
                elif owner.startswith("autogroup:"):
                    if owner not in ("autogroup:admin", "autogroup:member", "autogroup:owner"):
                        self.error(f"{tag}: {owner!r} cannot own tags", opath)
                        continue
                elif "@" not in owner:
                    self.error(f"{tag}: owner {owner!r} is not a user, group:, tag: or autogroup:", opath)
                    continue
                ok.append(owner)
            self.tag_owners[tag] = tuple(ok)

    def parse_ipsets(self, value: Any) -> None:
        section = self.obj(value, ("ipsets",), "ipsets")
        if section is None:
            return
        resolving: set[str] = set()

        def resolve(name: str) -> tuple[IPNetwork, ...] | None:
            if name in self.ipsets:
                return self.ipsets[name]
            path: Path = ("ipsets", name)
            if name in resolving:
                self.error(f"ipset {name!r} refers to itself", path, key=True)
                return None
            resolving.add(name)
            add: list[IPNetwork] = []
            remove: list[IPNetwork] = []
            for entry, epath in self.str_list(section[name], path, f"entries of {name}"):
                op, _, rest = entry.partition(" ")
                target = entry
                bucket = add
                if op in ("add", "remove") and rest:
                    target = rest.strip()
                    bucket = add if op == "add" else remove
                nets = self.ipset_entry(target, epath, section, resolve)
                if nets is not None:
                    bucket.extend(nets)
            resolving.discard(name)
            try:
                result = subtract_prefixes(add, remove)
            except ValueError as exc:
                self.error(f"ipset {name!r}: {exc}", path, key=True)
                result = ()
            self.ipsets[name] = result
            return result

        for name in section:
            if not _IPSET_RE.match(name):
                self.error(f"ipset name {name!r} must start with 'ipset:'", ("ipsets", name), key=True)
                continue
            resolve(name)

    def ipset_entry(
        self,
        target: str,
        path: Path,
        section: dict[str, Any],
        resolve: Callable[[str], tuple[IPNetwork, ...] | None],
    ) -> tuple[IPNetwork, ...] | None:
        if target.startswith("ipset:"):
            if target not in section:
                self.error(f"ipset {target!r} is not defined", path)
                return None
            return resolve(target)
        host = target.removeprefix("host:")
        if host in self.hosts:
            return self.hosts[host]
        if target.startswith(("tag:", "group:", "autogroup:")) or "@" in target:
            self.error(f"ipsets hold addresses only; {target!r} is not an address, host or ipset", path)
            return None
        try:
            return parse_ip_range(target)
        except ValueError:
            self.error(f"ipset entry {target!r} is not an IP, CIDR, host alias or ipset", path)
            return None

    # -- autoApprovers --

    def parse_auto_approvers(self, value: Any) -> AutoApprovers:
        """`{"routes": {prefix: [approvers]}, "exitNode": [approvers]}`; approvers are users,
        groups, tags and autogroup:member / autogroup:tagged (identities: a tagged node is
        approved by its tags only, as everywhere in the policy)."""
        section = self.obj(value, ("autoApprovers",), "autoApprovers")
        if section is None:
            return AutoApprovers()
        self.check_keys(section, ("autoApprovers",), {"routes", "exitNode"}, "autoApprovers")
        routes: list[tuple[IPNetwork, tuple[IdentitySel, ...]]] = []
        table = section.get("routes", {})
        if self.obj(table, ("autoApprovers", "routes"), "autoApprovers.routes") is not None:
            for text, approvers in table.items():
                path: Path = ("autoApprovers", "routes", text)
                prefixes = self.approver_prefixes(text, path)
                who = self.approvers(approvers, path)
                routes.extend((p, who) for p in prefixes)
        exit_node = self.approvers(section.get("exitNode", []), ("autoApprovers", "exitNode"))
        return AutoApprovers(tuple(routes), exit_node)

    def approver_prefixes(self, text: str, path: Path) -> tuple[IPNetwork, ...]:
        host = text.removeprefix("host:")
        if host in self.hosts:
            return self.hosts[host]
        if text in self.ipsets:
            return self.ipsets[text]
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            self.error(f"autoApprovers route {text!r} is not a CIDR, host alias or ipset", path, key=True)
            return ()
        if net.prefixlen == 0:
            self.error(
                f"autoApprovers route {text!r}: exit nodes are approved by 'exitNode', not by a route",
                path,
                key=True,
            )
            return ()
        return (net,)

    def approvers(self, value: Any, path: Path) -> tuple[IdentitySel, ...]:
        out: list[IdentitySel] = []
        for text, apath in self.str_list(value, path, "approvers"):
            sel = self.target(text, apath, "approver")
            if isinstance(sel, UserSel | GroupSel | IdpGroupSel | TagSel | MemberSel | TaggedSel):
                out.append(sel)
            elif sel is not None:
                self.error(
                    f"approver {text!r} must be a user, group:, tag:, autogroup:member or autogroup:tagged",
                    apath,
                )
        return tuple(out)

    # -- targets --

    def target(self, text: str, path: Path, role: str) -> Selector | None:
        """Resolve one src/dst target; records an error and returns None if it is wrong."""
        if text == "*":
            return AnySel()
        if text.startswith("group:"):
            if text in self.groups:
                return GroupSel(text, self.groups[text])
            idp = idp_group_name(text)
            if idp is None:
                self.error(
                    f"group {text!r} is not defined in groups (an identity provider's group is "
                    "written group:NAME@DOMAIN)",
                    path,
                )
                return None
            return IdpGroupSel(idp)
        if text.startswith("tag:"):
            if text not in self.tag_owners:
                self.error(f"tag {text!r} has no owner: define it in tagOwners", path)
                return None
            return TagSel(text)
        if text.startswith("autogroup:"):
            if text == "autogroup:self":
                if role != "dst":
                    self.error("autogroup:self can only be used as a destination", path)
                    return None
                return SelfSel()
            if text == "autogroup:member":
                return MemberSel()
            if text == "autogroup:tagged":
                return TaggedSel()
            if text == "autogroup:internet":
                if role != "dst":
                    self.error("autogroup:internet can only be used as a destination", path)
                    return None
                return InternetSel()
            else:
                self.error(
                    f"{text!r} is not supported (supported: {', '.join(sorted(SUPPORTED_AUTOGROUPS))})", path
                )
            return None
        if text.startswith("ipset:"):
            if text not in self.ipsets:
                self.error(f"ipset {text!r} is not defined in ipsets", path)
                return None
            return PrefixSel(self.ipsets[text], text)
        if "@" in text:
            return UserSel(text)
        host = text.removeprefix("host:")
        if host in self.hosts:
            return PrefixSel(self.hosts[host], host)
        try:
            return PrefixSel(parse_ip_range(text), text)
        except ValueError:
            pass
        self.error(
            f"unknown {role} {text!r}: not a user (name@domain), group:, tag:, autogroup:, ipset:, "
            "host alias or IP address",
            path,
        )
        return None

    def check_self_sources(self, src: list[Selector], dst: list[Selector], path: Path) -> bool:
        """autogroup:self relates a source user to their own devices, so its sources must be
        identities (users, groups, autogroups) or `*`, not addresses."""
        if any(isinstance(d, SelfSel) for d in dst) and any(isinstance(s, PrefixSel) for s in src):
            self.error(
                "autogroup:self needs sources that are users, groups, autogroups or '*', not addresses",
                path,
            )
            return False
        return True

    def targets(self, value: Any, path: Path, role: str) -> list[Selector]:
        out = []
        for text, tpath in self.str_list(value, path, role):
            sel = self.target(text, tpath, role)
            if sel is not None:
                out.append(sel)
        return out

    # -- acls and grants --

    def parse_acls(self, value: Any) -> list[Rule]:
        if not isinstance(value, list):
            self.error("acls must be a list", ("acls",))
            return []
        rules: list[Rule] = []
        for i, entry in enumerate(value):
            path: Path = ("acls", i)
            if self.obj(entry, path, f"acls[{i}]") is None:
                continue
            self.check_keys(
                entry, path, {"action", "src", "dst", "proto", "users", "ports", "srcPosture"}, f"acls[{i}]"
            )
            if "srcPosture" in entry:
                self.error(
                    "srcPosture is not supported yet (ignoring it would widen access)",
                    (*path, "srcPosture"),
                    True,
                )
            action = entry.get("action")
            if action != "accept":
                where = (*path, "action") if "action" in entry else path
                self.error(
                    f"unsupported action {action!r}: only 'accept' is allowed (policies are deny-by-default)"
                    if action is not None
                    else 'acls entry has no action (expected "action": "accept")',
                    where,
                )
            src_key = "src" if "src" in entry else "users"
            dst_key = "dst" if "dst" in entry else "ports"
            for key in (src_key, dst_key):
                if key not in entry:
                    self.error(f"acls[{i}] has no {key!r}", path)
            protos = DEFAULT_PROTOS
            if "proto" in entry:
                try:
                    protos = parse_proto(entry["proto"])
                except ValueError as exc:
                    self.error(str(exc), (*path, "proto"))
            src = self.targets(entry.get(src_key, []), (*path, src_key), "src")
            origin = f"acls[{i}]"
            for text, dpath in self.str_list(entry.get(dst_key, []), (*path, dst_key), "dst"):
                try:
                    target_text, ports_text = split_target_ports(text)
                except ValueError as exc:
                    self.error(str(exc), dpath)
                    continue
                try:
                    ports = parse_ports(ports_text)
                except ValueError as exc:
                    # "tag:web" alone splits into "tag" and "web": say what is missing.
                    whole = text in self.hosts or (
                        text.count(":") == 1 and text.startswith(("tag:", "group:", "autogroup:", "ipset:"))
                    )
                    if whole:
                        self.error(
                            f"destination {text!r} has no ports: write '{text}:*' or '{text}:22'", dpath
                        )
                    else:
                        self.error(f"destination {text!r}: {exc}", dpath)
                    continue
                if not (protos & PORT_PROTOS) and ports != ALL_PORTS:
                    self.error(f"destination {text!r}: ports must be '*' for a protocol without ports", dpath)
                    continue
                sel = self.target(target_text, dpath, "dst")
                if sel is not None and not self.check_self_sources(src, [sel], dpath):
                    continue
                if sel is not None and src:
                    rules.append(
                        Rule(tuple(src), (sel,), (ProtoPorts(protos, ports),), origin, self.pos(path))
                    )
        return rules

    def parse_grants(self, value: Any) -> list[Rule]:
        if not isinstance(value, list):
            self.error("grants must be a list", ("grants",))
            return []
        rules: list[Rule] = []
        for i, entry in enumerate(value):
            path: Path = ("grants", i)
            if self.obj(entry, path, f"grants[{i}]") is None:
                continue
            self.check_keys(entry, path, {"src", "dst", "ip", "app", "via", "srcPosture"}, f"grants[{i}]")
            for key, why in (("via", "route filtering with via"), ("srcPosture", "srcPosture")):
                if key in entry:
                    self.error(
                        f"{why} is not supported yet (ignoring it would widen access)", (*path, key), True
                    )
            for key in ("src", "dst"):
                if key not in entry:
                    self.error(f"grants[{i}] has no {key!r}", path)
            if "ip" not in entry and "app" not in entry:
                self.error(f"grants[{i}] needs 'ip' (network capabilities)", path)
            if "app" in entry:
                self.warn(
                    "application capabilities ('app') are not supported yet; only 'ip' is enforced",
                    (*path, "app"),
                    True,
                )
            allow: list[ProtoPorts] = []
            for text, ipath in self.str_list(entry.get("ip", []), (*path, "ip"), "ip"):
                try:
                    allow.append(parse_ip_capability(text))
                except ValueError as exc:
                    self.error(str(exc), ipath)
            src = self.targets(entry.get("src", []), (*path, "src"), "src")
            dst = self.targets(entry.get("dst", []), (*path, "dst"), "dst")
            if not self.check_self_sources(src, dst, (*path, "dst")):
                continue
            if src and dst and allow:
                rules.append(Rule(tuple(src), tuple(dst), tuple(allow), f"grants[{i}]", self.pos(path)))
        return rules

    # -- tests --

    def parse_tests(self, value: Any) -> list[PolicyTest]:
        if not isinstance(value, list):
            self.error("tests must be a list", ("tests",))
            return []
        tests: list[PolicyTest] = []
        for i, entry in enumerate(value):
            path: Path = ("tests", i)
            if self.obj(entry, path, f"tests[{i}]") is None:
                continue
            self.check_keys(entry, path, {"src", "proto", "accept", "deny", "srcPostureAttrs"}, f"tests[{i}]")
            if "srcPostureAttrs" in entry:
                self.warn("srcPostureAttrs is not supported yet; ignored", (*path, "srcPostureAttrs"), True)
            src_text = entry.get("src")
            if not isinstance(src_text, str):
                self.error(f"tests[{i}] needs 'src' (a user, tag, host or IP)", path)
                continue
            src_sel = self.target(src_text, (*path, "src"), "test src")
            if isinstance(src_sel, (AnySel, MemberSel, TaggedSel)):
                self.error(
                    f"test src {src_text!r} must name one user, group, tag, host or IP", (*path, "src")
                )
                src_sel = None
            # Without `proto` a test asks about the protocols a rule allows by default (TCP, UDP,
            # ICMP), and passes `accept` when any of them gets through, as Tailscale does.
            proto_name = ""
            protos = DEFAULT_PROTOS
            if "proto" in entry:
                try:
                    protos = parse_proto(entry["proto"])
                    proto_name = str(entry["proto"])
                except ValueError as exc:
                    self.error(str(exc), (*path, "proto"))
            if not entry.get("accept") and not entry.get("deny"):
                self.error(f"tests[{i}] has neither 'accept' nor 'deny': it asserts nothing", path)
                continue
            accept = self.test_targets(entry.get("accept", []), (*path, "accept"), protos)
            deny = self.test_targets(entry.get("deny", []), (*path, "deny"), protos)
            if src_sel is not None:
                tests.append(
                    PolicyTest(src_text, src_sel, protos, proto_name, accept, deny, i, self.pos(path))
                )
        return tests

    def test_targets(self, value: Any, path: Path, protos: frozenset[int]) -> tuple[TestTarget, ...]:
        out = []
        for text, tpath in self.str_list(value, path, "test destinations"):
            try:
                target_text, port_text = split_target_ports(text)
            except ValueError as exc:
                self.error(str(exc), tpath)
                continue
            if port_text == "*" and not (protos & PORT_PROTOS):
                port = 0
            elif port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) <= 65535:
                port = int(port_text)
            elif port_text.isdigit() and int(port_text) == 0:
                self.error(f"test destination {text!r}: port 0 is not a port; name one port (1-65535)", tpath)
                continue
            else:
                self.error(
                    f"test destination {text!r} must name a single port (for example 'tag:web:443')", tpath
                )
                continue
            sel = self.target(target_text, tpath, "test dst")
            if isinstance(sel, (AnySel, MemberSel, TaggedSel, SelfSel, GroupSel, IdpGroupSel)):
                self.error(f"test destination {target_text!r} must name one user, tag, host or IP", tpath)
                continue
            if isinstance(sel, PrefixSel) and ("/" in target_text or not _one_address(sel)):
                # Tailscale refuses a CIDR here even when a rule opens all of it (even a /32):
                # a test asks about one host.
                self.error(
                    f"test destination {target_text!r} must be a single host, not a CIDR or range", tpath
                )
                continue
            if sel is not None:
                out.append(TestTarget(text, sel, port, self.pos(tpath)))
        return tuple(out)


def _one_address(sel: PrefixSel) -> bool:
    return len(sel.prefixes) == 1 and sel.prefixes[0].num_addresses == 1


def check_policy(text: str | bytes) -> tuple[Policy | None, list[Diagnostic]]:
    """Parse and validate; returns (policy or None, every diagnostic)."""
    try:
        doc = parse(text)
    except HujsonError as exc:
        return None, [Diagnostic("error", exc.message, exc.pos)]
    builder = _Builder(doc, doc.value)
    policy = builder.build()
    if policy is not None:
        source = text.decode() if isinstance(text, bytes) else text
        policy = _with_source(policy, source)
    return policy, builder.diags


def parse_policy(text: str | bytes) -> Policy:
    """Parse and validate policy text; raises PolicyError listing every error."""
    policy, diags = check_policy(text)
    if policy is None:
        raise PolicyError(diags)
    return policy


def check_policy_obj(value: Any) -> tuple[Policy | None, list[Diagnostic]]:
    """Like check_policy for an already-decoded structure (the ACL custom resource's spec);
    diagnostics carry no line/column (a YAML front end can map their messages itself)."""
    builder = _Builder(None, value)
    return builder.build(), builder.diags


def policy_from_obj(value: Any) -> Policy:
    """Validate an already-decoded structure (the ACL custom resource's spec, say).
    Diagnostics carry no positions; raises PolicyError."""
    builder = _Builder(None, value)
    policy = builder.build()
    if policy is None:
        raise PolicyError(builder.diags)
    return policy


def _with_source(policy: Policy, source: str) -> Policy:
    return dataclasses.replace(policy, source=source)
