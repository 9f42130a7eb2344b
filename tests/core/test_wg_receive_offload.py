"""The Device's receive-offload API: a session's receive side decrypted elsewhere (the agent's
receive worker), with counters, confirmation, roaming and timers learnt through note_received."""

from __future__ import annotations

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from wg_core_pair import A_ENDPOINT, A_V4, B_V4, Pair, ipv4_packet

from wiremesh.core.wireguard import EndpointChanged


def _index(datagram: bytes) -> int:
    return int.from_bytes(datagram[4:8], "little")


def test_exported_receive_key_decrypts_the_peers_transport_messages() -> None:
    p = Pair()
    p.connect()
    index = p.peer_a.current.local_index
    state = p.b.export_receive_state(index)
    assert state is not None and index in p.b.session_indices()
    peer_key, recv_key, reject_deadline = state
    assert peer_key == p.pub_a and reject_deadline > p.now
    packet = ipv4_packet(A_V4, B_V4, b"elsewhere")
    datagram, _ = p.a.send(packet, p.now)  # type: ignore[misc]
    assert _index(datagram) == index
    plain = ChaCha20Poly1305(recv_key).decrypt(bytes(4) + datagram[8:16], datagram[16:], None)
    assert plain[: len(packet)] == packet


def test_note_received_confirms_a_responders_next_session() -> None:
    p = Pair()
    p.send_a(ipv4_packet(A_V4, B_V4, b"first"))
    # Deliver the initiation and the response, but not a's first data packet: b's session waits.
    for datagram, destination, source in p.take():
        p.deliver(datagram, destination, source)
    for datagram, destination, source in p.take():
        p.deliver(datagram, destination, source)
    pending = p.peer_a.next
    assert pending is not None and p.peer_a.current is None
    p.b.note_received(pending.local_index, A_ENDPOINT, 96, 1, 1, p.now)
    assert p.peer_a.current is pending and p.peer_a.next is None
    assert p.peer_a.rx_packets >= 2 and p.peer_a.t_keepalive is not None


def test_note_received_roams_to_a_new_source() -> None:
    p = Pair()
    p.connect()
    while p.b.next_event() is not None:
        pass
    p.b.note_received(p.peer_a.current.local_index, ("192.0.2.9", 4444), 96, 1, 0, p.now)
    assert p.peer_a.endpoint == ("192.0.2.9", 4444)
    assert p.b.next_event() == EndpointChanged(p.pub_a, ("192.0.2.9", 4444))


def test_note_received_for_an_unknown_session_changes_nothing() -> None:
    p = Pair()
    p.connect()
    before = p.peer_a.rx_packets
    p.b.note_received(12345, A_ENDPOINT, 96, 3, 3, p.now)
    assert p.peer_a.rx_packets == before


def test_expired_sessions_drop_packets_and_the_next_send_starts_a_handshake() -> None:
    p = Pair()
    p.connect()
    p.a.expire_sessions(p.a.session_indices())
    p.a.datagrams_to_send()
    assert p.a.send(ipv4_packet(A_V4, B_V4, b"after"), p.now) is None
    out = p.a.datagrams_to_send()
    assert len(out) == 1 and out[0][0][0] == 1  # a handshake initiation, at once
    datagram, _ = p.b.send(ipv4_packet(B_V4, A_V4, b"late"), p.now)  # type: ignore[misc]
    assert p.a.receive(datagram, ("10.9.9.9", 1), p.now) is None
    assert p.a.drops["expired_session"] == 1


def test_an_exported_session_opens_the_peers_messages_exactly_as_the_device_does() -> None:
    from wiremesh.core.wireguard.transport import ReceiveSession, receive_run

    p = Pair()
    p.connect()
    index = p.peer_a.current.local_index
    exported = ReceiveSession(*p.b.export_receive_state(index))  # type: ignore[misc]
    datagrams = [p.a.send(ipv4_packet(A_V4, B_V4, b"x" * n), p.now)[0] for n in (0, 1, 15, 16, 999)]  # type: ignore[index]
    peer = exported.peer
    for datagram in datagrams:
        run = receive_run(exported, peer, [datagram], 0, p.now, lambda src: peer)
        assert [w for _, _, writes in run.flows for w in writes] == [p.b.receive(datagram, A_ENDPOINT, p.now)]
        assert not run.drops
        again = receive_run(exported, peer, [datagram], 0, p.now, lambda src: peer)
        assert not again.flows and again.drops == {"replay": 1}
