"""Receiving transport messages (type 4): the one path, a pure function.

The Device runs every transport message it decrypts through receive_run, and so does an agent's
receive worker process for the sessions whose receive side it was handed
(`Device.export_receive_state` -> `ReceiveSession`). Neither writes anything but the session's
replay window; what else a received packet means (timers, confirming a session, roaming,
counters) stays with the Device, which a worker tells through `Device.note_received`.

A run is the messages of one session that arrived together; the transport kernel (kernel.py)
opens it in one call, so the interpreter's work here is per run and per flow, not per packet.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wiremesh.core.wireguard import kernel
from wiremesh.core.wireguard.timers import REJECT_AFTER_MESSAGES


class ReceivingSession(Protocol):
    """What receiving needs of a session (wiremesh.core.wireguard.peer.Session has it)."""

    recv_key: bytes
    recv_aead: ChaCha20Poly1305
    replay: Any  # kernel.new_replay_window()
    reject_deadline: float


class ReceiveSession:
    """The receive side of a session alone, as handed to another process."""

    __slots__ = ("peer", "recv_aead", "recv_key", "reject_deadline", "replay")

    def __init__(self, peer: bytes, recv_key: bytes, reject_deadline: float) -> None:
        self.peer = peer  # the peer's public key
        self.recv_key = recv_key
        self.recv_aead = ChaCha20Poly1305(recv_key)
        self.replay = kernel.new_replay_window()
        self.reject_deadline = reject_deadline


Flow = tuple[bytes, int, list[bytes]]


@dataclass(slots=True)
class Run:
    """What one run of transport messages gave."""

    end: int  # the index after the run in the datagrams it was read from
    # Runs of one flow from allowed sources: (first packet, how many packets, TUN writes).
    flows: list[Flow] = field(default_factory=list)
    authenticated: int = 0
    nbytes: int = 0  # bytes of the messages that authenticated
    data: int = 0  # authenticated messages that were not keepalives
    drops: dict[str, int] = field(default_factory=dict)


def receive_run(
    session: ReceivingSession,
    peer: Hashable,
    datagrams: Sequence[bytes],
    start: int,
    now: float,
    owner: Callable[[bytes], Hashable],
    vnet: bool = False,
) -> Run:
    """Open the run of transport messages of `session` that starts at datagrams[start] (whose
    receiver index names the session). Messages fail as expired_session, replay (a counter seen,
    too old or past REJECT_AFTER_MESSAGES), decrypt_failed or not_ip (an IP header whose length
    covers no more than was decrypted); a counter is committed to the replay window only once its
    message authenticated. A packet is kept only if `owner(source address)` (AllowedIPs) is
    `peer`, else it counts as source_not_allowed; that is asked once per flow. A flow's writes
    are its packets, or with `vnet` TUN writes with a virtio_net_hdr, TCP segments merged."""
    if now >= session.reject_deadline:
        end = kernel.run_end(datagrams, start)
        return Run(end, drops={"expired_session": end - start})
    opened = kernel.open_run(
        session.recv_key, session.recv_aead, session.replay, datagrams, start, REJECT_AFTER_MESSAGES, vnet
    )
    drops = {}
    for reason, n in (
        ("replay", opened.replay),
        ("decrypt_failed", opened.decrypt_failed),
        ("not_ip", opened.not_ip),
    ):
        if n:
            drops[reason] = n
    flows: list[Flow] = []
    refused = 0
    for src, first, count, writes in opened.flows:
        if owner(src) == peer:
            flows.append((first, count, writes))
        else:
            refused += count
    if refused:
        drops["source_not_allowed"] = refused
    return Run(opened.end, flows, opened.authenticated, opened.nbytes, opened.data, drops)
