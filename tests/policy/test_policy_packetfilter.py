"""The agent's stateful inbound filter, driven with hand-built packets and an explicit clock."""

from __future__ import annotations

import struct

from policy_packets import ACK, ICMP4, ICMP6, SYN, TCP, UDP, icmp_echo, ip, packet

from wiremesh.core.packetfilter import TIMEOUTS, Filter
from wiremesh.core.policy.model import FilterRule

ME = "100.64.0.2"
PEER = "100.64.0.1"
OTHER = "100.64.0.3"
ME6 = "fd7a:115c:a1e0::2"
PEER6 = "fd7a:115c:a1e0::1"

SSH_FROM_PEER = FilterRule(
    src=(f"{PEER}/32", f"{PEER6}/128"), dst=(f"{ME}/32", f"{ME6}/128"), protos=(TCP,), ports=((22, 22),)
)


def ssh_only() -> Filter:
    return Filter([SSH_FROM_PEER])


def test_allowed_port_passes() -> None:
    assert ssh_only().check_inbound(packet(PEER, ME, TCP, 40000, 22), 0.0)


def test_other_port_is_dropped_as_no_rule() -> None:
    f = ssh_only()
    assert not f.check_inbound(packet(PEER, ME, TCP, 40000, 80), 0.0)
    assert f.drops["no_rule"] == 1


def test_other_source_is_dropped() -> None:
    assert not ssh_only().check_inbound(packet(OTHER, ME, TCP, 40000, 22), 0.0)


def test_other_protocol_on_allowed_port_is_dropped() -> None:
    assert not ssh_only().check_inbound(packet(PEER, ME, UDP, 40000, 22), 0.0)


def test_ipv6_rule_applies_to_ipv6_packets() -> None:
    f = ssh_only()
    assert f.check_inbound(packet(PEER6, ME6, TCP, 40000, 22), 0.0)
    assert not f.check_inbound(packet(PEER6, ME6, TCP, 40000, 23), 0.0)


def test_unsolicited_inbound_connection_is_denied() -> None:
    # PEER may not open connections to ME on port 80 ...
    f = ssh_only()
    assert not f.check_inbound(packet(PEER, ME, TCP, 80, 50000, SYN), 0.0)


def test_reply_to_our_outbound_tcp_flow_passes() -> None:
    f = ssh_only()
    f.note_outbound(packet(ME, PEER, TCP, 50000, 80, SYN), 0.0)
    assert f.check_inbound(packet(PEER, ME, TCP, 80, 50000, SYN | ACK), 0.1)
    assert f.accepted_replies == 1


def test_reply_from_a_different_port_is_not_a_reply() -> None:
    f = ssh_only()
    f.note_outbound(packet(ME, PEER, TCP, 50000, 80), 0.0)
    assert not f.check_inbound(packet(PEER, ME, TCP, 81, 50000, ACK), 0.1)


def test_reply_to_our_udp_flow_passes_and_expires() -> None:
    f = ssh_only()
    f.note_outbound(packet(ME, PEER, UDP, 5353, 53), 0.0)
    assert f.check_inbound(packet(PEER, ME, UDP, 53, 5353), 1.0)
    # Idle longer than the UDP timeout: the flow is gone (counted from the last packet seen).
    assert not f.check_inbound(packet(PEER, ME, UDP, 53, 5353), 1.0 + TIMEOUTS[UDP] + 1)


def test_outbound_traffic_keeps_a_flow_alive() -> None:
    f = ssh_only()
    t = 0.0
    for _ in range(5):
        f.note_outbound(packet(ME, PEER, UDP, 5353, 53), t)
        t += TIMEOUTS[UDP] * 0.9
    assert f.check_inbound(packet(PEER, ME, UDP, 53, 5353), t)


def test_icmp_echo_reply_passes_only_after_our_request() -> None:
    f = ssh_only()
    reply = ip(PEER, ME, ICMP4, icmp_echo(4, False, ident=77))
    assert not f.check_inbound(reply, 0.0)
    f.note_outbound(ip(ME, PEER, ICMP4, icmp_echo(4, True, ident=77)), 1.0)
    assert f.check_inbound(reply, 1.1)


def test_icmp_echo_reply_with_another_identifier_is_dropped() -> None:
    f = ssh_only()
    f.note_outbound(ip(ME, PEER, ICMP4, icmp_echo(4, True, ident=77)), 1.0)
    assert not f.check_inbound(ip(PEER, ME, ICMP4, icmp_echo(4, False, ident=78)), 1.1)


