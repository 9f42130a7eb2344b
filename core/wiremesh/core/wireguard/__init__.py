"""WireGuard, sans-I/O: the protocol core that wiremeshd drives.

device = Device(private_key, now=time.time())
device.set_peer(PeerConfig(public_key=..., allowed_ips=("100.64.0.2/32",), endpoint=("198.18.0.2", 51820)))
out = device.send(ip_packet, now)                  # -> (datagram, endpoint) | None
inner = device.receive(datagram, source, now)      # -> IP packet for the TUN | None
for datagram, endpoint in device.datagrams_to_send(): ...
deadline = device.next_timer(); device.handle_timer(now); event = device.next_event()
"""

from wiremesh.core.wireguard.device import DROP_REASONS, Device
from wiremesh.core.wireguard.events import (
    EndpointChanged,
    EndpointObserved,
    HandshakeCompleted,
    HandshakeFailed,
)
from wiremesh.core.wireguard.peer import Peer, PeerConfig
from wiremesh.core.wireguard.timers import (
    KEEPALIVE_TIMEOUT,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_TIMEOUT,
)

__all__ = [
    "DROP_REASONS",
    "KEEPALIVE_TIMEOUT",
    "REJECT_AFTER_MESSAGES",
    "REJECT_AFTER_TIME",
    "REKEY_AFTER_MESSAGES",
    "REKEY_AFTER_TIME",
    "REKEY_ATTEMPT_TIME",
    "REKEY_TIMEOUT",
    "Device",
    "EndpointChanged",
    "EndpointObserved",
    "HandshakeCompleted",
    "HandshakeFailed",
    "Peer",
    "PeerConfig",
]
