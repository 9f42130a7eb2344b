"""The messages between the Engine and its receive worker process (rxworker.py).

They travel pickled over a SOCK_SEQPACKET pair whose both ends are our own processes. One
message per datagram of the pair; each is a frozen dataclass, so both sides agree on fields.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from wiremesh.core.policy.model import FilterRule

# ---- Engine -> worker


@dataclass(frozen=True, slots=True)
class PeerRoutes:
    """Every peer's AllowedIPs: the worker checks inner source addresses against them."""

    allowed_ips: dict[bytes, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class SessionExported:
    """The receive side of a new session: from now on only the worker decrypts it."""

    index: int
    peer: bytes
    recv_key: bytes
    reject_deadline: float


@dataclass(frozen=True, slots=True)
class SessionsForgotten:
    indices: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Decrypt:
    """A transport message of an exported session that reached the Engine (a relay, or a race
    with the export): the worker decrypts it as if it had arrived from `source`."""

    datagram: bytes
    source: Hashable


@dataclass(frozen=True, slots=True)
class FilterRules:
    """The packet filter's rules: the worker judges what it decrypts (rules + allow-all)."""

    rules: tuple[FilterRule, ...]
    allow_all: bool


@dataclass(frozen=True, slots=True)
class FlowsSent:
    """The headers of packets we sent that open or refresh a flow (the Engine's filter saw them
    first): the worker's filter learns which flows are ours before their replies arrive."""

    headers: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    pass


# ---- worker -> Engine


@dataclass(frozen=True, slots=True)
class NotForWorker:
    """A datagram that is not a transport message of a session the worker holds (handshakes,
    cookie replies, disco, STUN, unknown indices): the Engine handles it."""

    datagram: bytes
    source: Hashable


@dataclass(frozen=True, slots=True)
class SessionTraffic:
    """Transport messages of one session from one source, authenticated since the last report."""

    index: int
    source: Hashable
    nbytes: int
    packets: int
    data_packets: int  # not keepalives


@dataclass(frozen=True, slots=True)
class FilterCounts:
    """What the worker's packet filter counted since the last report."""

    drops: dict[str, int] = field(default_factory=dict)
    accepted: int = 0
    accepted_replies: int = 0


@dataclass(frozen=True, slots=True)
class Report:
    traffic: tuple[SessionTraffic, ...]
    drops: dict[str, int]
    io: dict[str, int]
    filter: FilterCounts | None = None


ToWorker = PeerRoutes | SessionExported | SessionsForgotten | Decrypt | FilterRules | FlowsSent | Stop
FromWorker = NotForWorker | Report