def test_icmpv6_echo_reply_passes_after_request() -> None:
    f = ssh_only()
    f.note_outbound(ip(ME6, PEER6, ICMP6, icmp_echo(6, True, ident=5)), 0.0)
    assert f.check_inbound(ip(PEER6, ME6, ICMP6, icmp_echo(6, False, ident=5)), 0.5)


def test_icmp_echo_reply_expires() -> None:
    f = ssh_only()
    f.note_outbound(ip(ME, PEER, ICMP4, icmp_echo(4, True, ident=9)), 0.0)
    assert not f.check_inbound(ip(PEER, ME, ICMP4, icmp_echo(4, False, ident=9)), TIMEOUTS[ICMP4] + 1)


def test_icmp_error_about_our_flow_passes() -> None:
    f = ssh_only()
    original = packet(ME, PEER, UDP, 5000, 9999)
    f.note_outbound(original, 0.0)
    unreachable = struct.pack("!BBHI", 3, 3, 0, 0) + original[:28]
    assert f.check_inbound(ip(PEER, ME, ICMP4, unreachable), 0.1)


def test_icmp_error_about_an_unknown_flow_is_dropped() -> None:
    f = ssh_only()
    original = packet(ME, PEER, UDP, 5000, 9999)
    unreachable = struct.pack("!BBHI", 3, 3, 0, 0) + original[:28]
    assert not f.check_inbound(ip(PEER, ME, ICMP4, unreachable), 0.1)


def test_icmp_allowed_by_rule_ignores_ports() -> None:
    f = Filter([FilterRule((f"{PEER}/32",), (f"{ME}/32",), (ICMP4,), ((22, 22),))])
    assert f.check_inbound(packet(PEER, ME, ICMP4, 1), 0.0)


def test_any_protocol_rule_allows_unlisted_protocols() -> None:
    f = Filter([FilterRule((f"{PEER}/32",), (f"{ME}/32",), (), ((0, 65535),))])
    assert f.check_inbound(ip(PEER, ME, 47, b"gre payload"), 0.0)
    assert f.check_inbound(packet(PEER, ME, TCP, 1, 2), 0.0)


def test_wildcard_source_prefix_matches_any_address() -> None:
    f = Filter([FilterRule(("0.0.0.0/0", "::/0"), (f"{ME}/32",), (TCP,), ((443, 443),))])
    assert f.check_inbound(packet("203.0.113.9", ME, TCP, 1, 443), 0.0)


def test_subnet_source_prefix_matches_inside_only() -> None:
    f = Filter([FilterRule(("192.168.1.0/24",), (f"{ME}/32",), (TCP,), ((443, 443),))])
    assert f.check_inbound(packet("192.168.1.77", ME, TCP, 1, 443), 0.0)
    assert not f.check_inbound(packet("192.168.2.77", ME, TCP, 1, 443), 0.0)


def test_destination_must_be_covered_by_the_rule() -> None:
    assert not ssh_only().check_inbound(packet(PEER, "100.64.0.99", TCP, 40000, 22), 0.0)


def test_new_rules_cut_flows_opened_by_others() -> None:
    f = ssh_only()
    assert f.check_inbound(packet(PEER, ME, TCP, 40000, 22, ACK), 0.0)
    f.set_rules([])
    assert not f.check_inbound(packet(PEER, ME, TCP, 40000, 22, ACK), 0.1)


def test_new_rules_keep_replies_to_our_own_flows() -> None:
    f = ssh_only()
    f.note_outbound(packet(ME, PEER, TCP, 50000, 80), 0.0)
    f.set_rules([])
    assert f.check_inbound(packet(PEER, ME, TCP, 80, 50000, ACK), 0.1)


def test_garbage_is_counted_not_raised() -> None:
    f = ssh_only()
    for junk in (b"", b"\x00" * 3, b"\x45" + b"\x00" * 5, b"\x60" * 20, b"\x4f" + b"\x00" * 25):
        assert not f.check_inbound(junk, 0.0)
    assert f.drops["not_ip"] == 2  # empty, and version 0
    assert f.drops["malformed"] == 3


def test_truncated_transport_header_is_malformed() -> None:
    f = ssh_only()
    assert not f.check_inbound(ip(PEER, ME, TCP, b"\x00\x16"), 0.0)
    assert f.drops["malformed"] == 1


