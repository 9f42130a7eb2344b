"""MagicDNS decided without I/O: the DNS configuration coord sends, what the resolver answers
itself, where it forwards the rest, and how /etc/resolv.conf is read and written."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.reversename
import pytest

from wiremesh.agent.hostdns import MARKER, ResolvConf, render
from wiremesh.agent.magicdns import Answer, Forward, Resolver
from wiremesh.core.dnsconfig import DNSConfig, DNSConfigError
from wiremesh.core.netmap import NetworkMap, Node

CONFIG = DNSConfig.from_json(
    {"domain": "Mesh.Test.", "routes": {"cluster.local": ["10.96.0.10"], "svc.cluster.local": ["10.96.0.11"]}}
)


def node(i: int, name: str, **kw) -> Node:
    return Node(
        id=i,
        name=name,
        hostname=name,
        user="alice",
        node_key=f"k{i}",
        disco_key=f"d{i}",
        addresses=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i:x}/128"),
        allowed_ips=(),
        **kw,
    )


NETMAP = NetworkMap(
    version=1, self_node=node(1, "laptop"), peers=(node(2, "db"), node(3, "old", expired=True))
)


def resolver(config: DNSConfig = CONFIG, upstream: tuple[str, ...] = ("192.0.2.53",)) -> Resolver:
    r = Resolver()
    r.update(NETMAP, config)
    r.host_resolvers = upstream
    return r


def ask(r: Resolver, name: str, rdtype: str = "A") -> Answer | Forward:
    return r.resolve(dns.message.make_query(name, rdtype))


def texts(answer: Answer | Forward) -> list[str]:
    assert isinstance(answer, Answer)
    return [rd.to_text() for rrset in answer.response.answer for rd in rrset]


def test_peers_and_self_resolve_under_the_tailnet_domain_authoritatively():
    r = resolver()
    assert texts(ask(r, "db.mesh.test")) == ["100.64.0.2"]
    assert texts(ask(r, "DB.Mesh.Test.", "AAAA")) == ["fd7a:115c:a1e0::2"]
    assert texts(ask(r, "laptop.mesh.test")) == ["100.64.0.1"]
    answer = ask(r, "db.mesh.test")
    assert isinstance(answer, Answer) and answer.response.flags & dns.flags.AA


def test_unknown_and_expired_names_in_the_domain_are_nxdomain_not_forwarded():
    for name in ("nobody.mesh.test", "old.mesh.test"):
        answer = ask(resolver(), name)
        assert isinstance(answer, Answer) and answer.response.rcode() == dns.rcode.NXDOMAIN


def test_other_record_types_of_a_known_name_are_empty_answers():
    answer = ask(resolver(), "db.mesh.test", "MX")
    assert isinstance(answer, Answer) and answer.response.rcode() == dns.rcode.NOERROR
    assert texts(answer) == []


def test_reverse_lookups_of_mesh_addresses_name_the_node():
    r = resolver()
    assert texts(ask(r, dns.reversename.from_address("100.64.0.2").to_text(), "PTR")) == ["db.mesh.test."]
    v6 = dns.reversename.from_address("fd7a:115c:a1e0::2").to_text()
    assert texts(ask(r, v6, "PTR")) == ["db.mesh.test."]
    outside = ask(r, dns.reversename.from_address("192.0.2.1").to_text(), "PTR")
    assert outside == Forward(("192.0.2.53",), "upstream")


def test_split_dns_routes_the_longest_matching_suffix_to_its_resolvers():
    r = resolver()
    assert ask(r, "kube-dns.kube-system.svc.cluster.local") == Forward(("10.96.0.11",), "route")
    assert ask(r, "node1.cluster.local") == Forward(("10.96.0.10",), "route")
    assert ask(r, "notcluster.local") == Forward(("192.0.2.53",), "upstream")


def test_everything_else_goes_to_coords_nameservers_or_the_hosts():
    assert ask(resolver(), "example.com") == Forward(("192.0.2.53",), "upstream")
    global_ns = DNSConfig.from_json({"nameservers": ["9.9.9.9"]})
    assert ask(resolver(global_ns), "example.com") == Forward(("9.9.9.9",), "upstream")
    no_upstream = ask(resolver(upstream=()), "example.com")
    assert isinstance(no_upstream, Answer) and no_upstream.response.rcode() == dns.rcode.SERVFAIL


def test_with_magic_dns_off_tailnet_names_are_forwarded():
    off = DNSConfig.from_json({"magic_dns": False, "domain": "mesh.test"})
    assert isinstance(ask(resolver(off), "db.mesh.test"), Forward)


def test_a_netmap_update_changes_the_answers():
    r = resolver()
    renamed = NetworkMap(version=2, self_node=node(1, "laptop"), peers=(node(2, "database"),))
    r.update(renamed, CONFIG)
    assert texts(ask(r, "database.mesh.test")) == ["100.64.0.2"]
    assert isinstance(ask(r, "db.mesh.test"), Answer)
    assert ask(r, "db.mesh.test").response.rcode() == dns.rcode.NXDOMAIN  # type: ignore[union-attr]


def test_queries_that_are_not_plain_queries_get_an_error_not_an_exception():
    query = dns.message.make_query("db.mesh.test", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    answer = resolver().resolve(query)
    assert isinstance(answer, Answer) and answer.response.rcode() == dns.rcode.NOTIMP


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"domain": "bad domain"}, "not a domain name"),
        ({"routes": {"cluster.local": ["not-an-ip"]}}, "not an IP address"),
        ({"routes": {"cluster.local": "10.96.0.10"}}, "must be a list"),
        ({"magic_dns": "yes"}, "true or false"),
        ({"surprise": 1}, "unknown fields"),
        ([], "must be an object"),
    ],
)
def test_a_malformed_dns_configuration_is_refused_with_the_reason(raw, message):
    with pytest.raises(DNSConfigError, match=message):
        DNSConfig.from_json(raw)


def test_the_dns_configuration_round_trips_through_json():
    assert DNSConfig.from_json(CONFIG.to_json()) == CONFIG
    assert CONFIG.domain == "mesh.test" and CONFIG.fqdn("DB") == "db.mesh.test."


def test_resolv_conf_is_read_like_glibc_and_rewritten_around_magicdns():
    original = ResolvConf.parse(
        "# comment\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\n"
        "domain old.example\nsearch lab.example corp.example\noptions ndots:2 edns0\n"
    )
    assert original == ResolvConf(
        ("192.0.2.53", "fe80::1"), ("lab.example", "corp.example"), ("ndots:2", "edns0")
    )
    text = render(DNSConfig.from_json({"domain": "mesh.test", "search_domains": ["extra.test"]}), original)
    assert text.startswith(MARKER + "\n")
    assert "nameserver 100.100.100.100\n" in text
    assert "search mesh.test extra.test lab.example corp.example\n" in text
    assert "options ndots:2 edns0\n" in text
    assert "192.0.2.53" not in text


async def test_garbage_gets_formerr_with_its_id_and_a_short_packet_is_dropped():
    from wiremesh.agent.dnsserver import DNSServer

    server = DNSServer(resolver())
    reply = await server.answer(b"\x12\x34\x01\x00" + b"\xff" * 20, over_tcp=False)
    assert reply is not None and reply[:2] == b"\x12\x34"
    assert dns.message.from_wire(reply).rcode() == dns.rcode.FORMERR
    assert await server.answer(b"\x01\x02", over_tcp=False) is None
    assert server.counters["malformed"] == 2


async def test_a_response_too_big_for_udp_is_truncated_and_whole_over_tcp():
    from wiremesh.agent.dnsserver import DNSServer

    wide = Node(
        id=2,
        name="wide",
        hostname="wide",
        user="alice",
        node_key="k2",
        disco_key="d2",
        addresses=tuple(f"100.64.1.{i}/32" for i in range(1, 100)),
        allowed_ips=(),
    )
    r = Resolver()
    r.update(NetworkMap(version=1, self_node=node(1, "laptop"), peers=(wide,)), CONFIG)
    server = DNSServer(r)
    query = dns.message.make_query("wide.mesh.test", "A").to_wire()
    udp = await server.answer(query, over_tcp=False)
    assert udp is not None and len(udp) <= 512 and dns.message.from_wire(udp).flags & dns.flags.TC
    tcp = await server.answer(query, over_tcp=True)
    assert tcp is not None and len(dns.message.from_wire(tcp).answer[0]) == 99
    assert server.counters["truncated"] == 1
