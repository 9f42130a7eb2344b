"""wiremeshd in mesh mode against real NATS, keys and coord, every process in its own namespace.

One lab for the module: services in "ctl", agents a and c on public hosts, agent b in a router
namespace with a "pod" host behind it (its advertised subnet). Tests that cut a node off use
a fresh agent of their own, so the shared three stay intact.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from mesh_kit import Agent, MeshLab, mesh_lab, pings, router_with_pod, wait_until

pytestmark = pytest.mark.netns

WIREMESH = [sys.executable, "-m", "wiremesh.agent.cli"]


class Mesh:
    def __init__(self, m: MeshLab) -> None:
        self.m = m
        self.lab = m.lab
        key = m.auth_key("--reusable")
        self.a_host = self.lab.host("a")
        self.c_host = self.lab.host("c")
        self.router, self.pod = router_with_pod(self.lab, "bgw")
        self.pod_subnet = self.router.lan_subnet
        agents = [
            m.agent("a", self.a_host, key, wait=False),
            m.agent("b", self.router, key, routes=(self.pod_subnet,), wait=False),
            m.agent("c", self.c_host, key, wait=False),
        ]
        for agent in agents:
            m.wait_running(agent)
        self.a, self.b, self.c = agents
        self.key = key

    def all(self) -> list[Agent]:
        return [self.a, self.b, self.c]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with mesh_lab() as m:
        yield Mesh(m)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*WIREMESH, *args], capture_output=True, text=True, timeout=30, check=False)


def wait_peers(agent: Agent, names: set[str], timeout: float = 15) -> None:
    wait_until(lambda: names <= agent.peer_names(), timeout, f"{agent.name} to see {sorted(names)}")


def test_three_agents_join_with_a_preauth_key_and_ping_each_other(mesh):
    for agent in mesh.all():
        wait_peers(agent, {x.name for x in mesh.all() if x is not agent})
    for src in mesh.all():
        for dst in mesh.all():
            if src is not dst:
                assert pings(mesh.lab, src.node, dst.address()), f"{src.name} cannot ping {dst.name}"
