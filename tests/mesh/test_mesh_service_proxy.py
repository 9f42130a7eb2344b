"""Service proxies in namespaces (what the operator runs in a pod, tested here without Kubernetes):

- ingress: wiremeshd --ingress-to BACKEND gives BACKEND (a "Service" address) a mesh address and
  name of its own; a mesh device reaches it there, and the backend sees the proxy's address;
- egress: wiremeshd --egress-to DEVICE makes a mesh device reachable at the proxy's own address
  (a "pod" on the proxy's network connects to it); the device sees the proxy's mesh address.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from mesh_kit import MeshLab, mesh_lab, wait_until

from wiremesh.lab import Host

pytestmark = pytest.mark.netns

PORT = 8000
WHO_AM_I = (
    "import socket, sys\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {PORT})); s.listen()\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall((sys.argv[1] + ' ' + a[0]).encode()); c.close()\n"
)


class World:
    def __init__(self, m: MeshLab) -> None:
        self.m, self.lab = m, m.lab
        key = m.auth_key("--reusable")
        self.backend, self.pod = self.lab.host("backend"), self.lab.host("pod")
        self.ingress_host, self.egress_host, self.laptop_host = (
            self.lab.host("iproxy"),
            self.lab.host("eproxy"),
            self.lab.host("laptop"),
        )
        for host in (self.ingress_host, self.egress_host):
            self.lab.sysctl(host, {"net.ipv4.ip_forward": 1})
        self.lab.popen(self.backend, [sys.executable, "-c", WHO_AM_I, "backend"], stdout=subprocess.DEVNULL)
        self.lab.popen(
            self.laptop_host, [sys.executable, "-c", WHO_AM_I, "laptop"], stdout=subprocess.DEVNULL
        )
        self.laptop = m.agent("laptop", self.laptop_host, key)
        self.ingress = m.agent("web", self.ingress_host, key, flags=("--ingress-to", self.backend.address))
        self.egress = m.agent("egress", self.egress_host, key, flags=("--egress-to", "laptop"))

    def fetch(self, node: Host, address: str, timeout: float = 5) -> str:
        code = (
            "import socket\n"
            f"s = socket.create_connection(({address!r}, {PORT}), timeout={timeout})\n"
            "print(s.recv(200).decode())\n"
        )
        result = self.lab.run(node, [sys.executable, "-c", code], check=False, timeout=timeout + 20)
        return result.stdout.strip() if result.returncode == 0 else ""


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with mesh_lab() as m:
        yield World(m)


def test_a_mesh_device_reaches_the_backend_at_the_ingress_proxys_mesh_address(world):
    address = world.ingress.address()
    answer = wait_until(lambda: world.fetch(world.laptop_host, address), 20, "the backend through the proxy")
    assert answer == f"backend {world.ingress_host.address}"  # masqueraded by the proxy


def test_the_ingress_proxy_answers_pings_itself(world):
    # Only TCP and UDP are forwarded: the proxy node stays a node (ICMP is its own).
    out = world.lab.run(
        world.laptop_host, ["ping", "-c", "1", "-W", "3", world.ingress.address()], check=False
    )
    assert out.returncode == 0


def test_a_cluster_side_client_reaches_the_mesh_device_through_the_egress_proxy(world):
    answer = wait_until(
        lambda: world.fetch(world.pod, world.egress_host.address), 20, "the laptop through the egress proxy"
    )
    assert answer == f"laptop {world.egress.address()}"  # the laptop sees the proxy's mesh identity
    status = world.egress.status()
    assert status["proxy"]["egress_address"] == world.laptop.address() and not status["proxy"]["error"]


def test_the_egress_proxy_keeps_its_own_wireguard_port(world):
    # Its WireGuard socket still takes peers' packets (not forwarded to the device): pings work.
    out = world.lab.run(
        world.laptop_host, ["ping", "-c", "1", "-W", "3", world.egress.address()], check=False
    )
    assert out.returncode == 0
