"""WireGuard timers on a fake clock: retransmit, give up, rekey, reject, keepalives, key erasure."""

from __future__ import annotations

from wg_core_pair import A_ENDPOINT, A_V4, B_V4, Pair, events, ipv4_packet

from wiremesh.core.wireguard import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_TIME,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
    HandshakeCompleted,
    HandshakeFailed,
)


def _initiations(datagrams: list[tuple[bytes, object]]) -> list[bytes]:
    return [d for d, _ in datagrams if d[:4] == b"\x01\x00\x00\x00"]


def _run_timers(p: Pair, until: float, step: float = 0.05) -> list[tuple[float, bytes]]:
    """Advance a's clock to `until`, firing its timers, collecting (time, datagram) it emits; nothing is delivered."""
    out = []
    while p.now < until:
        p.now = min(until, p.now + step)
        deadline = p.a.next_timer()
        if deadline is not None and deadline <= p.now:
            p.a.handle_timer(p.now)
        out += [(p.now, d) for d, _ in p.a.datagrams_to_send()]
    return out


def test_lost_response_leads_to_retransmission_after_rekey_timeout() -> None:
    p = Pair()
    start = p.now
    p.a.send(ipv4_packet(A_V4, B_V4), p.now)
    first = _initiations(p.a.datagrams_to_send())
    assert len(first) == 1
    p.b.receive(first[0], A_ENDPOINT, p.now)
    p.b.datagrams_to_send()  # the response is lost
    sent = _run_timers(p, start + REKEY_TIMEOUT + 0.5)
    assert len(sent) == 1
    when, retry = sent[0]
    assert REKEY_TIMEOUT <= when - start <= REKEY_TIMEOUT + 1 / 3 + 0.05
    assert retry != first[0] and retry[:4] == b"\x01\x00\x00\x00"
    p.b.receive(retry, A_ENDPOINT, p.now)
    p.pump()
    assert p.inbox_b == [ipv4_packet(A_V4, B_V4)]


def test_give_up_after_rekey_attempt_time_reports_handshake_failed() -> None:
    p = Pair()
    start = p.now
    p.a.send(ipv4_packet(A_V4, B_V4), p.now)
    p.a.datagrams_to_send()
    sent = _run_timers(p, start + REKEY_ATTEMPT_TIME + 10, step=0.25)
    failed = [e for e in events(p.a) if isinstance(e, HandshakeFailed)]
    assert failed == [HandshakeFailed(p.pub_b)]
    assert p.peer_b.handshakes_failed == 1
    assert all(when - start <= REKEY_ATTEMPT_TIME + REKEY_TIMEOUT + 1 for when, _ in sent)
    assert 15 <= len(sent) <= 19
    assert p.a.drops["handshake_timeout"] == 1  # the queued packet
    assert p.a.next_timer() is None or p.a.next_timer() > p.now


def test_send_rate_limits_initiations_to_one_per_rekey_timeout() -> None:
    p = Pair()
    for _ in range(10):
        p.a.send(ipv4_packet(A_V4, B_V4), p.now)
        p.now += 0.1
    assert len(_initiations(p.a.datagrams_to_send())) == 1


def test_rekey_after_rekey_after_time_keeps_traffic_flowing() -> None:
    p = Pair()
    p.connect()
    events(p.a)
    delivered = 0
    for i in range(int(REKEY_AFTER_TIME) + 30):
        p.advance(1.0, step=1.0)
        before = len(p.inbox_b)
        p.send_a(ipv4_packet(A_V4, B_V4, i.to_bytes(2, "big")))
        p.pump()
        delivered += len(p.inbox_b) - before
        p.send_b(ipv4_packet(B_V4, A_V4))
        p.pump()
    assert p.peer_b.handshakes_completed >= 2
    assert HandshakeCompleted(p.pub_b, True) in events(p.a)
    # Only the packet that triggered the rekey may wait in the queue; it is flushed after the handshake.
    assert delivered >= int(REKEY_AFTER_TIME) + 29
    assert p.a.drops.total() == 0 and p.b.drops.total() == 0


