"""Events a Device reports through `next_event()`."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    public_key: bytes
    initiator: bool  # True when we sent the initiation


@dataclass(frozen=True, slots=True)
class HandshakeFailed:
    """No response within REKEY_ATTEMPT_TIME; queued packets for the peer were dropped."""

    public_key: bytes


@dataclass(frozen=True, slots=True)
class EndpointChanged:
    public_key: bytes
    endpoint: Hashable


@dataclass(frozen=True, slots=True)
class EndpointObserved:
    """An authenticated packet of a peer that does not roam came from `endpoint`, not from the
    endpoint it was given (reported once per new source: its path selection may adopt it)."""

    public_key: bytes
    endpoint: Hashable
