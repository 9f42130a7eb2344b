"""The policy coord compiles is enforced by the agents, statefully, and changes apply within 2 s.

Three agents of three users: alice (A), bob (B), carol (C). TCP probes use sockets opened
inside the agents' namespaces: a connect() that completes means the SYN reached the listener
and its SYN-ACK came back through both filters.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator

import pytest
from mesh_kit import Agent, MeshLab, mesh_lab, wait_until

pytestmark = pytest.mark.netns

A_TO_B_SSH = json.dumps({"acls": [{"action": "accept", "src": ["alice@"], "dst": ["bob@:22"]}]})
A_TO_B_WEB_C_TO_A_SSH = json.dumps(
    {
        "acls": [
            {"action": "accept", "src": ["alice@"], "dst": ["bob@:80"]},
            {"action": "accept", "src": ["carol@"], "dst": ["alice@:22"]},
        ]
    }
)
CONNECT_TIMEOUT = 1.0


class PolicyMesh:
    def __init__(self, m: MeshLab) -> None:
        self.m = m
        self.lab = m.lab
        hosts = {name: self.lab.host(name) for name in ("a", "b", "c")}
        users = {"a": "alice", "b": "bob", "c": "carol"}
        agents = [
            m.agent(n, hosts[n], m.auth_key("--user", users[n]), wait=False, metrics=True) for n in "abc"
        ]
        for agent in agents:
            m.wait_running(agent)
        self.a, self.b, self.c = agents
        self.listeners: dict[tuple[str, int], socket.socket] = {}
        for agent in agents:
            for port in (22, 80):
                self.listen(agent, port)

    def listen(self, agent: Agent, port: int) -> None:
        sock = self.lab.socket(agent.node, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((agent.address(), port))
        sock.listen(16)
        self.listeners[(agent.name, port)] = sock

    def connect(
        self, src: Agent, dst: Agent, port: int, timeout: float = CONNECT_TIMEOUT
    ) -> socket.socket | None:
        sock = self.lab.socket(src.node, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((dst.address(), port))
        except OSError:
            sock.close()
            return None
        return sock

    def can_connect(self, src: Agent, dst: Agent, port: int, timeout: float = CONNECT_TIMEOUT) -> bool:
        sock = self.connect(src, dst, port, timeout)
        if sock is None:
            return False
        sock.close()
        return True

    def accept(self, dst: Agent, port: int, client: socket.socket) -> socket.socket:
        """The server side of `client`'s connection (earlier probes may still sit in the backlog)."""
        listener = self.listeners[(dst.name, port)]
        listener.settimeout(5)
        while True:
            conn, peer = listener.accept()
            if peer == client.getsockname():
                conn.settimeout(5)
                return conn
            conn.close()


@pytest.fixture(scope="module")
def pm() -> Iterator[PolicyMesh]:
    with mesh_lab() as m:
        mesh = PolicyMesh(m)
        # Without a policy everyone reaches everyone: the handshakes are done before policies apply.
        for src, dst in ((mesh.a, mesh.b), (mesh.b, mesh.a), (mesh.c, mesh.a)):
            wait_until(lambda s=src, d=dst: mesh.can_connect(s, d, 80), 15, f"{src.name}->{dst.name}")
        yield mesh


@pytest.fixture
def ssh_policy(pm: PolicyMesh) -> PolicyMesh:
    pm.m.set_policy(A_TO_B_SSH)
    wait_until(lambda: not pm.c.status()["peers"], 5, "carol's netmap to empty")
    wait_until(lambda: pm.b.status()["packet_filter"]["rules"] > 0, 5, "bob's filter")
    return pm


def test_a_reaches_b_on_tcp_22(ssh_policy):
    assert ssh_policy.can_connect(ssh_policy.a, ssh_policy.b, 22)


def test_a_cannot_reach_b_on_tcp_80(ssh_policy):
    assert not ssh_policy.can_connect(ssh_policy.a, ssh_policy.b, 80)


def test_b_cannot_open_a_connection_to_a(ssh_policy):
    assert not ssh_policy.can_connect(ssh_policy.b, ssh_policy.a, 22)


def test_replies_to_a_connection_from_a_flow_back(ssh_policy):
    pm = ssh_policy
    client = pm.connect(pm.a, pm.b, 22)
    assert client is not None
    with contextlib.closing(client), contextlib.closing(pm.accept(pm.b, 22, client)) as server:
        client.sendall(b"hello b")
        assert server.recv(64) == b"hello b"
        server.sendall(b"hello a" * 100)
        got = b""
        while len(got) < 700:
            got += client.recv(4096)
        assert got == b"hello a" * 100


def test_c_granted_nothing_sees_neither_a_nor_b(ssh_policy):
    pm = ssh_policy
    assert pm.c.status()["peers"] == []
    assert "c" not in pm.a.peer_names() and "c" not in pm.b.peer_names()


def test_policy_change_applies_on_every_agent_within_2s_and_cuts_denied_flow(ssh_policy):
    pm = ssh_policy
    client = pm.connect(pm.a, pm.b, 22)
    assert client is not None
    with contextlib.closing(client), contextlib.closing(pm.accept(pm.b, 22, client)) as server:
        client.sendall(b"before")
        assert server.recv(64) == b"before"
        pm.m.set_policy(A_TO_B_WEB_C_TO_A_SSH)
        changed = time.monotonic()

        def applied() -> bool:
            return pm.can_connect(pm.a, pm.b, 80, 0.3) and pm.can_connect(pm.c, pm.a, 22, 0.3)

        wait_until(applied, 2.0, "the new policy on a, b and c")
        assert time.monotonic() - changed <= 2.0
        # The established A->B:22 flow is now denied at B: its data no longer arrives.
        client.sendall(b"after")
        server.settimeout(1.5)
        with pytest.raises(TimeoutError):
            server.recv(64)
        assert not pm.can_connect(pm.a, pm.b, 22)


def test_denied_packets_are_counted_by_reason_in_metrics(ssh_policy):
    pm = ssh_policy
    assert not pm.can_connect(pm.a, pm.b, 80, 0.5)

    def dropped() -> float:
        for line in pm.m.scrape(pm.b).splitlines():
            if line.startswith('wiremesh_filter_drops_total{reason="no_rule"}'):
                return float(line.split()[-1])
        return 0.0

    assert dropped() > 0
