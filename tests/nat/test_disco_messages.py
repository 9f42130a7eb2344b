"""disco: sealing, parsing and rejecting messages."""

from __future__ import annotations

import pytest

from wiremesh.core import disco
from wiremesh.core.disco import CallMeMaybe, DiscoError, DiscoKey, Endpoint, EndpointKind, Ping, Pong


@pytest.fixture
def keys() -> tuple[DiscoKey, DiscoKey]:
    return DiscoKey(), DiscoKey()


def test_ping_round_trips_and_names_its_sender(keys):
    a, b = keys
    ping = Ping(disco.new_tx_id(), bytes(range(32)))
    sender, message = b.open(a.seal(ping, b.public_key))
    assert sender == a.public_key
    assert message == ping


def test_pong_carries_ipv4_and_ipv6_sources(keys):
    a, b = keys
    for source in (("198.18.1.10", 41641), ("2001:db8::1", 7)):
        pong = Pong(disco.new_tx_id(), source)
        assert b.open(a.seal(pong, b.public_key))[1] == pong


def test_call_me_maybe_keeps_endpoint_kinds_and_flags(keys):
    a, b = keys
    cmm = CallMeMaybe(
        (
            Endpoint(("192.168.1.10", 41641), EndpointKind.LOCAL),
            Endpoint(("198.18.1.2", 1024), EndpointKind.STUN),
        ),
        mapping_varies=True,
        birthday=True,
    )
    assert b.open(a.seal(cmm, b.public_key))[1] == cmm


def test_disco_is_not_mistaken_for_wireguard_or_stun(keys):
    a, b = keys
    data = a.seal(Ping(disco.new_tx_id(), bytes(32)), b.public_key)
    assert disco.is_disco(data)
    assert not (1 <= data[0] <= 4 and data[1:4] == b"\0\0\0")
    assert data[4:8] != b"\x21\x12\xa4\x42"


def test_tampered_message_fails_authentication(keys):
    a, b = keys
    data = bytearray(a.seal(Ping(disco.new_tx_id(), bytes(32)), b.public_key))
    data[-1] ^= 1
    with pytest.raises(DiscoError, match="authentication"):
        b.open(bytes(data))


def test_message_for_another_key_is_refused(keys):
    a, b = keys
    c = DiscoKey()
    with pytest.raises(DiscoError):
        c.open(a.seal(Ping(disco.new_tx_id(), bytes(32)), b.public_key))


@pytest.mark.parametrize("data", [b"", b"WM", disco.MAGIC + b"x" * 10, b"\x01\0\0\0" + b"x" * 100])
def test_garbage_is_a_clear_error(keys, data):
    with pytest.raises(DiscoError):
        keys[1].open(data)


def test_oversized_message_is_refused(keys):
    a, b = keys
    data = a.seal(Ping(disco.new_tx_id(), bytes(32)), b.public_key) + b"\0" * disco.MAX_DISCO
    with pytest.raises(DiscoError, match="too large"):
        b.open(data)


def test_unknown_message_type_is_refused():
    with pytest.raises(DiscoError, match="unknown"):
        disco.decode(b"\x09\x00")


def test_truncated_bodies_are_refused():
    for plain in (b"\x01\x00" + b"x" * 20, b"\x02\x00" + b"x" * 12, b"\x03\x00"):
        with pytest.raises(DiscoError, match="truncated"):
            disco.decode(plain)


def test_call_me_maybe_endpoint_count_is_bounded():
    too_many = CallMeMaybe(tuple(Endpoint(("10.0.0.1", p)) for p in range(1, disco.MAX_ENDPOINTS + 2)))
    with pytest.raises(DiscoError, match="at most"):
        disco.encode(too_many)


def test_netmap_peers_become_magicsock_peer_infos():
    from wiremesh.agent.mesh.binding import peer_infos_from_netmap
    from wiremesh.core import crypto
    from wiremesh.core.netmap import Node

    key, dkey = bytes(range(32)), bytes(range(1, 33))
    node = Node(
        id=1,
        name="b",
        hostname="b",
        user="u",
        node_key=crypto.encode_key(key),
        disco_key=crypto.encode_key(dkey),
        addresses=("100.64.0.2/32",),
        allowed_ips=("100.64.0.2/32",),
        endpoints=("198.18.1.2:41641", "[2001:db8::1]:7", "bad", "1.2.3.4:0"),
        home_relay=2,
    )
    (info,) = peer_infos_from_netmap([node])
    assert info.node_key == key and info.disco_key == dkey and info.home_region == 2
    assert [e.address for e in info.endpoints] == [("198.18.1.2", 41641), ("2001:db8::1", 7)]
