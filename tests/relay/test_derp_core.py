"""DERP frame codec and the two connection state machines, wired together in memory."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import Box, PrivateKey, PublicKey

from wiremesh.core.derp import frames
from wiremesh.core.derp.connection import (
    ChallengeFailed,
    ClientConnection,
    ClientHello,
    Connected,
    IdleTimeout,
    PacketReceived,
    ServerConnection,
    State,
)
from wiremesh.core.derp.frames import FrameError, FrameReader, FrameType


def handshake(now: float = 0.0) -> tuple[ServerConnection, ClientConnection, PrivateKey, PrivateKey]:
    server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    server = ServerConnection(server_key, now=now)
    client = ClientConnection(client_key, now=now)
    client.receive_data(server.data_to_send(), now)
    [hello] = server.receive_data(client.data_to_send(), now)
    assert isinstance(hello, ClientHello)
    server.accept(now)
    [connected] = client.receive_data(server.data_to_send(), now)
    assert isinstance(connected, Connected)
    return server, client, server_key, client_key


def test_server_key_frame_starts_with_the_derp_magic() -> None:
    key = PrivateKey.generate()
    data = ServerConnection(key, now=0).data_to_send()
    assert data[0] == FrameType.SERVER_KEY
    assert struct.unpack("!I", data[1:5])[0] == 40 + frames.CHALLENGE_LEN
    assert data[5:13] == "DERP🔑".encode() == bytes.fromhex("44455250f09f9491")
    assert data[13:45] == bytes(key.public_key)


def test_server_key_carries_a_fresh_challenge_per_connection() -> None:
    key = PrivateKey.generate()
    first, second = (ServerConnection(key, now=0).data_to_send()[45:] for _ in range(2))
    assert len(first) == len(second) == frames.CHALLENGE_LEN
    assert first != second


def test_client_info_of_one_connection_is_refused_on_another() -> None:
    server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    first = ServerConnection(server_key, now=0)
    client = ClientConnection(client_key, now=0)
    client.receive_data(first.data_to_send(), 0)
    captured = client.data_to_send()
    with pytest.raises(ChallengeFailed, match="another connection's challenge"):
        ServerConnection(server_key, now=0).receive_data(captured, 0)


def test_client_info_without_an_answer_is_refused_unless_allowed() -> None:
    server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    sealed = Box(client_key, server_key.public_key).encrypt(b'{"version":2}', os.urandom(24))
    client_info = frames.encode_frame(FrameType.CLIENT_INFO, bytes(client_key.public_key) + sealed)
    with pytest.raises(ChallengeFailed, match="does not answer"):
        ServerConnection(server_key, now=0).receive_data(client_info, 0)
    lenient = ServerConnection(server_key, now=0, require_challenge=False)
    [hello] = lenient.receive_data(client_info, 0)
    assert isinstance(hello, ClientHello)


def test_a_server_key_without_a_challenge_gets_a_client_info_without_an_answer() -> None:
    """Tailscale's derper sends no challenge; our client then sends the plain ClientInfo."""
    server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    client = ClientConnection(client_key, now=0)
    client.receive_data(frames.encode(frames.ServerKey(bytes(server_key.public_key))), 0)
    [hello] = ServerConnection(server_key, now=0, require_challenge=False).receive_data(
        client.data_to_send(), 0
    )
    assert isinstance(hello, ClientHello) and "challenge" not in hello.info


def test_handshake_proves_the_client_key() -> None:
    server, client, _, client_key = handshake()
    assert server.client_key == bytes(client_key.public_key)
    assert server.state is State.ESTABLISHED and client.state is State.ESTABLISHED


def test_client_info_carries_version_and_can_ack_pings() -> None:
    server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    server = ServerConnection(server_key, now=0)
    client = ClientConnection(client_key, now=0)
    client.receive_data(server.data_to_send(), 0)
    [hello] = server.receive_data(client.data_to_send(), 0)
    assert isinstance(hello, ClientHello)
    assert hello.info["version"] == 2 and hello.can_ack_pings


