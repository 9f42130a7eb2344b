"""The control channel's sans-I/O core, wired together in memory."""

from __future__ import annotations

import pytest

from wiremesh.core import crypto
from wiremesh.core.control.channel import (
    ClientCall,
    ControlError,
    FrameReader,
    HandshakeRefused,
    ReplayGuard,
    ServerCall,
    frame,
)
from wiremesh.core.netmap import MapDelta, NetmapError, NetworkMap, Node

SERVER = crypto.generate_private_key()
MACHINE = crypto.generate_private_key()


def exchange(payload: bytes = b"hello", now: float = 1000.0, guard: ReplayGuard | None = None):
    client = ClientCall(MACHINE, crypto.public_key(SERVER), payload, now)
    server = ServerCall(SERVER, client.request, now, guard or ReplayGuard())
    return client, server


def test_server_learns_machine_key_and_payload():
    _client, server = exchange(b"login")
    assert server.machine_key == crypto.public_key(MACHINE)
    assert server.payload == b"login"


def test_response_and_stream_frames_round_trip_in_order():
    client, server = exchange()
    reader = FrameReader()
    wire = server.respond(b"ok") + server.seal_frame(b"one") + server.seal_frame(b"two")
    frames = [f for i in range(0, len(wire), 7) for f in reader.feed(wire[i : i + 7])]
    assert client.read_response(frames[0]) == b"ok"
    assert [client.open_frame(f) for f in frames[1:]] == [b"one", b"two"]


def test_replayed_stream_frame_fails():
    client, server = exchange()
    client.read_response(FrameReader().feed(server.respond(b""))[0])
    sealed = FrameReader().feed(server.seal_frame(b"one"))[0]
    client.open_frame(sealed)
    with pytest.raises(ControlError):
        client.open_frame(sealed)


def test_reordered_stream_frames_fail():
    client, server = exchange()
    client.read_response(FrameReader().feed(server.respond(b""))[0])
    server.seal_frame(b"one")  # sent but not delivered first
    second = FrameReader().feed(server.seal_frame(b"two"))[0]
    with pytest.raises(ControlError):
        client.open_frame(second)


def test_replayed_handshake_is_refused():
    guard = ReplayGuard()
    client = ClientCall(MACHINE, crypto.public_key(SERVER), b"x", 1000.0)
    ServerCall(SERVER, client.request, 1000.0, guard)
    with pytest.raises(HandshakeRefused, match="replayed"):
        ServerCall(SERVER, client.request, 1001.0, guard)


@pytest.mark.parametrize("skew", [-500.0, 500.0])
def test_handshake_outside_freshness_window_is_refused(skew):
    client = ClientCall(MACHINE, crypto.public_key(SERVER), b"x", 1000.0 + skew)
    with pytest.raises(HandshakeRefused, match="stale"):
        ServerCall(SERVER, client.request, 1000.0, ReplayGuard(window=120))


def test_handshake_for_another_server_key_is_refused():
    other = crypto.generate_private_key()
    client = ClientCall(MACHINE, crypto.public_key(other), b"x", 1000.0)
    with pytest.raises(HandshakeRefused, match="handshake failed"):
        ServerCall(SERVER, client.request, 1000.0, ReplayGuard())


def test_every_single_bit_flip_is_refused():
    client = ClientCall(MACHINE, crypto.public_key(SERVER), b"payload", 1000.0)
    for i in range(0, len(client.request), 11):
        tampered = bytearray(client.request)
        tampered[i] ^= 0x80
        with pytest.raises(HandshakeRefused):
            ServerCall(SERVER, bytes(tampered), 1000.0, ReplayGuard())


def test_response_from_impostor_server_is_refused():
    client = ClientCall(MACHINE, crypto.public_key(SERVER), b"x", 1000.0)
    impostor_client = ClientCall(MACHINE, crypto.public_key(SERVER), b"x", 1000.0)
    server = ServerCall(SERVER, impostor_client.request, 1000.0, ReplayGuard())
    with pytest.raises(ControlError):
        client.read_response(FrameReader().feed(server.respond(b"forged"))[0])


def test_oversized_frame_header_is_refused_before_buffering():
    reader = FrameReader(max_frame=1024)
    with pytest.raises(ControlError, match="exceeds"):
        reader.feed(frame(b"x" * 2048)[:8])


def test_replay_guard_forgets_old_entries():
    guard = ReplayGuard(window=10)
    for i in range(100):
        guard.check_and_remember(bytes([i]) * 32, 1000.0 + i, 1000.0 + i)
    assert len(guard._seen) <= 21


def node(node_id: int, **kw) -> Node:
    base = dict(
        id=node_id,
        name=f"n{node_id}",
        hostname=f"n{node_id}",
        user="u",
        node_key=f"k{node_id}",
        disco_key=f"d{node_id}",
        addresses=(f"100.64.0.{node_id}/32",),
        allowed_ips=(f"100.64.0.{node_id}/32",),
    )
    base.update(kw)
    return Node(**base)


def test_netmap_json_round_trip():
    nm = NetworkMap(version=3, self_node=node(1), peers=(node(2), node(3, endpoints=("1.2.3.4:5",))))
    assert NetworkMap.from_json(nm.to_json()) == nm


def test_delta_adds_updates_and_removes_peers():
    nm = NetworkMap(version=1, self_node=node(1), peers=(node(2), node(3)))
    delta = MapDelta(version=2, peers_changed=(node(2, name="two"), node(4)), peers_removed=(3,))
    after = MapDelta.from_json(delta.to_json()).apply(nm)
    assert [p.id for p in after.peers] == [2, 4] and after.peer(2).name == "two"


def test_delta_with_old_version_is_refused():
    nm = NetworkMap(version=5, self_node=node(1))
    with pytest.raises(NetmapError):
        MapDelta(version=5).apply(nm)


@pytest.mark.parametrize("raw", [[], {"version": 1}, {"version": "1", "self": {}}, {"version": 1, "self": 5}])
def test_malformed_netmap_raises_netmap_error(raw):
    with pytest.raises(NetmapError):
        NetworkMap.from_json(raw)
