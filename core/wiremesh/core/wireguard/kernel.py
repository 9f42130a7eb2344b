"""The transport kernel: sealing and opening runs of transport messages of one session.

Two implementations with one interface and the same bytes out: the native one (the
`wiremesh_wgkernel` extension, Rust, built from native/wgkernel by `make`), which handles a whole
run per call with the interpreter lock released while the cipher runs, and this module's Python
one (the `cryptography` package, one call per message), used when the extension is absent or
WIREMESH_NATIVE=0 is set. Neither keeps state: counters, replay windows and timers stay with the
caller (the Device, or an agent's receive worker).

    datagrams = seal(send_key, send_aead, receiver_index, first_counter, packets)
    payloads = open_(recv_key, recv_aead, datagrams)   # None where one does not authenticate

`packets` are IP packets; each is padded with zeros to a multiple of 16 before sealing.

Two calls carry whole batches, so that the interpreter's work is per batch and not per packet:

    buffer, size, count = seal_tso(send_key, send_aead, receiver_index, first_counter, raw, offset, mss)
    opened = open_run(recv_key, recv_aead, replay, datagrams, start, reject_after, vnet)

seal_tso segments a TUN TSO super-packet and seals every segment into one buffer that a
UDP_SEGMENT send carries as is. open_run opens the run of one session's messages starting at
`start`, checks and commits their counters in `replay` (a window from new_replay_window()), and
hands back runs of one flow with the TUN writes that carry them (with `vnet`, TCP segments
merged into GSO writes as gro.coalesce does), so that callers check sources and policy per flow.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wiremesh.core import gro, gso
from wiremesh.core.wireguard.replay import ReplayWindow

_HEADER = struct.Struct("<IIQ")
_COUNTER = struct.Struct("<Q")
_NONCE_PREFIX = b"\x00\x00\x00\x00"
_PADDING = bytes(16)
MESSAGE_TRANSPORT = 4


def seal_python(
    key: bytes, aead: ChaCha20Poly1305, receiver: int, counter: int, packets: Sequence[bytes]
) -> list[bytes]:
    out = []
    header = struct.pack("<II", MESSAGE_TRANSPORT, receiver)
    encrypt = aead.encrypt
    for i, packet in enumerate(packets):
        pad = -len(packet) & 15
        if pad:
            packet = b"".join((packet, _PADDING[:pad]))
        wire_counter = _COUNTER.pack(counter + i)
        out.append(b"".join((header, wire_counter, encrypt(_NONCE_PREFIX + wire_counter, packet, None))))
    return out


def open_python(key: bytes, aead: ChaCha20Poly1305, datagrams: Sequence[bytes]) -> list[bytes | None]:
    out: list[bytes | None] = []
    decrypt = aead.decrypt
    for d in datagrams:
        if len(d) < 32:
            out.append(None)
            continue
        try:
            out.append(decrypt(_NONCE_PREFIX + d[8:16], memoryview(d)[16:], None))
        except InvalidTag:
            out.append(None)
    return out


class Opened(NamedTuple):
    """What open_run found in one run of transport messages."""

    end: int  # the index after the run's last message
    # Per run of packets of one TCP/UDP flow (any other packet alone), in order: (source
    # address, the first packet, how many packets, the TUN writes that carry them).
    flows: list[tuple[bytes, bytes, int, list[bytes]]]
    authenticated: int
    nbytes: int  # bytes of the messages that authenticated
    data: int  # messages with a non-empty payload
    replay: int  # drops: replayed, too old or past REJECT_AFTER_MESSAGES
    decrypt_failed: int
    not_ip: int


def run_end(datagrams: Sequence[bytes], start: int) -> int:
    """The index after the run of transport messages with the receiver index of datagrams[start]."""
    prefix = datagrams[start][:8]
    j, n = start + 1, len(datagrams)
    while j < n and len(datagrams[j]) >= 32 and datagrams[j][:8] == prefix:
        j += 1
    return j


def flow_key(packet: bytes) -> bytes | None:
    """What names a plain-header TCP/UDP packet's flow (protocol, addresses, ports), as the
    packet filter's fast path reads it; None for anything else."""
    n = len(packet)
    if n >= 24 and packet[0] == 0x45 and not (packet[6] & 0x1F or packet[7]):
        if packet[9] in (6, 17):
            return packet[9:10] + packet[12:24]
    elif n >= 44 and packet[0] >> 4 == 6 and packet[6] in (6, 17):
        return packet[6:7] + packet[8:44]
    return None


def inner_packet(plaintext: bytes) -> tuple[bytes, bytes] | None:
    """(the IP packet without its padding, its source address) from a non-empty payload, or None
    (not_ip): an IP header whose length covers no more than was decrypted."""
    size = len(plaintext)
    version = plaintext[0] >> 4
    if version == 4 and size >= 20:
        length = (plaintext[2] << 8) | plaintext[3]
        src = plaintext[12:16]
        if length < 20:
            return None
    elif version == 6 and size >= 40:
        length = ((plaintext[4] << 8) | plaintext[5]) + 40
        src = plaintext[8:24]
    else:
        return None
    if length > size:
        return None
    return (plaintext if length == size else plaintext[:length]), src


