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
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

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


Seal = Callable[[bytes, ChaCha20Poly1305, int, int, Sequence[bytes]], list[bytes]]
Open = Callable[[bytes, ChaCha20Poly1305, Sequence[bytes]], list[bytes | None]]


def _native() -> tuple[Seal, Open] | None:
    if os.environ.get("WIREMESH_NATIVE", "1") == "0":
        return None
    try:
        import wiremesh_wgkernel as native
    except ImportError:
        return None
    native_seal: Any = native.seal
    native_open: Any = native.open

    # The extension reads bytes objects only; other buffers (bytearray, memoryview) are copied.
    def seal_native(
        key: bytes, aead: ChaCha20Poly1305, receiver: int, counter: int, packets: Sequence[bytes]
    ) -> list[bytes]:
        return native_seal(key, receiver, counter, [p if type(p) is bytes else bytes(p) for p in packets])

    def open_native(key: bytes, aead: ChaCha20Poly1305, datagrams: Sequence[bytes]) -> list[bytes | None]:
        return native_open(key, [d if type(d) is bytes else bytes(d) for d in datagrams])

    return seal_native, open_native


_chosen = _native()
NATIVE = _chosen is not None
seal: Seal = _chosen[0] if _chosen is not None else seal_python
open_: Open = _chosen[1] if _chosen is not None else open_python
