"""Scrape-time metrics of the mesh-mode controller and its packet filter (nothing on the packet
path)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from wiremesh.agent.mesh.controller import BackendState, MeshAgent


class MeshCollector:
    """Scrape-time metrics of the controller and the packet filter (nothing on the packet path)."""

    def __init__(self, agent: MeshAgent) -> None:
        self.agent = agent

    def collect(self) -> Iterable[Any]:
        agent = self.agent
        drops = CounterMetricFamily(
            "wiremesh_filter_drops", "Inbound packets the ACL packet filter dropped", labels=["reason"]
        )
        for reason, count in agent.filter.drops.items():
            drops.add_metric([reason], count)
        yield drops
        yield CounterMetricFamily(
            "wiremesh_filter_accepted",
            "Inbound packets the ACL packet filter let through",
            value=agent.filter.accepted,
        )
        yield GaugeMetricFamily(
            "wiremesh_filter_rules", "Packet-filter rules in force", value=len(agent.filter.rules)
        )
        yield GaugeMetricFamily(
            "wiremesh_filter_flows",
            "Flows the packet filter tracks (ours and peers')",
            value=agent.filter.flow_count,
        )
        yield CounterMetricFamily(
            "wiremesh_netmaps_received", "Netmaps (full or delta) applied", value=agent.netmaps_received
        )
        yield GaugeMetricFamily(
            "wiremesh_mesh_peers", "WireGuard peers configured", value=len(agent.applier.applied.peers)
        )
        state = GaugeMetricFamily("wiremesh_backend_state", "1 for the current state", labels=["state"])
        for member in BackendState:
            state.add_metric([str(member)], 1.0 if agent.backend_state is member else 0.0)
        yield state
