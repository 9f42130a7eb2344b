"""The transport kernel's two implementations, native (Rust, native/wgkernel) and Python, make the
same bytes; the Device's batch paths give what its one-packet paths give."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from wg_core_pair import A_ENDPOINT, A_V4, B_V4, Pair, ipv4_packet

from wiremesh.core.wireguard import kernel

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
SIZES = [0, 1, 15, 16, 17, 40, 576, 1279, 1280, 1420, 1500, 9000]


def packets() -> list[bytes]:
    rng = random.Random(7)
    return [rng.randbytes(n) for n in SIZES]


@needs_native
def test_the_native_kernel_is_built() -> None:
    assert native is not None, "native/wgkernel is not installed: run make venv (needs cargo)"


@needs_native
def test_native_and_python_seal_the_same_bytes() -> None:
    assert native is not None
    python = kernel.seal_python(KEY, AEAD, 0x11223344, 2**40 - 3, packets())
    assert [bytes(d) for d in native.seal(KEY, 0x11223344, 2**40 - 3, packets())] == python


@needs_native
def test_native_and_python_open_the_same_payloads_and_refuse_the_same_forgeries() -> None:
    assert native is not None
    sealed = kernel.seal_python(KEY, AEAD, 9, 100, packets())
    tampered = [d[:20] + bytes([d[20] ^ 1]) + d[21:] for d in sealed]
    short = [d[:31] for d in sealed[:3]]
    for datagrams in (sealed, tampered, short):
        assert native.open(KEY, datagrams) == kernel.open_python(KEY, AEAD, datagrams)
    assert [p[: len(q)] for p, q in zip(native.open(KEY, sealed), packets(), strict=True)] == packets()
    assert native.open(KEY, tampered) == [None] * len(tampered)


def test_a_payload_is_padded_to_16_bytes_and_authenticated() -> None:
    (datagram,) = kernel.seal(KEY, AEAD, 1, 0, [b"x" * 17])
    assert len(datagram) == 16 + 32 + 16
    assert kernel.open_(KEY, AEAD, [datagram]) == [b"x" * 17 + bytes(15)]


def test_the_devices_batch_send_makes_the_bytes_one_by_one_sends_make() -> None:
    p = Pair()
    p.connect()
    session = p.peer_b.current
    assert session is not None
    payloads = [ipv4_packet(A_V4, B_V4, b"y" * n) for n in (1, 100, 1000, 1000, 1380)]
    counter = session.send_counter
    batch, held = p.a.send_batch(payloads, p.now)
    assert not held and session.send_counter == counter + len(payloads)
    session.send_counter = counter  # the same session and counters again, one packet at a time
    assert [p.a.send(packet, p.now) for packet in payloads] == batch


def test_the_devices_batch_receive_delivers_what_one_by_one_receives_deliver() -> None:
    p = Pair()
    p.connect()
    payloads = [ipv4_packet(A_V4, B_V4, b"z" * n) for n in (1, 100, 1000, 1380)]
    datagrams = [d for d, _ in p.a.send_batch(payloads, p.now)[0]]
    flows, other = p.b.receive_batch(datagrams + datagrams[:1], A_ENDPOINT, p.now)
    assert [packet for _, _, packets in flows for packet in packets] == payloads
    assert other  # the repeated one is a replay
    # The first packet (21 bytes) is too short to name a flow: alone. The rest have the same
    # addresses and "ports" (payload bytes): one flow run.
    assert [count for _, count, _ in flows] == [1, len(payloads) - 1]
    assert p.b.drops["replay"] == 1
