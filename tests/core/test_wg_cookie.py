"""mac2 and cookie replies: a responder under load makes initiators prove their address first."""

from __future__ import annotations

from wg_core_pair import A_ENDPOINT, A_V4, B_ENDPOINT, B_V4, Pair, ipv4_packet

from wiremesh.core.wireguard import REKEY_TIMEOUT
from wiremesh.core.wireguard.messages import COOKIE_REPLY_SIZE


def _initiation(p: Pair) -> bytes:
    p.a.send(ipv4_packet(A_V4, B_V4), p.now)
    ((init, _),) = p.a.datagrams_to_send()
    return init


def _retransmit(p: Pair) -> bytes:
    p.now += REKEY_TIMEOUT + 0.5
    p.a.handle_timer(p.now)
    ((init, _),) = p.a.datagrams_to_send()
    return init


def test_under_load_initiation_without_mac2_gets_a_cookie_reply() -> None:
    p = Pair()
    p.b.under_load = True
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((reply, endpoint),) = p.b.datagrams_to_send()
    assert endpoint == A_ENDPOINT
    assert len(reply) == COOKIE_REPLY_SIZE and reply[:4] == b"\x03\x00\x00\x00"
    assert p.b.drops["bad_mac2"] == 1
    assert p.peer_a.next is None  # no session was created


def test_retried_initiation_with_mac2_is_accepted_under_load() -> None:
    p = Pair()
    p.b.under_load = True
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((reply, _),) = p.b.datagrams_to_send()
    assert p.a.receive(reply, B_ENDPOINT, p.now) is None
    assert p.a.drops.total() == 0
    retry = _retransmit(p)
    assert retry[132:148] != bytes(16)  # mac2 now present
    p.b.receive(retry, A_ENDPOINT, p.now)
    out = p.b.datagrams_to_send()
    assert len(out) == 1 and out[0][0][:4] == b"\x02\x00\x00\x00"
    p.deliver(out[0][0], A_ENDPOINT, B_ENDPOINT)
    p.pump()
    assert p.inbox_b == [ipv4_packet(A_V4, B_V4)]


def test_cookie_is_bound_to_the_source_address() -> None:
    p = Pair()
    p.b.under_load = True
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((reply, _),) = p.b.datagrams_to_send()
    p.a.receive(reply, B_ENDPOINT, p.now)
    retry = _retransmit(p)
    p.b.receive(retry, ("198.51.100.1", 999), p.now)  # same mac2, different address
    ((again, _),) = p.b.datagrams_to_send()
    assert again[:4] == b"\x03\x00\x00\x00"
    assert p.b.drops["bad_mac2"] == 2


def test_not_under_load_mac2_is_not_required() -> None:
    p = Pair()
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((resp, _),) = p.b.datagrams_to_send()
    assert resp[:4] == b"\x02\x00\x00\x00"


def test_forged_cookie_reply_is_dropped_as_cookie_invalid() -> None:
    p = Pair()
    p.b.under_load = True
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((reply, _),) = p.b.datagrams_to_send()
    forged = reply[:40] + bytes([reply[40] ^ 1]) + reply[41:]
    p.a.receive(forged, B_ENDPOINT, p.now)
    assert p.a.drops["cookie_invalid"] == 1
    assert p.peer_b.cookie is None


def test_replayed_cookie_reply_is_dropped() -> None:
    p = Pair()
    p.b.under_load = True
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((reply, _),) = p.b.datagrams_to_send()
    p.a.receive(reply, B_ENDPOINT, p.now)
    p.a.receive(reply, B_ENDPOINT, p.now)
    assert p.a.drops["cookie_invalid"] == 1


def test_cookie_reply_for_unknown_index_is_dropped() -> None:
    p = Pair()
    p.b.under_load = True
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((reply, _),) = p.b.datagrams_to_send()
    p.a.receive(reply[:4] + b"\x00\x00\x00\x00" + reply[8:], B_ENDPOINT, p.now)
    assert p.a.drops["cookie_invalid"] == 1


def test_under_load_bad_mac1_is_dropped_without_a_cookie_reply() -> None:
    p = Pair()
    p.b.under_load = True
    init = bytearray(_initiation(p))
    init[120] ^= 1
    p.b.receive(bytes(init), A_ENDPOINT, p.now)
    assert p.b.drops["bad_mac1"] == 1
    assert p.b.datagrams_to_send() == []


def test_cookie_secret_rotates_every_two_minutes() -> None:
    from wiremesh.core import crypto
    from wiremesh.core.wireguard.cookie import CookieChecker, add_macs, open_cookie_reply

    responder = crypto.generate_private_key()
    responder_pub = crypto.public_key(responder)
    checker = CookieChecker(responder_pub, 1000.0)
    mac1_key = crypto.blake2s_hash(b"mac1----", responder_pub)
    cookie_key = crypto.blake2s_hash(b"cookie--", responder_pub)
    body = b"\x01\x00\x00\x00" + bytes(112)
    source = ("192.0.2.1", 51820)
    first, mac1 = add_macs(body, mac1_key, None)
    reply = checker.cookie_reply(first, 116, 7, source, 1000.0)
    cookie = open_cookie_reply(cookie_key, reply, mac1)
    with_mac2, _ = add_macs(body, mac1_key, cookie)
    assert checker.mac2_valid(with_mac2, 116, source, 1000.0 + 119)
    assert not checker.mac2_valid(with_mac2, 116, source, 1000.0 + 121)


def test_under_load_a_proven_address_is_still_rate_limited() -> None:
    from wiremesh.core.wireguard.cookie import HandshakeRateLimiter

    limiter = HandshakeRateLimiter()
    source = ("192.0.2.1", 1)
    allowed = [limiter.allow(source, 100.0) for _ in range(10)]
    assert allowed == [True] * 5 + [False] * 5
    assert limiter.allow(source, 100.1) is True  # refills at 20 per second
    assert limiter.allow(("192.0.2.9", 1), 100.0) is True  # other addresses have their own bucket


def test_device_counts_rate_limited_handshakes_under_load() -> None:
    p = Pair()
    p.b.under_load = True
    p.b.receive(_initiation(p), A_ENDPOINT, p.now)
    ((reply, _),) = p.b.datagrams_to_send()
    p.a.receive(reply, B_ENDPOINT, p.now)
    retry = _retransmit(p)
    for _ in range(8):
        p.b.receive(retry, A_ENDPOINT, p.now)
    assert p.b.drops["handshake_rate_limited"] == 3  # burst of 5 passes mac2 (1 accepted, 4 replays)


def test_initiator_under_load_makes_the_responder_prove_its_address_too() -> None:
    p = Pair()
    p.a.under_load = True
    init = _initiation(p)
    p.b.receive(init, A_ENDPOINT, p.now)
    ((resp, _),) = p.b.datagrams_to_send()
    p.a.receive(resp, B_ENDPOINT, p.now)
    ((reply, endpoint),) = p.a.datagrams_to_send()
    assert endpoint == B_ENDPOINT and reply[:4] == b"\x03\x00\x00\x00"
    assert p.a.drops["bad_mac2"] == 1
    p.b.receive(reply, A_ENDPOINT, p.now)
    assert p.peer_a.cookie is not None
    retry = _retransmit(p)
    p.b.receive(retry, A_ENDPOINT, p.now)
    ((resp2, _),) = p.b.datagrams_to_send()
    assert resp2[76:92] != bytes(16)  # the response now carries mac2
    p.deliver(resp2, A_ENDPOINT, B_ENDPOINT)
    p.pump()
    assert p.inbox_b == [ipv4_packet(A_V4, B_V4)]
