"""Prometheus metrics for the data plane, read from the Device's own counters at scrape time.

Nothing on the packet path touches Prometheus: the Device and the Engine keep plain integer
counters and this Collector turns them into metric families when /metrics is scraped.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wiremesh.agent.engine import Engine

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9586
DEFAULT_METRICS_LISTEN = f"127.0.0.1:{DEFAULT_METRICS_PORT}"


class EngineCollector(Collector):
    """Exports one Engine's per-peer traffic, handshake and drop counters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        iface = self.engine.tun_name
        labels = ["interface", "peer"]
        rx_bytes = CounterMetricFamily(
            "wiremesh_peer_rx_bytes", "Bytes received from the peer", labels=labels
        )
        tx_bytes = CounterMetricFamily("wiremesh_peer_tx_bytes", "Bytes sent to the peer", labels=labels)
        rx_pkts = CounterMetricFamily(
            "wiremesh_peer_rx_packets", "Packets received from the peer", labels=labels
        )
        tx_pkts = CounterMetricFamily("wiremesh_peer_tx_packets", "Packets sent to the peer", labels=labels)
        hs_ok = CounterMetricFamily(
            "wiremesh_peer_handshakes_completed", "Handshakes completed with the peer", labels=labels
        )
        hs_fail = CounterMetricFamily(
            "wiremesh_peer_handshakes_failed", "Handshake attempts that timed out", labels=labels
        )
        age = GaugeMetricFamily(
            "wiremesh_peer_last_handshake_age_seconds", "Seconds since the last handshake", labels=labels
        )
        drops = CounterMetricFamily(
            "wiremesh_packets_dropped", "Packets dropped, by reason", labels=["interface", "reason"]
        )
        now = time.time()
        dev = self.engine.device
        with self.engine.lock:
            for key, peer in dev.peers.items():
                lv = [iface, base64.b64encode(key).decode()]
                rx_bytes.add_metric(lv, peer.rx_bytes)
                tx_bytes.add_metric(lv, peer.tx_bytes)
                rx_pkts.add_metric(lv, peer.rx_packets)
                tx_pkts.add_metric(lv, peer.tx_packets)
                hs_ok.add_metric(lv, peer.handshakes_completed)
                hs_fail.add_metric(lv, peer.handshakes_failed)
                if peer.last_handshake is not None:
                    age.add_metric(lv, now - peer.last_handshake)
            reasons = dict(dev.drops)
            under_load = bool(getattr(dev, "under_load", False))
        for reason, n in list(self.engine.drops.items()):
            reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in sorted(reasons.items()):
            drops.add_metric([iface, reason], n)
        io = CounterMetricFamily(
            "wiremesh_io", "Data plane system calls and packets, by operation", labels=["interface", "op"]
        )
        for op, n in sorted(self.engine.io.items()):
            io.add_metric([iface, op], n)
        load = GaugeMetricFamily(
            "wiremesh_under_load", "1 while handshakes require a cookie (mac2)", labels=["interface"]
        )
        load.add_metric([iface], 1 if under_load else 0)
        yield from (rx_bytes, tx_bytes, rx_pkts, tx_pkts, hs_ok, hs_fail, age, drops, io, load)


