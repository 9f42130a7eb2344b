"""Interface configuration through netlink (pyroute2): addresses, MTU, link state, routes, rules.

Everything acts on the calling process's current network namespace. Setters reconcile: they
take the whole desired set and add what is missing and remove what is no longer wanted, so the
control plane can call them again with a new network map.

Routes through the tunnel live in a routing table of the agent's own (52 by default, as
Tailscale's), selected by policy rules:

    5210: from all fwmark 0x80000/0xff0000 lookup main
    5220: from all to LAN-PREFIX lookup 52          (only while an exit node is in use without
                                                     LAN access: one per connected subnet)
    5230: from all lookup main suppress_prefixlength 0
    5270: from all lookup 52

5210 sends the agent's own marked packets (bypass.py: WireGuard, coord, relays) to the main
table, so they never enter the tunnel they carry, even when an exit node's default route is in
table 52. 5230 lets every route of the host's main table win except its default route, so a
CNI's routes to other nodes' pod CIDRs, a LAN route or a host route keep working even when a peer
advertises an overlapping prefix; 5270 sends everything else that the mesh routes into the
tunnel. The agent never adds, replaces or deletes a route in any other table, and removing the
table's rules (``remove_rules``) leaves the host exactly as it was.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from wiremesh.agent.bypass import BYPASS_MARK, BYPASS_MASK

log = logging.getLogger(__name__)

RTPROT_STATIC = 4
RTPROT_KERNEL = 2
MAIN_TABLE = 254
MESH_TABLE = 52
RULE_PRIORITY_BYPASS = 5210  # fwmark BYPASS_MARK lookup main
RULE_PRIORITY_LAN = 5220  # to a LAN prefix lookup MESH_TABLE (exit node without LAN access)
RULE_PRIORITY_MAIN = 5230  # lookup main suppress_prefixlength 0
RULE_PRIORITY_MESH = 5270  # lookup MESH_TABLE
EAFNOSUPPORT = 97

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class NetconfError(RuntimeError):
    """A netlink request failed; the message says which and why."""


def parse_interface_address(text: str) -> Interface:
    """'100.64.0.1/32', '100.64.0.1' (host prefix implied) or 'fd7a::1/128' -> ip_interface."""
    try:
        iface = ipaddress.ip_interface(text.strip())
    except ValueError as exc:
        raise ValueError(f"not an interface address: {text!r}") from exc
    return iface


def parse_prefix(text: str) -> Network:
    """'10.0.0.0/24' or '10.0.0.1' (a host route) -> ip_network; host bits must be zero."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"not a network prefix (host bits must be zero): {text!r}") from exc


