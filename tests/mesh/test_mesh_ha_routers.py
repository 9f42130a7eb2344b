"""HA subnet routers with real agents: two wiremeshd routers offer one subnet (auto-approved by the
policy), a client that accepts routes reaches a server on it through the primary; when the primary
dies the client's pings flow through the other router within seconds; when it returns the prefix
stays where it is (no flapping).

Topology: r1, r2 and the client are public hosts; the server's namespace holds a bridge
(10.60.0.1/24) with a veth to each router, so 10.60.0.0/24 is reachable from both routers and from
nowhere else. Run with `-s` to see the measured failover time.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from mesh_kit import Agent, MeshLab, mesh_lab, pings, wait_until

from wiremesh.lab import Host, Lab

pytestmark = pytest.mark.netns

SUBNET = "10.60.0.0/24"
SERVER = "10.60.0.1"
POLICY = """{
  "autoApprovers": {"routes": {"10.60.0.0/16": ["alice@"]}},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}"""


def shared_subnet(lab: Lab, server: Host, routers: list[Host]) -> None:
    """SUBNET on a bridge in the server's namespace, each router attached to it by a veth."""
    server_ns = lab.ns_of(server)
    lab.run(server, ["ip", "link", "add", "hb0", "type", "bridge", "forward_delay", "0"])
    lab.run(server, ["ip", "addr", "add", f"{SERVER}/24", "dev", "hb0"])
    lab.run(server, ["ip", "link", "set", "hb0", "up"])
    for i, router in enumerate(routers):
        lab.run(
            router, ["ip", "link", "add", "ha0", "type", "veth", "peer", "name", f"hp{i}", "netns", server_ns]
        )
        lab.run(router, ["ip", "addr", "add", f"10.60.0.{i + 2}/24", "dev", "ha0"])
        lab.run(router, ["ip", "link", "set", "ha0", "up"])
        lab.run(server, ["ip", "link", "set", f"hp{i}", "master", "hb0", "up"])
        lab.sysctl(router, {"net.ipv4.ip_forward": 1})


