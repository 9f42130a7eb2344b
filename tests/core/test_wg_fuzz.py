"""Property tests: nothing a network can send makes Device.receive raise, and every rejection is counted."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wg_core_pair import A_ENDPOINT, A_V4, B_ENDPOINT, B_V4, Pair, ipv4_packet

from wiremesh.core.wireguard import Device


def _accepted_marks(device: Device) -> tuple[int, ...]:
    """Signals that an input was legitimately consumed (authenticated packet or a stored cookie)."""
    return tuple(peer.rx_packets for peer in device.peers.values()) + tuple(
        int(peer.cookie is not None) for peer in device.peers.values()
    )


def _feed(device: Device, datagram: bytes, now: float) -> None:
    drops_before = device.drops.total()
    marks_before = _accepted_marks(device)
    inner = device.receive(datagram, A_ENDPOINT, now)
    assert device.drops["internal_error"] == 0
    if inner is None:
        assert device.drops.total() > drops_before or _accepted_marks(device) != marks_before


def _valid_datagrams() -> tuple[Pair, list[tuple[bytes, Device]]]:
    """A connected pair plus one valid datagram of every type, each with the device it is meant for."""
    p = Pair()
    p.connect()
    transport = p.a.send(ipv4_packet(A_V4, B_V4, b"payload"), p.now)
    assert transport is not None
    p.now += 6
    p.a._initiate(p.peer_b, p.now, retry=False)
    ((init, _),) = p.a.datagrams_to_send()
    p.b.under_load = True
    p.b.receive(init, A_ENDPOINT, p.now)
    ((cookie_reply, _),) = p.b.datagrams_to_send()
    p.b.under_load = False
    p.b._initiate(p.peer_a, p.now, retry=False)
    ((b_init, _),) = p.b.datagrams_to_send()
    p.a.receive(b_init, B_ENDPOINT, p.now)
    ((response, _),) = p.a.datagrams_to_send()
    return p, [(init, p.b), (response, p.b), (cookie_reply, p.a), (transport[0], p.b)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_and_are_counted(data: bytes) -> None:
    p = Pair()
    p.connect()
    _feed(p.b, data, p.now)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=1, max_size=64))
def test_random_bytes_with_a_valid_type_header_are_counted(tail: bytes) -> None:
    p = Pair()
    for kind in (1, 2, 3, 4):
        _feed(p.b, bytes([kind, 0, 0, 0]) + tail, p.now)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(0, 3),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=4),
    st.integers(0, 8),
    st.booleans(),
)
def test_mutated_valid_packets_never_raise_and_are_counted(
    which: int, flips: list[tuple[int, int]], cut: int, under_load: bool
) -> None:
    p, datagrams = _valid_datagrams()
    original, target = datagrams[which]
    datagram = bytearray(original)
    for position, xor in flips:
        datagram[position % len(datagram)] ^= xor
    mutated = bytes(datagram[: len(datagram) - cut])
    target.under_load = under_load
    _feed(target, mutated, p.now + 1)


def test_exhaustive_truncations_of_every_type_are_counted_as_short() -> None:
    p, datagrams = _valid_datagrams()
    for datagram, target in datagrams:
        for size in range(len(datagram)):
            if datagram[0] == 4 and size >= 32:
                continue  # a shorter transport packet is still well-formed; it just fails to decrypt
            before = target.drops["short"]
            assert target.receive(datagram[:size], A_ENDPOINT, p.now + 1) is None
            assert target.drops["short"] == before + 1, (datagram[0], size)


def test_unknown_types_are_counted() -> None:
    p = Pair()
    for kind in (0, 5, 255):
        p.b.receive(bytes([kind, 0, 0, 0]) + bytes(60), A_ENDPOINT, p.now)
    p.b.receive(b"\x01\x01\x00\x00" + bytes(144), A_ENDPOINT, p.now)  # reserved bytes must be zero
    assert p.b.drops["unknown_type"] == 4


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_random_tun_packets_never_raise_in_send(data: bytes) -> None:
    p = Pair()
    p.connect()
    drops_before = p.a.drops.total()
    queued_before = len(p.peer_b.queue)
    result = p.a.send(data, p.now)
    if result is None:
        assert p.a.drops.total() > drops_before or len(p.peer_b.queue) > queued_before