def open_run_python(
    key: bytes,
    aead: ChaCha20Poly1305,
    replay: Any,
    datagrams: Sequence[bytes],
    start: int,
    reject_after: int,
    vnet: bool,
) -> Opened:
    d0 = datagrams[start]
    if len(d0) < 32 or d0[:4] != b"\x04\x00\x00\x00":
        raise ValueError("a run starts with a transport message")
    end = run_end(datagrams, start)
    todo: list[tuple[bytes, int]] = []
    dropped_replay = 0
    for i in range(start, end):
        (counter,) = _COUNTER.unpack_from(datagrams[i], 8)
        if counter >= reject_after or not replay.check(counter):
            dropped_replay += 1
        else:
            todo.append((datagrams[i], counter))
    plains = open_python(key, aead, [d for d, _ in todo])
    packets: list[bytes] = []
    flows: list[tuple[bytes, int, int]] = []
    current: bytes | None = None
    authenticated = nbytes = data = failed = not_ip = 0
    for (datagram, counter), plain in zip(todo, plains, strict=True):
        if plain is None:
            failed += 1
            continue
        if not replay.update(counter):
            dropped_replay += 1
            continue
        authenticated += 1
        nbytes += len(datagram)
        if not plain:
            continue
        data += 1
        inner = inner_packet(plain)
        if inner is None:
            not_ip += 1
            current = None
            continue
        packet, src = inner
        key_ = flow_key(packet)
        index = len(packets)
        packets.append(packet)
        if key_ is not None and key_ == current and flows and flows[-1][2] == index:
            flows[-1] = (flows[-1][0], flows[-1][1], index + 1)
        else:
            flows.append((src, index, index + 1))
        current = key_
    out = [
        (src, packets[a], b - a, gro.coalesce_python(packets[a:b]) if vnet else packets[a:b])
        for src, a, b in flows
    ]
    return Opened(end, out, authenticated, nbytes, data, dropped_replay, failed, not_ip)


def seal_tso_python(
    key: bytes, aead: ChaCha20Poly1305, receiver: int, counter: int, raw: bytes, offset: int, mss: int
) -> tuple[bytes, int, int]:
    try:
        segments = gso.segment_tcp_python(raw[offset:], mss)
    except gso.SegmentationError as exc:
        raise ValueError(str(exc)) from None
    sealed = seal_python(key, aead, receiver, counter, segments)
    return b"".join(sealed), len(sealed[0]), len(sealed)


Seal = Callable[[bytes, ChaCha20Poly1305, int, int, Sequence[bytes]], list[bytes]]
Open = Callable[[bytes, ChaCha20Poly1305, Sequence[bytes]], list[bytes | None]]


SealTSO = Callable[[bytes, ChaCha20Poly1305, int, int, bytes, int, int], tuple[bytes, int, int]]
OpenRun = Callable[[bytes, ChaCha20Poly1305, Any, Sequence[bytes], int, int, bool], Opened]


def _native() -> tuple[Seal, Open, SealTSO, OpenRun, Callable[[], Any]] | None:
    if os.environ.get("WIREMESH_NATIVE", "1") == "0":
        return None
    try:
        import wiremesh_wgkernel as native
    except ImportError:
        return None
    native_seal: Any = native.seal
    native_open: Any = native.open
    native_seal_tso: Any = native.seal_tso
    native_open_run: Any = native.open_run

    # The extension reads bytes objects only; other buffers (bytearray, memoryview) are copied.
    def seal_native(
        key: bytes, aead: ChaCha20Poly1305, receiver: int, counter: int, packets: Sequence[bytes]
    ) -> list[bytes]:
        return native_seal(key, receiver, counter, [p if type(p) is bytes else bytes(p) for p in packets])

    def open_native(key: bytes, aead: ChaCha20Poly1305, datagrams: Sequence[bytes]) -> list[bytes | None]:
        return native_open(key, [d if type(d) is bytes else bytes(d) for d in datagrams])

    def seal_tso_native(
        key: bytes, aead: ChaCha20Poly1305, receiver: int, counter: int, raw: bytes, offset: int, mss: int
    ) -> tuple[bytes, int, int]:
        return native_seal_tso(key, receiver, counter, raw if type(raw) is bytes else bytes(raw), offset, mss)

    def open_run_native(
        key: bytes,
        aead: ChaCha20Poly1305,
        replay: Any,
        datagrams: Sequence[bytes],
        start: int,
        reject_after: int,
        vnet: bool,
    ) -> Opened:
        try:
            end, flows, stats = native_open_run(key, replay, datagrams, start, reject_after, vnet)
        except TypeError:  # the extension reads bytes only: copy other buffers
            datagrams = [d if type(d) is bytes else bytes(d) for d in datagrams]
            end, flows, stats = native_open_run(key, replay, datagrams, start, reject_after, vnet)
        return Opened(end, flows, *stats)

    return seal_native, open_native, seal_tso_native, open_run_native, native.Replay


_chosen = _native()
NATIVE = _chosen is not None
seal: Seal = _chosen[0] if _chosen is not None else seal_python
open_: Open = _chosen[1] if _chosen is not None else open_python
seal_tso: SealTSO = _chosen[2] if _chosen is not None else seal_tso_python
open_run: OpenRun = _chosen[3] if _chosen is not None else open_run_python
# The replay window open_run works with (the native kernel keeps its own, with the same answers).
new_replay_window: Callable[[], Any] = _chosen[4] if _chosen is not None else ReplayWindow