class Pinger:
    """`ping -D` from a node, every 100 ms, recording (wall-clock time, icmp_seq) of each reply."""

    INTERVAL = 0.1
    LINE = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .* icmp_seq=(\d+)")

    def __init__(self, lab: Lab, node: Host, address: str) -> None:
        self.replies: list[tuple[float, int]] = []
        self.proc = lab.popen(
            node,
            ["ping", "-D", "-n", "-i", str(self.INTERVAL), "-W", "1", address],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.lab = lab
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            m = self.LINE.match(line)
            if m:
                self.replies.append((float(m.group(1)), int(m.group(2))))

    def outage(self, since: float) -> tuple[float, int]:
        """From the last reply before `since` on: (the longest time between two replies, pings
        lost). A ping lost at the very end is not counted (it may still be answered)."""
        replies = list(self.replies)
        start = max((i for i, r in enumerate(replies) if r[0] <= since), default=0)
        window = replies[start:]
        gap = max((b[0] - a[0] for a, b in itertools.pairwise(window)), default=0.0)
        lost = sum(b[1] - a[1] - 1 for a, b in itertools.pairwise(window))
        return gap, lost

    def stop(self) -> None:
        self.lab.stop(self.proc)


class HA:
    def __init__(self, m: MeshLab) -> None:
        self.m = m
        self.lab = m.lab
        m.set_policy(POLICY)
        key = m.auth_key("--reusable")
        self.key = key
        self.r1_host, self.r2_host = self.lab.host("r1"), self.lab.host("r2")
        self.server = self.lab.host("srv")
        self.client_host = self.lab.host("client")
        shared_subnet(self.lab, self.server, [self.r1_host, self.r2_host])
        # r1 first, so it is online first and elected primary.
        self.r1 = m.agent("r1", self.r1_host, key, routes=(SUBNET,))
        self.r2 = m.agent("r2", self.r2_host, key, routes=(SUBNET,))
        self.client = m.agent("client", self.client_host, key, flags=("--accept-routes",))

    def carriers(self) -> list[str]:
        """Peers whose allowed IPs carry SUBNET in the client's WireGuard configuration."""
        status = self.client.status()
        return sorted(p["name"] for p in status["peers"] if SUBNET in p["allowed_ips"])


@pytest.fixture(scope="module")
def ha() -> Iterator[HA]:
    with mesh_lab() as m:
        yield HA(m)


def wait_carriers(ha: HA, names: list[str], timeout: float = 15) -> None:
    wait_until(lambda: ha.carriers() == names, timeout, f"client to route {SUBNET} via {names}")


def test_both_routers_are_approved_but_only_the_primary_carries_the_subnet(ha):
    routes = {(r["node"], r["approved"], r["primary"]) for r in ha.m.admin_cli("routes", "list")}
    assert {("r1", True, True), ("r2", True, False)} <= routes
    wait_carriers(ha, ["r1"])
    assert pings(ha.lab, ha.client_host, SERVER)


def test_peers_switch_to_the_standby_within_seconds_when_the_primary_dies(ha):
    wait_carriers(ha, ["r1"])
    assert pings(ha.lab, ha.client_host, SERVER)
    pinger = Pinger(ha.lab, ha.client_host, SERVER)
    try:
        wait_until(lambda: len(pinger.replies) >= 5, 15, "steady pings through r1")
        assert ha.r1.proc is not None
        killed_at = time.time()
        ha.r1.proc.kill()  # a crash: no goodbye to coord, the kernel closes its connection
        ha.r1.proc.wait(10)
        ha.r1.proc = None
        wait_carriers(ha, ["r2"])
        switched_at = time.time()
        wait_until(lambda: pinger.replies[-1][0] > switched_at + 1, 30, "pings through r2")
        gap, lost = pinger.outage(killed_at)
        print(
            f"\nHA failover: {lost} pings lost ({Pinger.INTERVAL:g} s apart); longest time between two"
            f" replies {gap:.2f} s; client routed via r2 {switched_at - killed_at:.2f} s after the kill"
        )
        assert gap < 10  # "within a few seconds"; generous for a loaded 2-core machine
    finally:
        pinger.stop()


def test_the_old_primary_returning_does_not_take_the_subnet_back(ha):
    if ha.r1.proc is None:  # the previous test killed it
        ha.m.agent("r1", ha.r1_host, None)
    else:
        ha.m.stop_agent(ha.r1)
        wait_carriers(ha, ["r2"])
        ha.m.agent("r1", ha.r1_host, None)
    wait_until(lambda: _peer(ha.client, "r1").get("online") is True, 15, "client to see r1 online again")
    pinger = Pinger(ha.lab, ha.client_host, SERVER)
    try:
        wait_until(lambda: len(pinger.replies) >= 3, 15, "pings through r2")
        started = time.time()
        while time.time() < started + 5:  # watch for a move back, and for lost pings, for 5 s
            assert ha.carriers() == ["r2"]
            time.sleep(0.2)
        _, lost = pinger.outage(started)
        assert lost == 0, f"{lost} pings lost while r1 came back"
    finally:
        pinger.stop()
    routes = {(r["node"], r["primary"]) for r in ha.m.admin_cli("routes", "list") if r["prefix"] == SUBNET}
    assert routes == {("r1", False), ("r2", True)}


def _peer(agent: Agent, name: str) -> dict:
    return next((p for p in agent.status()["peers"] if p["name"] == name), {})


def test_a_primary_cut_off_the_network_is_taken_offline_and_its_subnet_moves(ha):
    """No FIN reaches coord from a host that vanished: coord drops the stream once its keepalives
    go unacknowledged (--dead-connection-timeout, 10 s by default), then elects the standby."""
    wait_carriers(ha, ["r2"])
    wait_until(lambda: _peer(ha.client, "r1").get("online") is True, 15, "r1 online as the standby")
    pinger = Pinger(ha.lab, ha.client_host, SERVER)
    try:
        wait_until(lambda: len(pinger.replies) >= 5, 15, "steady pings through r2")
        cut_at = time.time()
        ha.lab.run(ha.r2_host, ["ip", "link", "set", "eth0", "down"])
        wait_carriers(ha, ["r1"], timeout=60)
        switched_at = time.time()
        wait_until(lambda: pinger.replies[-1][0] > switched_at + 1, 30, "pings through r1")
        gap, lost = pinger.outage(cut_at)
        print(
            f"\nHA failover after a network cut: {lost} pings lost; longest time between two replies"
            f" {gap:.2f} s; client routed via r1 {switched_at - cut_at:.2f} s after the cut"
        )
        assert gap < 40
    finally:
        pinger.stop()
        ha.lab.run(ha.r2_host, ["ip", "link", "set", "eth0", "up"])
        ha.lab.run(ha.r2_host, ["ip", "route", "replace", "default", "via", ha.r2_host.gateway])
