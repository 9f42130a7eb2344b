"""Receiving transport messages (type 4): the one path, pure functions.

The Device runs every transport message it decrypts through these functions, and so does an
agent's receive worker process for the sessions whose receive side it was handed
(`Device.export_receive_state` -> `ReceiveSession`). Neither writes anything but the session's
replay window; what else a received packet means (timers, confirming a session, roaming,
counters) stays with the Device, which a worker tells through `Device.note_received`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wiremesh.core.wireguard import kernel
from wiremesh.core.wireguard.replay import ReplayWindow
from wiremesh.core.wireguard.timers import REJECT_AFTER_MESSAGES

_counter = struct.Struct("<Q").unpack_from


class ReceivingSession(Protocol):
    """What receiving needs of a session (wiremesh.core.wireguard.peer.Session has it)."""

    recv_key: bytes
    recv_aead: ChaCha20Poly1305
    replay: ReplayWindow
    reject_deadline: float


class ReceiveSession:
    """The receive side of a session alone, as handed to another process."""

    __slots__ = ("peer", "recv_aead", "recv_key", "reject_deadline", "replay")

    def __init__(self, peer: bytes, recv_key: bytes, reject_deadline: float) -> None:
        self.peer = peer  # the peer's public key
        self.recv_key = recv_key
        self.recv_aead = ChaCha20Poly1305(recv_key)
        self.replay = ReplayWindow()
        self.reject_deadline = reject_deadline


def open_transports(session: ReceivingSession, datagrams: Sequence[bytes], now: float) -> list[bytes | str]:
    """The decrypted payload of each transport message of `session`, in order, or its drop
    reason: expired_session, replay or decrypt_failed. The messages that pass the replay
    pre-check are opened by the transport kernel in one call (kernel.py); a counter is committed
    to the replay window only once its message authenticated."""
    n = len(datagrams)
    if now >= session.reject_deadline:
        return ["expired_session"] * n
    replay = session.replay
    out: list[bytes | str] = ["replay"] * n
    todo: list[int] = []
    counters: list[int] = []
    for i, datagram in enumerate(datagrams):
        (counter,) = _counter(datagram, 8)
        if counter >= REJECT_AFTER_MESSAGES or (counter <= replay.greatest and not replay.check(counter)):
            continue
        todo.append(i)
        counters.append(counter)
    if not todo:
        return out
    batch = datagrams if len(todo) == n else [datagrams[i] for i in todo]
    for i, counter, plaintext in zip(
        todo, counters, kernel.open_(session.recv_key, session.recv_aead, batch), strict=True
    ):
        if plaintext is None:
            out[i] = "decrypt_failed"
        elif replay.update(counter):  # else a duplicate within this batch: stays "replay"
            out[i] = plaintext
    return out


def open_transport(session: ReceivingSession, datagram: bytes, now: float) -> bytes | str:
    """open_transports for one message."""
    return open_transports(session, (datagram,), now)[0]


def inner_packet(plaintext: bytes) -> tuple[bytes, bytes] | str:
    """(the IP packet without its padding, its source address) from a non-empty payload, or the
    drop reason not_ip: an IP header whose length covers no more than was decrypted. The caller
    still checks that AllowedIPs gives the source address to the peer it came from."""
    size = len(plaintext)
    version = plaintext[0] >> 4
    if version == 4 and size >= 20:
        length = (plaintext[2] << 8) | plaintext[3]
        src = plaintext[12:16]
        if length < 20:
            return "not_ip"
    elif version == 6 and size >= 40:
        length = ((plaintext[4] << 8) | plaintext[5]) + 40
        src = plaintext[8:24]
    else:
        return "not_ip"
    if length > size:
        return "not_ip"
    return (plaintext if length == size else plaintext[:length]), src
