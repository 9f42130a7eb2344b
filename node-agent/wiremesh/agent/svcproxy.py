"""A proxy between the mesh and a cluster: wiremeshd in a pod of its own, forwarding with DNAT.

- **Ingress** (`--ingress-to 10.96.12.34`, a Service's cluster IP): TCP and UDP arriving from the
  mesh at this node's own mesh address go on to that address (kube-proxy then picks a backend),
  masqueraded, so the backend answers the proxy pod. Mesh devices reach the Service at the
  proxy's mesh address and MagicDNS name; the ACL applies to that address as to any node.
- **Egress** (`--egress-to NAME|IP`, a mesh device): TCP and UDP arriving at this pod from the
  cluster (a Service in front of the pod) go on to that device's mesh address through the tunnel,
  masqueraded to this node's mesh address, so the device sees a mesh identity the ACL knows. A
  name is looked up in the netmap (and followed when the device's address changes).

The rules live in the nftables table `ip wiremesh_proxy_<tun>`, replaced whole and removed at stop.
The agent's own ports (its UDP listen port, metrics) are never forwarded. The pod must forward
IPv4 (`net.ipv4.ip_forward=1`; the operator's proxy pods set it in an init container).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import re

from wiremesh.agent import exitnode
from wiremesh.agent.subnetrouter import SubnetRouterError, nft_table, run_nft
from wiremesh.core.dnsconfig import DEFAULT_DOMAIN
from wiremesh.core.netmap import NetworkMap

log = logging.getLogger("wiremesh.agent.svcproxy")


def table_name(tun: str) -> str:
    return "wiremesh_proxy_" + re.sub(r"[^A-Za-z0-9_]", "_", tun)


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyRules:
    """What to forward: ingress needs our own mesh address, egress the target's."""

    ingress_from: str = ""  # our mesh IPv4 address
    ingress_to: str = ""  # the cluster address behind us
    egress_to: str = ""  # the mesh device's IPv4 address
    keep_udp: tuple[int, ...] = ()  # our own ports, never forwarded
    keep_tcp: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.ingress_from and self.ingress_to) and not self.egress_to


def ruleset(tun: str, rules: ProxyRules) -> str:
    """The nft script for our table (pure)."""
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,15}", tun):
        raise ValueError(f"not an interface name: {tun!r}")
    for address in (rules.ingress_from, rules.ingress_to, rules.egress_to):
        if address:
            ipaddress.IPv4Address(address)  # ValueError for anything else
    keep = []
    if rules.keep_udp:
        keep.append(f"udp dport {{ {', '.join(str(p) for p in rules.keep_udp)} }} return")
    if rules.keep_tcp:
        keep.append(f"tcp dport {{ {', '.join(str(p) for p in rules.keep_tcp)} }} return")
    prerouting = []
    postrouting = []
    if rules.ingress_from and rules.ingress_to:
        prerouting.append(
            f'iifname "{tun}" ip daddr {rules.ingress_from} meta l4proto {{ tcp, udp }} '
            f"dnat to {rules.ingress_to}"
        )
        postrouting.append(f'iifname "{tun}" oifname != "{tun}" masquerade')
    if rules.egress_to:
        prerouting += [f'iifname != "{tun}" {rule}' for rule in keep]
        prerouting.append(
            f'iifname != "{tun}" fib daddr type local meta l4proto {{ tcp, udp }} dnat to {rules.egress_to}'
        )
        postrouting.append(f'oifname "{tun}" ip daddr {rules.egress_to} masquerade')
    return nft_table(
        f"ip {table_name(tun)}",
        [
            ("prerouting", "type nat hook prerouting priority dstnat", prerouting),
            ("postrouting", "type nat hook postrouting priority srcnat", postrouting),
        ],
    )


def wanted(
    netmap: NetworkMap | None,
    *,
    ingress_to: str,
    egress_to: str,
    keep_udp: tuple[int, ...] = (),
    keep_tcp: tuple[int, ...] = (),
) -> ProxyRules:
    """The rules for this netmap: nothing until our address (ingress) or the target (egress) is known."""
    if netmap is None:
        return ProxyRules()
    mine = _ipv4(netmap.self_node.addresses)
    target = ""
    if egress_to:
        try:
            target = str(ipaddress.IPv4Address(egress_to))
        except ValueError:
            name = _without_domain(egress_to, netmap)
            peer = next((p for p in netmap.peers if exitnode.matches(p, name)), None)
            target = _ipv4(peer.addresses) if peer is not None else ""
    return ProxyRules(
        ingress_from=mine if ingress_to else "",
        ingress_to=ingress_to,
        egress_to=target,
        keep_udp=keep_udp,
        keep_tcp=keep_tcp,
    )


def _without_domain(name: str, netmap: NetworkMap) -> str:
    """`laptop.wiremesh.internal.` -> `laptop` (the tailnet's MagicDNS domain, from the netmap)."""
    name = name.strip().lower().rstrip(".")
    domain = str((netmap.dns or {}).get("domain") or DEFAULT_DOMAIN).lower().rstrip(".")
    return name.removesuffix("." + domain)


def _ipv4(addresses: tuple[str, ...]) -> str:
    for text in addresses:
        try:
            ip = ipaddress.ip_interface(text).ip
        except ValueError:
            continue
        if ip.version == 4:
            return str(ip)
    return ""


class ServiceProxy:
    """Keeps the table in step with the netmap (`update`), removes it at `close`."""

    def __init__(
        self, tun: str, *, ingress_to: str = "", egress_to: str = "", keep_udp: tuple[int, ...] = (),
        keep_tcp: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        self.tun = tun
        self.ingress_to = ingress_to
        self.egress_to = egress_to
        self.keep_udp = keep_udp
        self.keep_tcp = keep_tcp
        self.applied: ProxyRules | None = None
        self.error = ""

    def update(self, netmap: NetworkMap | None) -> None:
        rules = wanted(
            netmap,
            ingress_to=self.ingress_to,
            egress_to=self.egress_to,
            keep_udp=self.keep_udp,
            keep_tcp=self.keep_tcp,
        )
        if rules == self.applied:
            return
        name = table_name(self.tun)
        try:
            run_nft(f"table ip {name}\ndelete table ip {name}\n{ruleset(self.tun, rules)}")
        except (SubnetRouterError, ValueError) as exc:
            self.error = str(exc)
            log.error("service_proxy_rules_failed error=%r", str(exc))
            return
        self.applied, self.error = rules, ""
        if self.egress_to and not rules.egress_to and netmap is not None:
            self.error = f"no peer {self.egress_to!r} in the netmap"
        log.info(
            "service_proxy_rules ingress=%s->%s egress=%s",
            rules.ingress_from or "-",
            rules.ingress_to or "-",
            rules.egress_to or "-",
        )

    def close(self) -> None:
        name = table_name(self.tun)
        try:
            run_nft(f"table ip {name}\ndelete table ip {name}\n")
        except SubnetRouterError as exc:
            log.warning("service_proxy_remove_failed error=%r", str(exc))

    def status(self) -> dict[str, str]:
        rules = self.applied or ProxyRules()
        return {
            "ingress_to": self.ingress_to,
            "egress_to": self.egress_to,
            "egress_address": rules.egress_to,
            "error": self.error,
        }
