"""The transport kernel's whole-batch calls (seal_tso, open_run, the replay window) make the same
bytes and verdicts natively (native/wgkernel) and in Python (wiremesh.core.wireguard.kernel); the
Device's TSO send makes what segmenting and send_batch make; the packet filter judges a flow run
as it judges each of its packets."""

from __future__ import annotations

import os
import random
import struct
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st
from test_gro_coalesce import seg4
from test_gso_segment import super4, super6

from wiremesh.core import gro, gso
from wiremesh.core.packetfilter import Filter
from wiremesh.core.policy.model import FilterRule
from wiremesh.core.wireguard import kernel
from wiremesh.core.wireguard.replay import ReplayWindow
from wiremesh.core.wireguard.timers import REJECT_AFTER_MESSAGES
from wiremesh.core.wireguard.transport import ReceiveSession, receive_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))
from wg_core_pair import A_ENDPOINT, Pair

try:
    import wiremesh_wgkernel as native
except ImportError:  # pragma: no cover - `make venv` builds it wherever cargo is installed
    native = None

needs_native = pytest.mark.skipif(
    native is None and os.environ.get("WIREMESH_NATIVE") == "0",
    reason="WIREMESH_NATIVE=0 asks for the Python kernel alone",
)
KEY = bytes(range(32))
AEAD = ChaCha20Poly1305(KEY)


def both_windows() -> tuple[object, ReplayWindow]:
    assert native is not None, "native/wgkernel is not installed: run make venv (needs cargo)"
    return native.Replay(), ReplayWindow()


@needs_native
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 12000), max_size=300), st.integers(0, 2**62))
def test_the_replay_windows_answer_alike(counters: list[int], base: int) -> None:
    fast, slow = both_windows()
    for c in counters:
        c += base
        assert fast.check(c) == slow.check(c)
        assert fast.update(c) == slow.update(c)
        assert fast.greatest == slow.greatest
    assert fast.check(2**64 - 1) == slow.check(2**64 - 1)


@needs_native
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("size", [0, 1, 1367, 1368, 1369, 20000, 65000])
def test_native_and_python_seal_a_tso_packet_into_the_same_buffer(v6: bool, size: int) -> None:
    assert native is not None
    payload = random.Random(size).randbytes(size)
    raw = bytes(10) + (super6(payload) if v6 else super4(payload))
    python = kernel.seal_tso_python(KEY, AEAD, 77, 2**33, raw, 10, 1368)
    assert native.seal_tso(KEY, 77, 2**33, raw, 10, 1368) == python
    buffer, size_, count = python
    segments = gso.segment_tcp_python(raw[10:], 1368)
    assert count == len(segments) and size_ == len(kernel.seal_python(KEY, AEAD, 77, 0, segments[:1])[0])
    sealed = kernel.seal_python(KEY, AEAD, 77, 2**33, segments)
    assert buffer == b"".join(sealed)  # what a UDP_SEGMENT send of `size_` splits it into


@needs_native
@pytest.mark.parametrize("junk", [b"", b"\x45" * 30, super4(b"x" * 100)[:45]])
def test_both_refuse_what_is_no_tso_packet(junk: bytes) -> None:
    assert native is not None
    with pytest.raises(ValueError):
        kernel.seal_tso_python(KEY, AEAD, 1, 0, junk, 0, 1368)
    with pytest.raises(ValueError):
        native.seal_tso(KEY, 1, 0, junk, 0, 1368)


def a_mixed_run() -> list[bytes]:
    """Messages of receiver 9: two flows, a keepalive, a forgery, a duplicate, a not-IP payload,
    a counter past REJECT_AFTER_MESSAGES, then one of another receiver (the run ends there)."""
    flow_a = [seg4(1000 + k * 100, b"a" * 100) for k in range(4)]
    flow_b = [seg4(7000, b"b" * 50, sport=6000), seg4(7050, b"b" * 50, sport=6000)]
    seal = kernel.seal_python
    run = (
        seal(KEY, AEAD, 9, 0, flow_a[:2]) + seal(KEY, AEAD, 9, 2, flow_b) + seal(KEY, AEAD, 9, 4, flow_a[2:])
    )
    keepalive = seal(KEY, AEAD, 9, 6, [b""])[0]
    forged = bytearray(seal(KEY, AEAD, 9, 7, flow_a[:1])[0])
    forged[40] ^= 1
    not_ip = seal(KEY, AEAD, 9, 8, [b"\x45" + bytes(40)])[0]  # IPv4 with total length 0
    past = seal(KEY, AEAD, 9, REJECT_AFTER_MESSAGES, flow_a[:1])[0]
    other = seal(KEY, AEAD, 10, 0, flow_a[:1])[0]
    return [b"junk", *run, keepalive, bytes(forged), run[0], not_ip, past, *run[4:], other]