def _index(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetconfError(f"interface {ifname!r} does not exist")
    return int(found[0])


def interface_exists(ifname: str) -> bool:
    with IPRoute() as ipr:
        return bool(ipr.link_lookup(ifname=ifname))


def set_link(ifname: str, *, mtu: int | None = None, up: bool = True, txqueuelen: int | None = None) -> None:
    """Set the MTU and transmit queue length (if given) and bring the link up (or down)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        kwargs: dict[str, object] = {"state": "up" if up else "down"}
        if mtu is not None:
            kwargs["mtu"] = mtu
        if txqueuelen is not None:
            kwargs["txqlen"] = txqueuelen
        try:
            ipr.link("set", index=idx, **kwargs)
        except NetlinkError as exc:
            raise NetconfError(f"cannot set {ifname} {kwargs}: {exc}") from exc


def get_addresses(ifname: str) -> list[Interface]:
    """Global-scope addresses on the interface (link-local ones are the kernel's business)."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        out: list[Interface] = []
        for msg in ipr.get_addr(index=idx):
            addr = msg.get("address") or msg.get_attr("IFA_ADDRESS")
            if addr is None:
                continue
            iface = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
            if iface.ip.is_link_local:
                continue
            out.append(iface)
        return out


def set_addresses(
    ifname: str, addresses: Iterable[str | Interface], *, never_source: Iterable[str | Interface] = ()
) -> None:
    """Make the interface's (non-link-local) addresses exactly `addresses` plus `never_source`.

    `never_source` addresses (MagicDNS's 100.100.100.100 and fd7a:115c:a1e0::53) are local
    destinations that must never become the source of traffic leaving through the interface:
    IPv6 ones are added deprecated (preferred lifetime 0), and IPv4 ones after every other
    address, since the kernel picks the interface's first address as a source.
    """

    def parsed(items: Iterable[str | Interface]) -> list[Interface]:
        return list(dict.fromkeys(a if not isinstance(a, str) else parse_interface_address(a) for a in items))

    regular, special = parsed(addresses), parsed(never_source)
    wanted = set(regular) | set(special)
    current = set(get_addresses(ifname))
    added = [a for a in regular if a not in current]
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        stale = current - wanted
        if any(a.version == 4 for a in added):
            # Re-add IPv4 never-source addresses behind the new ones.
            stale |= {a for a in special if a.version == 4 and a in current}
        for iface in stale:
            try:
                ipr.addr("del", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            except NetlinkError as exc:
                raise NetconfError(f"cannot remove {iface} from {ifname}: {exc}") from exc
        current -= stale
        for iface in [*added, *(a for a in special if a not in current)]:
            family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
            extra: dict[str, object] = {}
            if iface in special and iface.version == 6:
                extra["IFA_CACHEINFO"] = {"ifa_preferred": 0, "ifa_valid": 0xFFFFFFFF}
            try:
                ipr.addr(
                    "add",
                    index=idx,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                    family=family,
                    **extra,
                )
            except NetlinkError as exc:
                raise NetconfError(f"cannot add {iface} to {ifname}: {exc}") from exc


def get_routes(ifname: str, *, table: int = MESH_TABLE) -> list[Network]:
    """Routes through the interface that we (proto static) installed in `table`."""
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        out: list[Network] = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, oif=idx, table=table):
                if msg["proto"] != RTPROT_STATIC or _table_of(msg) != table:
                    continue
                dst = msg.get("dst") or msg.get_attr("RTA_DST")
                if dst is None:
                    dst = "0.0.0.0" if family == socket.AF_INET else "::"
                out.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}"))
        return out


def set_routes(ifname: str, prefixes: Iterable[str | Network], *, table: int = MESH_TABLE) -> None:
    """Make the static routes through the interface in `table` exactly `prefixes`.

    `table` is the agent's own: "replace" there can only ever replace a route of ours.
    """
    wanted = {p if not isinstance(p, str) else parse_prefix(p) for p in prefixes}
    current = set(get_routes(ifname, table=table))
    with IPRoute() as ipr:
        idx = _index(ipr, ifname)
        for net in current - wanted:
            try:
                ipr.route("del", dst=str(net), oif=idx, proto=RTPROT_STATIC, table=table)
            except NetlinkError as exc:
                raise NetconfError(f"cannot remove route {net} via {ifname}: {exc}") from exc
        for net in sorted(wanted - current, key=str):
            try:
                ipr.route("replace", dst=str(net), oif=idx, proto=RTPROT_STATIC, table=table)
            except NetlinkError as exc:
                if exc.code == EAFNOSUPPORT:
                    raise NetconfError(f"cannot add route {net} via {ifname}: IPv6 is disabled") from exc
                raise NetconfError(f"cannot add route {net} via {ifname}: {exc}") from exc


def _table_of(msg: object) -> int:
    """The routing table of a route or rule message (the header byte caps at 255)."""
    table = msg.get_attr("RTA_TABLE") or msg.get_attr("FRA_TABLE")  # type: ignore[attr-defined]
    return int(table if table is not None else msg["table"])  # type: ignore[index]


def _is_bypass(msg: object) -> bool:
    return (
        msg.get_attr("FRA_PRIORITY") == RULE_PRIORITY_BYPASS  # type: ignore[attr-defined]
        and _table_of(msg) == MAIN_TABLE
        and msg.get_attr("FRA_FWMARK") == BYPASS_MARK  # type: ignore[attr-defined]
    )


def _rules(ipr: IPRoute, family: int, table: int) -> list[tuple[int, int]]:
    """(priority, table) of every rule at our priorities that points at `table` or is one of
    the main-table rules we add (lookup main with suppress_prefixlength 0; the bypass mark)."""
    found = []
    for msg in ipr.get_rules(family=family):
        priority = msg.get_attr("FRA_PRIORITY")
        rule_table = _table_of(msg)
        ours = (priority, rule_table) == (RULE_PRIORITY_MESH, table)
        shared = (priority, rule_table) == (RULE_PRIORITY_MAIN, MAIN_TABLE)
        if ours or (shared and msg.get_attr("FRA_SUPPRESS_PREFIXLEN") == 0) or _is_bypass(msg):
            found.append((priority, rule_table))
    return found


def install_rules(table: int = MESH_TABLE) -> tuple[int, ...]:
    """Add the two policy rules (module docstring) for IPv4 and IPv6, unless present.

    Returns the address families that have them: a host with IPv6 disabled gets IPv4 only.
    """
    if not 1 <= table <= 0xFFFFFFFF or table in (MAIN_TABLE, 253, 255):
        raise ValueError(f"routing table must be 1..2^32-1 and not main/default/local, got {table}")
    done = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                present = set(_rules(ipr, family, table))
                if (RULE_PRIORITY_BYPASS, MAIN_TABLE) not in present:
                    ipr.rule(
                        "add",
                        family=family,
                        table=MAIN_TABLE,
                        priority=RULE_PRIORITY_BYPASS,
                        fwmark=BYPASS_MARK,
                        fwmask=BYPASS_MASK,
                    )
                if (RULE_PRIORITY_MAIN, MAIN_TABLE) not in present:
                    ipr.rule(
                        "add",
                        family=family,
                        table=MAIN_TABLE,
                        priority=RULE_PRIORITY_MAIN,
                        FRA_SUPPRESS_PREFIXLEN=0,
                    )
                if (RULE_PRIORITY_MESH, table) not in present:
                    ipr.rule("add", family=family, table=table, priority=RULE_PRIORITY_MESH)
            except NetlinkError as exc:
                if family == socket.AF_INET6 and exc.code == EAFNOSUPPORT:
                    continue  # IPv6 disabled on this host
                raise NetconfError(f"cannot add routing rules for table {table}: {exc}") from exc
            done.append(family)
    return tuple(done)


def remove_rules(table: int = MESH_TABLE) -> bool:
    """Remove our rules for `table` (LAN rules included) and the shared main-table rules, unless
    the table still routes through another interface: another agent in this namespace (a static
    tunnel beside a mesh agent) uses the same table and rules. Call it after removing our
    interface, whose routes leave the table with it. Returns whether the rules were removed."""
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                if any(_table_of(r) == table for r in ipr.get_routes(family=family, table=table)):
                    return False
            except NetlinkError:
                continue
        set_lan_rules((), table)
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                rules = ipr.get_rules(family=family)
            except NetlinkError:
                continue
            others = [
                r for r in rules if r.get_attr("FRA_PRIORITY") == RULE_PRIORITY_MESH and _table_of(r) != table
            ]
            for priority, rule_table in _rules(ipr, family, table):
                if priority in (RULE_PRIORITY_MAIN, RULE_PRIORITY_BYPASS) and others:
                    continue
                try:
                    kwargs: dict[str, object] = {"family": family, "table": rule_table, "priority": priority}
                    if priority == RULE_PRIORITY_MAIN:
                        kwargs["FRA_SUPPRESS_PREFIXLEN"] = 0
                    if priority == RULE_PRIORITY_BYPASS:
                        kwargs.update(fwmark=BYPASS_MARK, fwmask=BYPASS_MASK)
                    ipr.rule("del", **kwargs)
                except NetlinkError as exc:
                    if exc.code != 2:  # ENOENT: already gone
                        raise NetconfError(f"cannot remove routing rule {priority}: {exc}") from exc
    return True


def get_lan_rules(table: int = MESH_TABLE) -> list[Network]:
    """The destinations of our LAN rules (priority 5220, looking up `table`)."""
    out: list[Network] = []
    with IPRoute() as ipr:
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                rules = ipr.get_rules(family=family)
            except NetlinkError:
                continue
            for msg in rules:
                if msg.get_attr("FRA_PRIORITY") != RULE_PRIORITY_LAN or _table_of(msg) != table:
                    continue
                dst = msg.get_attr("FRA_DST")
                if dst is not None:
                    out.append(ipaddress.ip_network(f"{dst}/{msg['dst_len']}"))
    return out


def set_lan_rules(prefixes: Iterable[str | Network], table: int = MESH_TABLE) -> None:
    """Make our LAN rules exactly `prefixes`: traffic to each goes to `table` (the exit node's
    default route) instead of main's connected route. Used while an exit node is in use and the
    LAN is not allowed; the agent's own marked traffic still reaches the LAN (rule 5210)."""
    wanted = {p if not isinstance(p, str) else parse_prefix(p) for p in prefixes}
    current = set(get_lan_rules(table))

    def lan_rule(ipr: IPRoute, action: str, net: Network) -> None:
        family = socket.AF_INET if net.version == 4 else socket.AF_INET6
        rule = {"table": table, "priority": RULE_PRIORITY_LAN, "dst": str(net.network_address)}
        try:
            ipr.rule(action, family=family, dst_len=net.prefixlen, **rule)
        except NetlinkError as exc:
            if action == "del" and exc.code == 2:
                return  # already gone
            if action == "add" and family == socket.AF_INET6 and exc.code == EAFNOSUPPORT:
                return  # IPv6 is off on this host
            verb = "remove" if action == "del" else "add"
            raise NetconfError(f"cannot {verb} the LAN rule for {net}: {exc}") from exc

    with IPRoute() as ipr:
        for net in current - wanted:
            lan_rule(ipr, "del", net)
        for net in sorted(wanted - current, key=str):
            lan_rule(ipr, "add", net)


def connected_prefixes(exclude: Iterable[str] = ()) -> tuple[str, ...]:
    """The host's directly connected subnets (main table, scope link, no gateway) on interfaces
    other than loopback and `exclude`: "the LAN" an exit node user may or may not reach.
    Link-local, multicast and the mesh's own ranges are left out."""
    skip = set(exclude) | {"lo"}
    mesh = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))
    out: list[str] = []
    with IPRoute() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for family in (socket.AF_INET, socket.AF_INET6):
            try:
                routes = ipr.get_routes(family=family, table=MAIN_TABLE)
            except NetlinkError:
                continue
            for msg in routes:
                dst = msg.get_attr("RTA_DST")
                if (
                    dst is None
                    or msg.get_attr("RTA_GATEWAY") is not None
                    or names.get(msg.get_attr("RTA_OIF")) in skip
                    or msg["type"] != 1  # unicast
                ):
                    continue
                net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
                if (
                    net.is_link_local
                    or net.is_multicast
                    or any(net.version == m.version and net.overlaps(m) for m in mesh)
                ):
                    continue
                out.append(str(net))
    return tuple(sorted(set(out)))


def remove_interface(ifname: str) -> bool:
    """Delete the interface if it exists; True if it was there."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        try:
            ipr.link("del", index=found[0])
        except NetlinkError as exc:
            if exc.code == 19:  # ENODEV: it went away on its own (the TUN fd closed)
                return False
            raise NetconfError(f"cannot remove {ifname}: {exc}") from exc
        return True
