"""MagicDNS: what the agent's resolver answers itself and where it forwards the rest (no I/O).

`Resolver.resolve(query)` takes a parsed DNS query and returns either a response (`Answer`) or
the resolvers to forward it to (`Forward`):

- `<node>.<tailnet domain>`: A/AAAA from the netmap (this node and its peers), authoritative;
  other types get an empty answer, unknown names NXDOMAIN. Reverse lookups (PTR) of mesh
  addresses answer the node's name.
- Split DNS: a name under one of coord's route suffixes (say `cluster.local`) goes to that
  route's resolvers (through the mesh, when they sit behind a subnet router).
- Everything else goes to coord's global nameservers, or else to the host's own resolvers.

Names and records are rebuilt from each netmap (`update`); the wire format is dnspython's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset

from wiremesh.core.dnsconfig import DNSConfig
from wiremesh.core.netmap import NetworkMap, Node

TTL = 600  # as Tailscale's MagicDNS records; names change rarely and the netmap pushes changes
MESH_NETS = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    response: dns.message.Message
    kind: str  # "local", "nxdomain", "refused", ... (for counters)


@dataclasses.dataclass(frozen=True, slots=True)
class Forward:
    servers: tuple[str, ...]
    kind: str  # "route" (split DNS) or "upstream"


@dataclasses.dataclass(frozen=True, slots=True)
class Records:
    by_name: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]  # fqdn (no dot) -> (IPv4s, IPv6s)
    by_address: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str]  # -> fqdn (no dot)


def records_from(netmap: NetworkMap | None, config: DNSConfig) -> Records:
    by_name: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    by_address: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    nodes: Iterable[Node] = () if netmap is None else (netmap.self_node, *netmap.peers)
    for node in nodes:
        if node.expired or not node.name:
            continue
        fqdn = config.fqdn(node.name).rstrip(".")
        v4: list[str] = []
        v6: list[str] = []
        for text in node.addresses:
            try:
                ip = ipaddress.ip_interface(text).ip
            except ValueError:
                continue
            (v4 if ip.version == 4 else v6).append(str(ip))
            by_address.setdefault(ip, fqdn)
        by_name[fqdn] = (tuple(v4), tuple(v6))
    return Records(by_name, by_address)


def error_response(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response


class Resolver:
    def __init__(self, config: DNSConfig | None = None) -> None:
        self.config = config or DNSConfig()
        self.records = Records({}, {})
        self.host_resolvers: tuple[str, ...] = ()  # the host's own (set by the server)

    def update(self, netmap: NetworkMap | None, config: DNSConfig) -> None:
        self.config = config
        self.records = records_from(netmap, config)

    def fqdn(self, node_name: str) -> str:
        return self.config.fqdn(node_name)

    @property
    def upstream(self) -> tuple[str, ...]:
        return self.config.nameservers or self.host_resolvers

    def resolve(self, query: dns.message.Message) -> Answer | Forward:
        if query.opcode() != dns.opcode.QUERY:
            return Answer(error_response(query, dns.rcode.NOTIMP), "notimp")
        if len(query.question) != 1:
            return Answer(error_response(query, dns.rcode.FORMERR), "formerr")
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        if question.rdclass != dns.rdataclass.IN:
            return self._forward_or_fail(query, name)
        if self.config.magic_dns and (name == self.config.domain or name.endswith("." + self.config.domain)):
            return self._answer_name(query, question.name, name, question.rdtype)
        if question.rdtype == dns.rdatatype.PTR and name.endswith((".in-addr.arpa", ".ip6.arpa")):
            answer = self._answer_reverse(query, question.name)
            if answer is not None:
                return answer
        return self._forward_or_fail(query, name)

    def _forward_or_fail(self, query: dns.message.Message, name: str) -> Answer | Forward:
        routed = self.config.route_for(name)
        if routed:
            return Forward(routed, "route")
        if self.upstream:
            return Forward(self.upstream, "upstream")
        return Answer(error_response(query, dns.rcode.SERVFAIL), "no_upstream")

    def _answer_name(
        self, query: dns.message.Message, qname: dns.name.Name, name: str, rdtype: int
    ) -> Answer:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        found = self.records.by_name.get(name)
        if found is None:
            if name != self.config.domain:
                response.set_rcode(dns.rcode.NXDOMAIN)
                return Answer(response, "nxdomain")
            return Answer(response, "local")  # the domain itself exists, with no addresses
        v4, v6 = found
        wanted = []
        if rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and v4:
            wanted.append(("A", v4))
        if rdtype in (dns.rdatatype.AAAA, dns.rdatatype.ANY) and v6:
            wanted.append(("AAAA", v6))
        for kind, addresses in wanted:
            response.answer.append(dns.rrset.from_text(qname, TTL, "IN", kind, *addresses))
        return Answer(response, "local")

    def _answer_reverse(self, query: dns.message.Message, qname: dns.name.Name) -> Answer | None:
        try:
            ip = ipaddress.ip_address(dns.reversename.to_address(qname))
        except (ValueError, dns.exception.SyntaxError):
            return None
        if not any(ip.version == net.version and ip in net for net in MESH_NETS):
            return None  # not ours: forward it
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        fqdn = self.records.by_address.get(ip)
        if fqdn is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return Answer(response, "nxdomain")
        response.answer.append(dns.rrset.from_text(qname, TTL, "IN", "PTR", fqdn + "."))
        return Answer(response, "local")