def parse_listen(text: str) -> tuple[str, int]:
    """'127.0.0.1:9586', '[::1]:9586' or ':9586' -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics listen address must be host:port, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def serve_if_wanted(registry: CollectorRegistry, listen: str | None) -> Any:
    """`serve` unless `listen` is off; a port already taken (another agent on this host) is a
    warning, not a reason for the agent to stop."""
    if not listen or listen == "off":
        return None
    try:
        return serve(registry, listen)
    except OSError as exc:
        log.warning("metrics_unavailable address=%s error=%r", listen, str(exc))
        return None


def serve(registry: CollectorRegistry, listen: str) -> Any:
    """Serve /metrics for `registry` on `listen` in a background thread; returns the server."""
    host, port = parse_listen(listen)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics_listening address=%s:%d", host, server.server_port)
    return server


# magicsock's counters (core and adapter share one namespace in status()["counters"]), exported
# under names that say what moved; anything not listed here still shows up, under its own name,
# in wiremesh_magicsock_events_total, so a new counter is never silently missing.
_DISCO_COUNTERS = {
    "ping_sent": ("sent", "ping"),
    "pong_sent": ("sent", "pong"),
    "call_me_maybe_sent": ("sent", "call_me_maybe"),
    "ping_received": ("received", "ping"),
    "pong_received": ("received", "pong"),
    "call_me_maybe_received": ("received", "call_me_maybe"),
}
_PATH_COUNTERS = {"path_direct": "direct", "path_lost": "relay"}
_PLAIN_COUNTERS = {
    "discovery_rounds": ("wiremesh_magicsock_discovery_rounds", "Discovery rounds (ping every candidate)"),
    "birthday_rounds": ("wiremesh_magicsock_birthday_rounds", "Birthday rounds started (probe sockets)"),
    "birthday_sprays": ("wiremesh_magicsock_birthday_sprays", "Birthday sprays answered for a peer"),
    "relay_connects": ("wiremesh_magicsock_relay_connects", "DERP relay connections established"),
    "relay_lost": ("wiremesh_magicsock_relay_disconnects", "DERP relay connections lost"),
    "mapping_changed": ("wiremesh_magicsock_mapping_changes", "Times a Pong showed our NAT mapping moved"),
    "initiations_resent": (
        "wiremesh_magicsock_initiations_resent",
        "WireGuard initiations resent when a direct path appeared",
    ),
}
PEER_PATHS = ("direct", "relay", "none")


def magicsock_families(status: dict[str, Any]) -> list[Any]:
    """Metric families from `MagicSock.status()`: pure, so the mapping is testable on its own."""
    counters: dict[str, int] = dict(status.get("counters") or {})
    disco = CounterMetricFamily(
        "wiremesh_magicsock_disco_messages",
        "Disco messages sent and received, by direction and type",
        labels=["direction", "type"],
    )
    for name, (direction, kind) in _DISCO_COUNTERS.items():
        disco.add_metric([direction, kind], counters.pop(name, 0))
    switches = CounterMetricFamily(
        "wiremesh_magicsock_path_switches",
        "Peer path changes: to a (new) direct path, or back to the relay",
        labels=["to"],
    )
    for name, to in _PATH_COUNTERS.items():
        switches.add_metric([to], counters.pop(name, 0))
    families: list[Any] = [disco, switches]
    for name, (metric, doc) in _PLAIN_COUNTERS.items():
        families.append(CounterMetricFamily(metric, doc, value=counters.pop(name, 0)))
    other = CounterMetricFamily(
        "wiremesh_magicsock_events", "Other magicsock counters, by name", labels=["event"]
    )
    for name, n in sorted(counters.items()):
        other.add_metric([name], n)
    drops = CounterMetricFamily(
        "wiremesh_magicsock_drops", "Disco and relay datagrams dropped, by reason", labels=["reason"]
    )
    for reason, n in sorted((status.get("drops") or {}).items()):
        drops.add_metric([reason], n)
    # One series per peer and path (1 for the current one): label values are node keys and
    # three fixed words, never addresses, so cardinality follows the netmap's size.
    path = GaugeMetricFamily(
        "wiremesh_magicsock_peer_path",
        "1 for the path traffic to the peer takes now",
        labels=["peer", "path"],
    )
    latency = GaugeMetricFamily(
        "wiremesh_magicsock_peer_direct_latency_seconds",
        "Disco round-trip time of the peer's direct path (peers with one)",
        labels=["peer"],
    )
    for peer, info in sorted((status.get("peers") or {}).items()):
        current = info.get("path")
        for word in PEER_PATHS:
            path.add_metric([peer, word], 1.0 if current == word else 0.0)
        if current == "direct" and info.get("latency_ms") is not None:
            latency.add_metric([peer], float(info["latency_ms"]) / 1000)
    relays = GaugeMetricFamily("wiremesh_magicsock_relays_connected", "DERP regions with an open connection")
    relays.add_metric([], len(status.get("relays_connected") or ()))
    home = GaugeMetricFamily(
        "wiremesh_magicsock_home_region", "The home DERP region (absent while there is none)"
    )
    if status.get("home_region") is not None:
        home.add_metric([], float(status["home_region"]))
    probes = GaugeMetricFamily("wiremesh_magicsock_probe_sockets", "Birthday probe sockets open now")
    probes.add_metric([], float(status.get("probe_sockets") or 0))
    return [*families, other, drops, path, latency, relays, home, probes]


class MagicsockCollector(Collector):
    """Exports a MagicSock's counters and per-peer paths at scrape time (from its status())."""

    def __init__(self, magicsock: Any) -> None:
        self.magicsock = magicsock

    def collect(self) -> Iterator[Any]:
        # status() reads dicts the magicsock thread may resize meanwhile ("changed size during
        # iteration"): retry, and rather skip one scrape of these families than fail /metrics.
        for _ in range(3):
            try:
                status = self.magicsock.status()
                break
            except RuntimeError:
                continue
        else:
            log.warning("magicsock_metrics_skipped reason=status_changed_during_scrape")
            return
        yield from magicsock_families(status)