def test_client_info_sealed_to_another_key_is_refused() -> None:
    server_key, impostor, victim = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
    server = ServerConnection(server_key, now=0)
    # The impostor claims the victim's public key but can only seal with its own private key.
    box = Box(impostor, server_key.public_key)
    nonce = os.urandom(24)
    sealed = nonce + box.encrypt(b'{"version":2}', nonce).ciphertext
    frame = frames.encode_frame(FrameType.CLIENT_INFO, bytes(victim.public_key) + sealed)
    with pytest.raises(FrameError, match="does not open"):
        server.receive_data(frame, 0)


def test_packet_before_client_info_is_refused() -> None:
    server = ServerConnection(PrivateKey.generate(), now=0)
    with pytest.raises(FrameError, match="expected ClientInfo"):
        server.receive_data(frames.encode(frames.SendPacket(bytes(32), b"x")), 0)


def test_client_info_larger_than_the_handshake_limit_is_refused_from_its_header() -> None:
    server = ServerConnection(PrivateKey.generate(), now=0)
    with pytest.raises(FrameError, match="exceeds the limit"):
        server.receive_data(frames.frame_header(FrameType.CLIENT_INFO, 1 << 20), 0)


def test_send_packet_becomes_an_event_with_destination_and_payload() -> None:
    server, client, _, _ = handshake()
    dst = bytes(PrivateKey.generate().public_key)
    client.send_packet(dst, b"hello", 1)
    [event] = server.receive_data(client.data_to_send(), 1)
    assert event == frames.SendPacket(dst, b"hello")


def test_recv_packet_frame_reaches_the_client_with_its_source() -> None:
    server, client, _, _ = handshake()
    src = bytes(PrivateKey.generate().public_key)
    [event] = client.receive_data(server.recv_packet_frame(src, b"payload"), 1)
    assert event == PacketReceived(src, b"payload")


def test_packet_pipelined_behind_client_info_is_delivered_after_accept() -> None:
    server = ServerConnection(PrivateKey.generate(), now=0)
    client = ClientConnection(PrivateKey.generate(), now=0)
    client.receive_data(server.data_to_send(), 0)
    client.send_packet(bytes(32), b"early", 0)
    [hello] = server.receive_data(client.data_to_send(), 0)
    assert isinstance(hello, ClientHello)
    assert server.accept(0) == [frames.SendPacket(bytes(32), b"early")]


def test_oversized_send_packet_closes_from_the_header() -> None:
    server, _, _, _ = handshake()
    with pytest.raises(FrameError, match="exceeds the limit"):
        server.receive_data(frames.frame_header(FrameType.SEND_PACKET, frames.MAX_FRAME_LEN + 1), 1)


def test_send_packet_one_byte_over_64k_is_refused() -> None:
    server, _, _, _ = handshake()
    frame = frames.encode_frame(FrameType.SEND_PACKET, bytes(32) + bytes(frames.MAX_PACKET_SIZE + 1))
    with pytest.raises(FrameError, match="maximum"):
        server.receive_data(frame, 1)


def test_send_packet_of_exactly_64k_is_accepted() -> None:
    server, _, _, _ = handshake()
    frame = frames.encode_frame(FrameType.SEND_PACKET, bytes(32) + bytes(frames.MAX_PACKET_SIZE))
    [event] = server.receive_data(frame, 1)
    assert isinstance(event, frames.SendPacket) and len(event.packet) == frames.MAX_PACKET_SIZE


def test_client_refuses_to_send_a_packet_over_64k() -> None:
    _, client, _, _ = handshake()
    with pytest.raises(FrameError, match="exceeds"):
        client.send_packet(bytes(32), bytes(frames.MAX_PACKET_SIZE + 1), 1)


def test_truncated_frames_wait_for_the_rest() -> None:
    server, client, _, _ = handshake()
    client.send_packet(bytes(32), b"split me", 1)
    data = client.data_to_send()
    assert server.receive_data(data[:7], 1) == []
    assert server.receive_data(data[7:], 1) == [frames.SendPacket(bytes(32), b"split me")]


def test_server_answers_ping_with_pong() -> None:
    server, client, _, _ = handshake()
    client.send_frame(frames.Ping(b"12345678"), 1)
    assert server.receive_data(client.data_to_send(), 1) == []
    assert client.receive_data(server.data_to_send(), 1) == [frames.Pong(b"12345678")]