def test_note_outbound_never_raises_on_garbage() -> None:
    f = ssh_only()
    for junk in (b"", b"\x45", b"\x60" * 10, b"\xff" * 60, ip(ME, PEER, TCP, b"\x00")):
        assert f.note_outbound(junk, 0.0) is True
    assert f.flow_count == 0


def test_non_first_fragment_passes() -> None:
    f = ssh_only()
    assert f.check_inbound(ip(PEER, ME, UDP, b"\x00" * 16, frag_offset=100), 0.0)


def test_ipv6_extension_headers_are_skipped() -> None:
    f = ssh_only()
    tcp = packet(PEER6, ME6, TCP, 40000, 22)[40:]
    hop_by_hop = bytes([TCP, 0]) + b"\x00" * 6  # next header TCP, length 0 (8 bytes)
    pkt = ip(PEER6, ME6, 0, hop_by_hop + tcp)
    assert f.check_inbound(pkt, 0.0)


def test_flow_table_is_bounded() -> None:
    f = Filter([], max_flows=100)
    for port in range(1000, 1500):
        f.note_outbound(packet(ME, PEER, UDP, port, 53), 0.0)
    assert f.flow_count <= 100
    assert f.flows_evicted >= 400
    # The most recent flows survive.
    assert f.check_inbound(packet(PEER, ME, UDP, 53, 1499), 0.1)


def test_expired_flows_are_swept() -> None:
    f = ssh_only()
    f.note_outbound(packet(ME, PEER, UDP, 1000, 53), 0.0)
    f.note_outbound(packet(ME, PEER, UDP, 1001, 53), TIMEOUTS[UDP] + 60)
    assert f.flow_count == 1


def test_empty_netmap_filter_means_allow_all() -> None:
    f = Filter.from_netmap([])
    assert f.check_inbound(packet(OTHER, ME, TCP, 1, 2), 0.0)


def test_netmap_filter_round_trips_rules() -> None:
    f = Filter.from_netmap([SSH_FROM_PEER.to_dict()])
    assert f.check_inbound(packet(PEER, ME, TCP, 40000, 22), 0.0)
    assert not f.check_inbound(packet(PEER, ME, TCP, 40000, 23), 0.0)


def test_a_batch_keeps_exactly_the_packets_check_inbound_would_pass() -> None:
    f = ssh_only()
    f.note_outbound_batch([packet(ME, PEER, UDP, 7000, 53)], 0.0)
    batch = [
        packet(PEER, ME, UDP, 53, 7000),  # reply to our flow
        packet(PEER, ME, TCP, 40000, 22),  # allowed by the rule
        packet(PEER, ME, TCP, 40000, 80),  # no rule
        packet(PEER, ME, UDP, 53, 7001),  # not our flow
    ]
    assert f.filter_inbound(batch, 0.5) == batch[:2]
    assert f.drops["no_rule"] == 2


def test_our_replies_do_not_keep_a_tcp_flow_the_peer_opened_alive_after_rules_change() -> None:
    f = ssh_only()
    assert f.check_inbound(packet(PEER, ME, TCP, 40000, 22, SYN), 0.0)
    f.note_outbound(packet(ME, PEER, TCP, 22, 40000, SYN | ACK), 0.1)
    assert f.check_inbound(packet(PEER, ME, TCP, 40000, 22, ACK), 0.2)
    f.note_outbound(packet(ME, PEER, TCP, 22, 40000, ACK), 0.3)
    f.set_rules([])
    assert not f.check_inbound(packet(PEER, ME, TCP, 40000, 22, ACK), 0.4)


def test_our_replies_do_not_keep_a_udp_flow_the_peer_opened_alive_after_rules_change() -> None:
    rule = FilterRule((f"{PEER}/32",), (f"{ME}/32",), (UDP,), ((53, 53),))
    f = Filter([rule])
    assert f.check_inbound(packet(PEER, ME, UDP, 5353, 53), 0.0)
    f.note_outbound(packet(ME, PEER, UDP, 53, 5353), 0.1)
    f.set_rules([])
    assert not f.check_inbound(packet(PEER, ME, UDP, 5353, 53), 0.2)


