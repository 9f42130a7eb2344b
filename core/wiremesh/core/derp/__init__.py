"""DERP v2 (Tailscale's relay protocol), sans-I/O: the frame codec in `frames`, the
server- and client-side connection state machines in `connection`."""

from wiremesh.core.derp.connection import (
    ClientConnection,
    ClientHello,
    Connected,
    IdleTimeout,
    PacketReceived,
    ServerConnection,
    State,
)
from wiremesh.core.derp.frames import (
    KEY_LEN,
    MAGIC,
    MAX_PACKET_SIZE,
    PROTOCOL_VERSION,
    FrameError,
    FrameReader,
    FrameType,
    PeerGoneReason,
)

__all__ = [
    "KEY_LEN",
    "MAGIC",
    "MAX_PACKET_SIZE",
    "PROTOCOL_VERSION",
    "ClientConnection",
    "ClientHello",
    "Connected",
    "FrameError",
    "FrameReader",
    "FrameType",
    "IdleTimeout",
    "PacketReceived",
    "PeerGoneReason",
    "ServerConnection",
    "State",
]