def test_session_is_rejected_after_reject_after_time() -> None:
    p = Pair()
    p.connect()
    held = p.a.send(ipv4_packet(A_V4, B_V4), p.now)
    assert held is not None
    p.now += REJECT_AFTER_TIME + 1
    assert p.b.receive(held[0], A_ENDPOINT, p.now) is None
    assert p.b.drops["expired_session"] == 1


def test_expired_session_is_not_used_for_sending() -> None:
    p = Pair()
    p.connect()
    p.a.datagrams_to_send()
    p.now += REJECT_AFTER_TIME + 1
    assert p.a.send(ipv4_packet(A_V4, B_V4), p.now) is None
    assert len(_initiations(p.a.datagrams_to_send())) == 1


def test_keepalive_sent_after_keepalive_timeout_when_data_is_unanswered() -> None:
    p = Pair()
    p.connect()
    p.send_a(ipv4_packet(A_V4, B_V4, b"needs ack"))
    start = p.now
    p.now = start + KEEPALIVE_TIMEOUT - 0.1
    p.b.handle_timer(p.now)
    assert p.b.datagrams_to_send() == []
    p.now = start + KEEPALIVE_TIMEOUT
    p.b.handle_timer(p.now)
    out = p.b.datagrams_to_send()
    assert len(out) == 1 and len(out[0][0]) == 32 and out[0][0][0] == 4


def test_no_keepalive_when_data_was_answered() -> None:
    p = Pair()
    p.connect()
    p.send_a(ipv4_packet(A_V4, B_V4))
    p.now += 1
    p.send_b(ipv4_packet(B_V4, A_V4))
    p.now += KEEPALIVE_TIMEOUT + 1
    p.b.handle_timer(p.now)
    assert p.b.datagrams_to_send() == []


def test_persistent_keepalive_sends_every_interval() -> None:
    p = Pair(keepalive_a=25)
    p.connect()
    start = p.now
    p.log.clear()
    p.advance(80, step=0.5)
    keepalives = [when for when, source, d in p.log if source == A_ENDPOINT and len(d) == 32]
    # b acknowledges a's first data with a keepalive at +10 s; every authenticated packet in either
    # direction restarts the persistent-keepalive interval, so a's keepalives follow at +35 and +60.
    assert [round(t - start) for t in keepalives] == [35, 60]


def test_persistent_keepalive_starts_a_handshake_when_configured() -> None:
    p = Pair(keepalive_a=25)
    p.a.handle_timer(p.now)
    assert len(_initiations(p.a.datagrams_to_send())) == 1


def test_unanswered_data_triggers_a_new_handshake() -> None:
    p = Pair()
    p.connect()
    start = p.now
    p.a.send(ipv4_packet(A_V4, B_V4), p.now)  # b never answers
    sent = _run_timers(p, start + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.5)
    inits = [when for when, d in sent if d[0] == 1]
    assert len(inits) == 1
    assert KEEPALIVE_TIMEOUT + REKEY_TIMEOUT <= inits[0] - start <= KEEPALIVE_TIMEOUT + REKEY_TIMEOUT + 0.4


def test_keys_are_erased_after_three_reject_after_times() -> None:
    p = Pair()
    p.connect()
    assert p.peer_b.current is not None
    p.now += 3 * REJECT_AFTER_TIME + 1
    p.a.handle_timer(p.now)
    assert p.peer_b.current is None and p.peer_b.previous is None


def test_next_timer_is_the_earliest_deadline() -> None:
    p = Pair()
    assert p.a.next_timer() is None
    p.a.send(ipv4_packet(A_V4, B_V4), p.now)
    deadline = p.a.next_timer()
    assert deadline is not None
    assert p.now + REKEY_TIMEOUT <= deadline <= p.now + REKEY_TIMEOUT + 1 / 3


def test_next_timer_never_later_than_a_due_timer_after_traffic() -> None:
    p = Pair()
    p.connect()
    p.send_a(ipv4_packet(A_V4, B_V4))
    deadline = p.b.next_timer()
    assert deadline is not None and deadline <= p.now + KEEPALIVE_TIMEOUT  # b owes a keepalive
