"""WireGuard transport data: padding, counters, replay window, reordering, routing and source checks."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from wg_core_pair import A_ENDPOINT, A_V4, A_V6, B_ENDPOINT, B_V4, B_V6, Pair, ipv4_packet, ipv6_packet

from wiremesh.core.wireguard.messages import TRANSPORT_HEADER_SIZE
from wiremesh.core.wireguard.replay import WINDOW_SIZE, ReplayWindow


def _sealed(p: Pair, payload: bytes = b"x") -> bytes:
    result = p.a.send(ipv4_packet(A_V4, B_V4, payload), p.now)
    assert result is not None
    return result[0]


def test_transport_plaintext_is_padded_to_16_bytes() -> None:
    p = Pair()
    p.connect()
    for size in (1, 15, 16, 17, 100):
        datagram = _sealed(p, b"y" * size)
        plain_len = len(datagram) - TRANSPORT_HEADER_SIZE - 16
        assert plain_len % 16 == 0 and plain_len >= 20 + size


def test_padding_is_stripped_on_receive() -> None:
    p = Pair()
    p.connect()
    packet = ipv4_packet(A_V4, B_V4, b"odd")
    assert p.b.receive(_sealed(p, b"odd"), A_ENDPOINT, p.now) == packet


def test_counters_increase_per_packet() -> None:
    p = Pair()
    p.connect()
    counters = [struct.unpack_from("<Q", _sealed(p), 8)[0] for _ in range(3)]
    assert counters == sorted(counters) and len(set(counters)) == 3


def test_data_flows_both_ways_ipv4_and_ipv6() -> None:
    p = Pair()
    p.connect()
    p.send_b(ipv4_packet(B_V4, A_V4, b"v4 back"))
    p.send_a(ipv6_packet(A_V6, B_V6, b"v6 there"))
    p.send_b(ipv6_packet(B_V6, A_V6, b"v6 back"))
    assert ipv6_packet(A_V6, B_V6, b"v6 there") in p.inbox_b
    assert p.inbox_a == [ipv4_packet(B_V4, A_V4, b"v4 back"), ipv6_packet(B_V6, A_V6, b"v6 back")]


def test_replayed_transport_packet_is_dropped_and_counted() -> None:
    p = Pair()
    p.connect()
    datagram = _sealed(p)
    assert p.b.receive(datagram, A_ENDPOINT, p.now) is not None
    assert p.b.receive(datagram, A_ENDPOINT, p.now) is None
    assert p.b.drops["replay"] == 1


def test_reordering_within_the_window_is_accepted() -> None:
    p = Pair()
    p.connect()
    datagrams = [_sealed(p, bytes([i])) for i in range(50)]
    for datagram in reversed(datagrams):
        assert p.b.receive(datagram, A_ENDPOINT, p.now) is not None
    assert p.b.drops["replay"] == 0


def test_packet_older_than_the_window_is_dropped() -> None:
    p = Pair()
    p.connect()
    old = _sealed(p)
    for _ in range(WINDOW_SIZE + 1):
        _sealed(p)
    assert p.b.receive(_sealed(p), A_ENDPOINT, p.now) is not None
    assert p.b.receive(old, A_ENDPOINT, p.now) is None
    assert p.b.drops["replay"] == 1


def test_tampered_transport_packet_is_dropped_as_decrypt_failed() -> None:
    p = Pair()
    p.connect()
    datagram = bytearray(_sealed(p))
    datagram[20] ^= 1
    assert p.b.receive(bytes(datagram), A_ENDPOINT, p.now) is None
    assert p.b.drops["decrypt_failed"] == 1


def test_forged_counter_does_not_advance_the_window() -> None:
    p = Pair()
    p.connect()
    good = _sealed(p)
    forged = bytearray(good)
    forged[8:16] = struct.pack("<Q", 10_000)
    assert p.b.receive(bytes(forged), A_ENDPOINT, p.now) is None
    assert p.b.receive(good, A_ENDPOINT, p.now) is not None


def test_transport_to_unknown_index_is_no_session() -> None:
    p = Pair()
    p.connect()
    datagram = bytearray(_sealed(p))
    datagram[4:8] = b"\xde\xad\xbe\xef"
    p.b.receive(bytes(datagram), A_ENDPOINT, p.now)
    assert p.b.drops["no_session"] == 1


def test_packet_without_route_is_dropped_as_no_route() -> None:
    p = Pair()
    assert p.a.send(ipv4_packet(A_V4, "10.5.5.5"), p.now) is None
    assert p.a.send(ipv6_packet(A_V6, "fd99::1"), p.now) is None
    assert p.a.drops["no_route"] == 2
    assert p.a.datagrams_to_send() == []


def test_non_ip_packet_from_tun_is_dropped_as_not_ip() -> None:
    p = Pair()
    for bad in (b"", b"\x45\x00", b"\x00" * 40, b"\x60" * 39):
        assert p.a.send(bad, p.now) is None
    assert p.a.drops["not_ip"] == 4


def test_inner_source_outside_allowed_ips_is_dropped() -> None:
    p = Pair()
    p.connect()
    # a routes 10.0.0.2 to b, but claims a source b does not allow for a.
    assert p.b.receive(_sealed_from(p, "10.0.0.99"), A_ENDPOINT, p.now) is None
    assert p.b.drops["source_not_allowed"] == 1


def test_inner_ipv6_source_outside_allowed_ips_is_dropped() -> None:
    p = Pair()
    p.connect()
    result = p.a.send(ipv6_packet("fd00::99", B_V6), p.now)
    assert result is not None
    assert p.b.receive(result[0], A_ENDPOINT, p.now) is None
    assert p.b.drops["source_not_allowed"] == 1


def _sealed_from(p: Pair, src: str) -> bytes:
    result = p.a.send(ipv4_packet(src, B_V4), p.now)
    assert result is not None
    return result[0]


def test_inner_non_ip_payload_is_dropped_as_not_ip() -> None:
    p = Pair()
    p.connect()
    session = p.peer_b.current
    assert session is not None
    # Seal a non-IP payload by hand with a's live session.
    datagram = p.a._seal(p.peer_b, session, b"\x00" * 32, p.now)
    assert p.b.receive(datagram, A_ENDPOINT, p.now) is None
    assert p.b.drops["not_ip"] == 1


def test_keepalive_is_an_empty_payload_and_returns_nothing() -> None:
    p = Pair()
    p.connect()
    session = p.peer_b.current
    assert session is not None
    datagram = p.a._seal(p.peer_b, session, b"", p.now)
    assert len(datagram) == 32
    assert p.b.receive(datagram, A_ENDPOINT, p.now) is None
    assert sum(p.b.drops.values()) == 0


def test_peer_counters_track_traffic() -> None:
    p = Pair()
    p.connect()
    before = (p.peer_b.tx_packets, p.peer_a.rx_packets)
    p.send_a(ipv4_packet(A_V4, B_V4))
    assert (p.peer_b.tx_packets, p.peer_a.rx_packets) == (before[0] + 1, before[1] + 1)
    assert p.peer_b.tx_bytes > 0 and p.peer_a.rx_bytes > 0


def test_responder_does_not_send_data_before_confirmation() -> None:
    p = Pair()
    p.a.send(ipv4_packet(A_V4, B_V4), p.now)
    ((init, _),) = p.a.datagrams_to_send()
    p.b.receive(init, A_ENDPOINT, p.now)
    p.b.datagrams_to_send()  # the response is "lost"
    assert p.b.send(ipv4_packet(B_V4, A_V4, b"early"), p.now) is None  # held, not sent on the new session
    assert [d for d, _ in p.b.datagrams_to_send() if d[0] == 4] == []


def test_responder_flushes_held_packets_once_confirmed() -> None:
    p = Pair()
    p.a.send(ipv4_packet(A_V4, B_V4), p.now)
    ((init, _),) = p.a.datagrams_to_send()
    p.b.receive(init, A_ENDPOINT, p.now)
    ((resp, _),) = p.b.datagrams_to_send()
    assert p.b.send(ipv4_packet(B_V4, A_V4, b"early"), p.now) is None
    p.a.receive(resp, B_ENDPOINT, p.now)
    p.pump()
    assert ipv4_packet(B_V4, A_V4, b"early") in p.inbox_a


def test_replay_window_unit_behaviour() -> None:
    w = ReplayWindow()
    assert w.update(0) and w.update(2) and w.update(1)
    assert not w.update(1)
    assert w.update(WINDOW_SIZE + 5)
    assert not w.check(5)
    assert w.check(WINDOW_SIZE + 4)


def test_packet_sealed_on_the_old_session_is_accepted_after_rekey() -> None:
    p = Pair()
    p.connect()
    in_flight = _sealed(p, b"late")
    old = p.peer_b.current
    p.now += 6
    p.a._initiate(p.peer_b, p.now, retry=False)
    p.pump()
    assert p.peer_b.current is not old
    assert p.b.receive(in_flight, A_ENDPOINT, p.now) == ipv4_packet(A_V4, B_V4, b"late")


def test_rekey_after_messages_starts_a_handshake_but_keeps_sending() -> None:
    from wiremesh.core.wireguard import REKEY_AFTER_MESSAGES

    p = Pair()
    p.connect()
    p.now += 6
    session = p.peer_b.current
    assert session is not None
    session.send_counter = REKEY_AFTER_MESSAGES
    assert p.a.send(ipv4_packet(A_V4, B_V4), p.now) is not None
    assert [d[:4] for d, _ in p.a.datagrams_to_send()] == [b"\x01\x00\x00\x00"]


def test_session_at_reject_after_messages_is_not_used() -> None:
    from wiremesh.core.wireguard import REJECT_AFTER_MESSAGES

    p = Pair()
    p.connect()
    p.now += 6
    session = p.peer_b.current
    assert session is not None
    session.send_counter = REJECT_AFTER_MESSAGES
    assert p.a.send(ipv4_packet(A_V4, B_V4), p.now) is None
    assert len(p.peer_b.queue) == 1


def test_queue_is_bounded_while_handshaking_and_keeps_the_newest() -> None:
    from wiremesh.core.wireguard.timers import MAX_QUEUED_PACKETS

    p = Pair()
    for i in range(MAX_QUEUED_PACKETS + 10):
        assert p.a.send(ipv4_packet(A_V4, B_V4, i.to_bytes(2, "big")), p.now) is None
    assert p.a.drops["queue_full"] == 10
    p.pump()
    assert len(p.inbox_b) == MAX_QUEUED_PACKETS
    assert p.inbox_b[-1] == ipv4_packet(A_V4, B_V4, (MAX_QUEUED_PACKETS + 9).to_bytes(2, "big"))


@given(st.lists(st.integers(0, 20_000), max_size=300))
def test_replay_window_matches_a_model(counters: list[int]) -> None:
    w = ReplayWindow()
    seen: set[int] = set()
    greatest = -1
    for c in counters:
        expected = c not in seen and greatest - c < WINDOW_SIZE
        assert w.check(c) == expected
        assert w.update(c) == expected
        if expected:
            seen.add(c)
            greatest = max(greatest, c)


def test_send_and_receive_accept_bytearray_and_memoryview_buffers() -> None:
    p = Pair()
    p.connect()
    packet = ipv4_packet(A_V4, B_V4, b"buffer")
    for buffer in (bytearray(packet), memoryview(packet), memoryview(bytearray(packet))):
        result = p.a.send(buffer, p.now)  # type: ignore[arg-type]
        assert result is not None
        assert p.b.receive(memoryview(bytearray(result[0])), A_ENDPOINT, p.now) == packet  # type: ignore[arg-type]
    assert p.b.drops.total() == 0