@needs_native
@pytest.mark.parametrize("vnet", [False, True])
def test_native_and_python_open_a_run_alike(vnet: bool) -> None:
    assert native is not None
    datagrams = a_mixed_run()
    fast, slow = both_windows()
    python = kernel.open_run_python(KEY, AEAD, slow, datagrams, 1, REJECT_AFTER_MESSAGES, vnet)
    end, flows, stats = native.open_run(KEY, fast, datagrams, 1, REJECT_AFTER_MESSAGES, vnet)
    assert kernel.Opened(end, flows, *stats) == python
    assert python.end == len(datagrams) - 1
    # Flow a, flow b, flow a again (a new run: a filter sees the flows in order).
    assert [count for _, _, count, _ in python.flows] == [2, 2, 2]
    first_a = seg4(1000, b"a" * 100)
    assert [first for _, first, _, _ in python.flows][::2] == [first_a, seg4(1200, b"a" * 100)]
    # With a virtio_net_hdr, each flow's two in-order segments are merged into one GSO write.
    assert [len(writes) for _, _, _, writes in python.flows] == ([1, 1, 1] if vnet else [2, 2, 2])
    assert (python.authenticated, python.data, python.replay, python.decrypt_failed, python.not_ip) == (
        8,
        7,
        4,
        1,
        1,
    )
    assert fast.greatest == slow.greatest == 8
    with pytest.raises(ValueError):
        native.open_run(KEY, fast, datagrams, 0, REJECT_AFTER_MESSAGES, vnet)
    with pytest.raises(ValueError):
        kernel.open_run_python(KEY, AEAD, slow, datagrams, 0, REJECT_AFTER_MESSAGES, vnet)


def test_a_run_keeps_only_packets_from_the_peers_allowed_sources() -> None:
    ours, theirs = seg4(1, b"x" * 10), bytearray(seg4(1, b"y" * 10, sport=7))
    theirs[12:16] = bytes([192, 0, 2, 66])  # a source AllowedIPs gives to someone else
    datagrams = kernel.seal(KEY, AEAD, 3, 0, [ours, bytes(theirs), ours[:]])
    session = ReceiveSession(b"peer", KEY, reject_deadline=100.0)
    run = receive_run(session, b"peer", datagrams, 0, 1.0, lambda src: b"peer" if src[0] != 192 else b"else")
    assert run.flows == [(ours, 1, [ours]), (ours, 1, [ours])]
    assert run.drops == {"source_not_allowed": 1} and run.authenticated == 3
    expired = receive_run(session, b"peer", datagrams, 0, 100.0, lambda src: b"peer")
    assert expired.drops == {"expired_session": 3} and not expired.flows and expired.end == 3


def test_the_devices_tso_send_makes_what_segmenting_and_send_batch_make() -> None:
    p = Pair()
    p.connect()
    session = p.peer_b.current
    assert session is not None
    ip = bytearray(super4(os.urandom(5000)))
    ip[12:16], ip[16:20] = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])  # a -> b, as AllowedIPs say
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", gro.ipv4_header_checksum(ip[:20]))
    raw = bytes(10) + bytes(ip)
    counter = session.send_counter
    sealed = p.a.send_tso(raw, 10, 1368, p.now)
    assert sealed is not None
    buffer, size, count, endpoint = sealed
    assert count == 4 and session.send_counter == counter + 4 and endpoint == p.peer_b.endpoint
    session.send_counter = counter
    batch, held = p.a.send_batch(gso.segment_tcp_python(bytes(ip), 1368), p.now)
    assert not held and b"".join(d for d, _ in batch) == buffer and len(batch[0][0]) == size
    # b opens the buffer's datagrams as one run of one flow.
    datagrams = [buffer[k : k + size] for k in range(0, len(buffer), size)]
    flows, other = p.b.receive_batch(datagrams, A_ENDPOINT, p.now)
    ((first, count, packets),) = flows
    assert count == 4 and not other and b"".join(x[52:] for x in packets) == bytes(ip[52:])
    # With a virtio_net_hdr the four segments become one GSO write of the whole payload.
    session_b = p.peer_a.current
    assert session_b is not None
    session_b.replay = kernel.new_replay_window()
    ((first_v, count_v, writes),) = p.b.receive_batch(datagrams, A_ENDPOINT, p.now, vnet=True)[0]
    assert (first_v, count_v) == (first, 4) and len(writes) == 1 and writes[0][10 + 52 :] == bytes(ip[52:])


def test_no_live_session_leaves_a_tso_packet_to_the_per_packet_path() -> None:
    p = Pair()
    raw = bytes(10) + super4(b"x" * 3000)
    assert p.a.send_tso(raw, 10, 1368, p.now) is None


@pytest.mark.parametrize("rules", [None, ()])
def test_the_filter_judges_a_flow_run_as_each_of_its_packets(rules: tuple[FilterRule, ...] | None) -> None:
    run = [seg4(1000 + 100 * k, b"z" * 100) for k in range(5)]
    one, each = Filter(), Filter()
    for flt in (one, each):
        flt.set_rules(rules or (), allow_all=rules is None)
    assert one.admit_flow(run[0], len(run), 1.0) == bool(each.filter_inbound(run, 1.0))
    assert (one.accepted, one.accepted_replies, one.drops) == (
        each.accepted,
        each.accepted_replies,
        each.drops,
    )
    assert one.flow_count == each.flow_count


def test_a_denied_run_that_was_not_live_counts_every_packet_under_its_reason() -> None:
    run = [seg4(1000 + 100 * k, b"z" * 100) for k in range(4)]
    one, each = Filter(), Filter()
    for flt in (one, each):
        flt.set_rules((), allow_all=False)
    assert not one.in_live_flow(run[0], 1.0)
    assert not one.admit_flow(run[0], len(run), 1.0) and not each.filter_inbound(run, 1.0)
    assert one.drops == each.drops and sum(one.drops.values()) == len(run)


def test_a_live_flow_is_known_without_changing_anything() -> None:
    flt = Filter()
    flt.set_rules((), allow_all=True)
    packet = seg4(1000, b"z" * 100)
    assert not flt.in_live_flow(packet, 1.0)
    assert flt.admit_flow(packet, 3, 1.0) and flt.accepted == 3
    assert flt.in_live_flow(packet, 2.0) and flt.accepted == 3
