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


def serve(registry: CollectorRegistry, listen: str) -> Any:
    """Serve /metrics for `registry` on `listen` in a background thread; returns the server."""
    host, port = parse_listen(listen)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics_listening address=%s:%d", host, server.server_port)
    return server
