"""Per-peer state: configuration, sessions (keypairs), the handshake in flight, timers, counters."""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wiremesh.core import crypto
from wiremesh.core.noise import HandshakeState
from wiremesh.core.wireguard import kernel
from wiremesh.core.wireguard.messages import LABEL_COOKIE, LABEL_MAC1, MESSAGE_TRANSPORT
from wiremesh.core.wireguard.timers import REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ON_RECEIVE_AFTER

_ZERO_PSK = bytes(32)


@dataclass(frozen=True, slots=True)
class PeerConfig:
    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: tuple[str, ...] = ()
    endpoint: Hashable | None = None  # opaque to the core: ("198.18.0.2", 51820) in static mode
    persistent_keepalive: int = 0  # seconds, 0 = off
    # False when the caller chooses the peer's path (magicsock): an authenticated packet from
    # elsewhere is reported (EndpointObserved) instead of moving the peer's endpoint there.
    roam: bool = True


class Session:
    """One keypair derived by a completed handshake, addressed on the wire by our local index."""

    __slots__ = (
        "created",
        "header",
        "initiator",
        "local_index",
        "peer",
        "receive_rekey_deadline",
        "recv_aead",
        "recv_key",
        "reject_deadline",
        "remote_index",
        "replay",
        "send_aead",
        "send_counter",
        "send_key",
        "send_rekey_deadline",
    )

    def __init__(
        self,
        peer: Peer,
        local_index: int,
        remote_index: int,
        send_key: bytes,
        recv_key: bytes,
        initiator: bool,
        created: float,
    ) -> None:
        self.peer = peer
        self.local_index = local_index
        self.remote_index = remote_index
        # One AEAD object per direction for the session's lifetime: creating them costs more than
        # sealing a packet.
        self.send_aead = ChaCha20Poly1305(send_key)
        self.recv_aead = ChaCha20Poly1305(recv_key)
        # The raw keys too: the native transport kernel takes them, and an agent hands the
        # receive side to a decrypting worker process.
        self.send_key = send_key
        self.recv_key = recv_key
        self.send_counter = 0
        self.replay = kernel.new_replay_window()
        self.initiator = initiator
        self.created = created
        # Type 4, three zero bytes and the peer's index: the fixed start of every transport header.
        self.header = struct.pack("<II", MESSAGE_TRANSPORT, remote_index)
        # Deadlines precomputed so the packet path compares one float each.
        self.reject_deadline = created + REJECT_AFTER_TIME
        # Past this, sending takes the slow path: the initiator rekeys; either side stops at reject.
        self.send_rekey_deadline = created + (REKEY_AFTER_TIME if initiator else REJECT_AFTER_TIME)
        self.receive_rekey_deadline = created + REKEY_ON_RECEIVE_AFTER if initiator else float("inf")


class PendingHandshake:
    """An initiation we sent and whose response we await."""

    __slots__ = ("created", "local_index", "peer", "state")

    def __init__(self, peer: Peer, local_index: int, state: HandshakeState, created: float) -> None:
        self.peer = peer
        self.local_index = local_index
        self.state = state
        self.created = created


class Peer:
    """A WireGuard peer as the Device sees it. Counters are read by the agent for metrics."""

    def __init__(self, config: PeerConfig) -> None:
        self.public_key = config.public_key
        self.config = config
        self.endpoint: Hashable | None = config.endpoint
        self.observed_source: Hashable | None = None  # last EndpointObserved (roam=False)
        self.psk = config.preshared_key or _ZERO_PSK
        self.keepalive_interval = config.persistent_keepalive
        self.mac1_key = crypto.blake2s_hash(LABEL_MAC1, config.public_key)
        self.cookie_key = crypto.blake2s_hash(LABEL_COOKIE, config.public_key)

        self.rx_bytes = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.tx_packets = 0
        self.last_handshake: float | None = None
        self.handshakes_completed = 0
        self.handshakes_failed = 0

        # Keypairs: `next` is a responder's session not yet confirmed by the initiator's first packet.
        self.current: Session | None = None
        self.previous: Session | None = None
        self.next: Session | None = None
        self.handshake: PendingHandshake | None = None
        self.handshake_started: float | None = None  # first initiation of the current attempt series
        self.last_handshake_sent = float("-inf")
        self.last_received_timestamp = bytes(12)
        self.last_initiation_consumed = float("-inf")
        self.queue: deque[bytes] = deque()

        # Cookie received from this peer (we are the initiator and it is under load).
        self.cookie: bytes | None = None
        self.cookie_time = float("-inf")
        self.last_mac1: bytes | None = None  # mac1 of the last handshake message we sent it

        # Timer deadlines (absolute, the Device's clock); None = not armed.
        self.t_retransmit: float | None = None
        self.t_keepalive: float | None = None
        self.t_new_handshake: float | None = None
        self.t_zero_keys: float | None = None
        self.t_persistent: float | None = None

    def next_deadline(self) -> float | None:
        best: float | None = None
        for t in (
            self.t_retransmit,
            self.t_keepalive,
            self.t_new_handshake,
            self.t_zero_keys,
            self.t_persistent,
        ):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def sessions(self) -> list[Session]:
        return [s for s in (self.current, self.previous, self.next) if s is not None]

    def __repr__(self) -> str:
        return f"Peer({crypto.encode_key(self.public_key)}, endpoint={self.endpoint!r})"
