"""The WireGuard Device as people read it: each peer's status for the local API and metrics, and
one log line per Device event. Pure functions of the Device's state."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def format_endpoint(endpoint: object) -> str | None:
    if endpoint is None:
        return None
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host, port = endpoint[0], endpoint[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(endpoint)


def peers_status(
    peers: Mapping[bytes, Any], allowed_ips: Mapping[bytes, tuple[str, ...]], now: float
) -> dict[str, dict[str, Any]]:
    """{base64 public key: its endpoint, AllowedIPs, counters and last handshake}."""
    out: dict[str, dict[str, Any]] = {}
    for key, p in peers.items():
        last = p.last_handshake
        out[b64(key)] = {
            "endpoint": format_endpoint(p.endpoint),
            "allowed_ips": list(allowed_ips.get(key, ())),
            "rx_bytes": p.rx_bytes,
            "tx_bytes": p.tx_bytes,
            "rx_packets": p.rx_packets,
            "tx_packets": p.tx_packets,
            "last_handshake_seconds_ago": None if last is None else round(now - last, 3),
            "handshakes_completed": p.handshakes_completed,
            "handshakes_failed": p.handshakes_failed,
        }
    return out


def describe_event(event: object) -> str:
    """`type=HandshakeCompleted public_key=... initiator=True`: keys in base64, endpoints as text."""
    parts = [f"type={type(event).__name__}"]
    for name in getattr(event, "__dataclass_fields__", {}):
        value = getattr(event, name)
        if isinstance(value, bytes) and len(value) == 32:
            value = b64(value)
        elif isinstance(value, tuple):
            value = format_endpoint(value)
        parts.append(f"{name}={value}")
    return " ".join(parts)
