"""magicsock, sans-I/O: which path (direct UDP or the DERP relay) each peer's traffic takes.

See `wiremesh.core.magicsock.core` for the behaviour and `wiremesh.agent.magicsock` for the
adapter that gives it sockets, relays and a clock.
"""

from wiremesh.core.magicsock.core import PathSelector, PeerPath, is_lan_address
from wiremesh.core.magicsock.home import choose_home_region
from wiremesh.core.magicsock.types import (
    PRIMARY_SOCKET,
    AddressConfirmed,
    CloseProbeSockets,
    Destination,
    Direct,
    Event,
    MappingChanged,
    OpenProbeSockets,
    PathChanged,
    PeerInfo,
    PingResult,
    Relay,
)

__all__ = [
    "PRIMARY_SOCKET",
    "AddressConfirmed",
    "CloseProbeSockets",
    "Destination",
    "Direct",
    "Event",
    "MappingChanged",
    "OpenProbeSockets",
    "PathChanged",
    "PathSelector",
    "PeerInfo",
    "PeerPath",
    "PingResult",
    "Relay",
    "choose_home_region",
    "is_lan_address",
]