def test_connection_older_than_the_filter_is_adopted_by_our_next_packet() -> None:
    f = ssh_only()
    f.note_outbound(packet(ME, PEER, TCP, 50000, 443, ACK), 0.0)
    assert f.check_inbound(packet(PEER, ME, TCP, 443, 50000, ACK), 0.1)


def test_our_syn_opens_a_flow_even_on_a_tuple_the_peer_used_before() -> None:
    rule = FilterRule((f"{PEER}/32",), (f"{ME}/32",), (TCP,), ((1000, 1000),))
    f = Filter([rule])
    assert f.check_inbound(packet(PEER, ME, TCP, 2000, 1000, SYN), 0.0)
    f.set_rules([])
    f.note_outbound(packet(ME, PEER, TCP, 1000, 2000, SYN), 1.0)
    assert f.check_inbound(packet(PEER, ME, TCP, 2000, 1000, SYN | ACK), 1.1)


def test_the_first_policy_cuts_a_flow_the_peer_opened_while_no_policy_was_set() -> None:
    f = Filter(allow_all=True)
    assert f.check_inbound(packet(PEER, ME, TCP, 40000, 80, SYN), 0.0)
    f.note_outbound(packet(ME, PEER, TCP, 80, 40000, SYN | ACK), 0.1)
    f.note_outbound(packet(ME, PEER, TCP, 80, 40000, ACK), 0.2)
    f.set_rules([SSH_FROM_PEER], allow_all=False)
    f.note_outbound(packet(ME, PEER, TCP, 80, 40000, ACK), 0.3)  # our reply does not adopt it
    assert not f.check_inbound(packet(PEER, ME, TCP, 40000, 80, ACK), 0.4)


def test_the_first_policy_keeps_a_flow_we_opened_while_no_policy_was_set() -> None:
    f = Filter(allow_all=True)
    f.note_outbound(packet(ME, PEER, TCP, 50000, 443, SYN), 0.0)
    assert f.check_inbound(packet(PEER, ME, TCP, 443, 50000, SYN | ACK), 0.1)
    f.set_rules([SSH_FROM_PEER], allow_all=False)
    assert f.check_inbound(packet(PEER, ME, TCP, 443, 50000, ACK), 0.2)


def test_a_flow_the_new_rules_still_allow_keeps_passing() -> None:
    f = Filter(allow_all=True)
    assert f.check_inbound(packet(PEER, ME, TCP, 40000, 22, SYN), 0.0)
    f.set_rules([SSH_FROM_PEER], allow_all=False)
    assert f.check_inbound(packet(PEER, ME, TCP, 40000, 22, ACK), 0.1)


def test_going_back_to_no_policy_readmits_a_cut_flow() -> None:
    f = ssh_only()
    assert not f.check_inbound(packet(PEER, ME, UDP, 5353, 53), 0.0)
    f.set_rules([], allow_all=True)
    assert f.check_inbound(packet(PEER, ME, UDP, 5353, 53), 0.1)


def test_icmp_error_about_our_flow_from_another_address_is_dropped() -> None:
    f = ssh_only()
    original = packet(ME, PEER, UDP, 5000, 9999)
    f.note_outbound(original, 0.0)
    unreachable = struct.pack("!BBHI", 3, 3, 0, 0) + original[:28]
    assert not f.check_inbound(ip(OTHER, ME, ICMP4, unreachable), 0.1)
    assert f.drops["no_rule"] == 1


def test_icmpv6_packet_too_big_from_the_far_end_passes() -> None:
    f = ssh_only()
    original = packet(ME6, PEER6, UDP, 5000, 9999)
    f.note_outbound(original, 0.0)
    too_big = struct.pack("!BBHI", 2, 0, 0, 1280) + original[:48]
    assert f.check_inbound(ip(PEER6, ME6, ICMP6, too_big), 0.1)
    assert not f.check_inbound(ip("fd7a:115c:a1e0::3", ME6, ICMP6, too_big), 0.1)


def test_an_allowed_flow_and_a_cut_flow_in_one_batch() -> None:
    f = Filter(allow_all=True)
    ssh = packet(PEER, ME, TCP, 40000, 22, ACK)
    web = packet(PEER, ME, TCP, 40001, 80, ACK)
    assert f.filter_inbound([ssh, web], 0.0) == [ssh, web]
    f.set_rules([SSH_FROM_PEER], allow_all=False)
    assert f.filter_inbound([ssh, web, ssh], 0.1) == [ssh, ssh]