def test_client_answers_server_ping_with_pong() -> None:
    server, client, _, _ = handshake()
    server.send_frame(frames.Ping(b"abcdefgh"), 1)
    client.receive_data(server.data_to_send(), 1)
    assert server.receive_data(client.data_to_send(), 1) == [frames.Pong(b"abcdefgh")]


def test_server_sends_a_ping_after_the_keepalive_interval() -> None:
    server, client, _, _ = handshake()
    timer = server.get_timer()
    assert timer == pytest.approx(60.0)
    server.handle_timer(60.0)
    [event] = client.receive_data(server.data_to_send(), 60.0)
    assert isinstance(event, frames.Ping)


def test_silent_client_that_can_ack_pings_times_out() -> None:
    server, _, _, _ = handshake()
    assert server.handle_timer(180.0) == [IdleTimeout()]
    assert server.state is State.CLOSED


def test_client_sending_server_only_frames_is_refused() -> None:
    server, _, _, _ = handshake()
    with pytest.raises(FrameError, match="server-only"):
        server.receive_data(frames.encode(frames.RecvPacket(bytes(32), b"x")), 1)


def test_unknown_frame_types_are_skipped() -> None:
    server, _, _, _ = handshake()
    assert server.receive_data(frames.encode_frame(0x7F, b"future"), 1) == []


def test_client_rejects_an_unexpected_server_key() -> None:
    server = ServerConnection(PrivateKey.generate(), now=0)
    client = ClientConnection(PrivateKey.generate(), now=0, server_key=bytes(32))
    with pytest.raises(FrameError, match="differs"):
        client.receive_data(server.data_to_send(), 0)


def test_server_info_is_sealed_to_the_client() -> None:
    server_key, client_key = PrivateKey.generate(), PrivateKey.generate()
    server = ServerConnection(server_key, now=0)
    client = ClientConnection(client_key, now=0)
    client.receive_data(server.data_to_send(), 0)
    server.receive_data(client.data_to_send(), 0)
    server.accept(0, rate_bytes_per_second=1000, rate_burst=2000)
    data = server.data_to_send()
    assert data[0] == FrameType.SERVER_INFO
    box = Box(client_key, PublicKey(bytes(server_key.public_key)))
    plain = box.decrypt(data[5 + 24 :], data[5 : 5 + 24])
    assert b'"TokenBucketBytesPerSecond":1000' in plain


@pytest.mark.parametrize(
    "frame",
    [
        frames.SendPacket(b"d" * 32, b"pkt"),
        frames.RecvPacket(b"s" * 32, b"pkt"),
        frames.ForwardPacket(b"s" * 32, b"d" * 32, b"pkt"),
        frames.KeepAlive(),
        frames.NotePreferred(True),
        frames.PeerGone(b"k" * 32, frames.PeerGoneReason.NOT_HERE),
        frames.PeerPresent(b"k" * 32, ("192.0.2.1", 41641), frames.PeerPresentFlags.IS_REGULAR),
        frames.PeerPresent(b"k" * 32),
        frames.WatchConns(),
        frames.ClosePeer(b"k" * 32),
        frames.Ping(b"01234567"),
        frames.Pong(b"01234567"),
        frames.Health("duplicate connection"),
        frames.Restarting(1000, 30000),
        frames.ServerKey(b"k" * 32),
    ],
)
def test_frames_round_trip(frame: frames.Frame) -> None:
    [(frame_type, payload)] = FrameReader().feed(frames.encode(frame))
    assert frames.parse(frame_type, payload) == frame


def test_peer_gone_reason_byte_follows_the_key() -> None:
    data = frames.encode(frames.PeerGone(b"k" * 32, frames.PeerGoneReason.NOT_HERE))
    assert data == b"\x08\x00\x00\x00\x21" + b"k" * 32 + b"\x01"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_after_handshake_raises_frame_error_or_yields_events(data: bytes) -> None:
    server, _, _, _ = handshake()
    with contextlib.suppress(FrameError):
        server.receive_data(data, 1)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_as_handshake_raises_frame_error(data: bytes) -> None:
    server = ServerConnection(PrivateKey.generate(), now=0)
    with contextlib.suppress(FrameError):
        assert server.receive_data(data, 0) == []
