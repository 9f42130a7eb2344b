"""Installing a policy cuts what it does not allow, the first policy too, and a peer cannot forge
ICMP errors about our flows with others (issue 9, finding 5).

Three agents of three users, alice (A), bob (B) and carol (C), start with no policy: everyone
reaches everyone, and the connections opened then are what the first policy must judge. (Coord
sends explicit allow-all rules when no policy is set, which the agent always tracked; an empty
packet_filter, which left the agent without a filter, is covered in test_mesh_filter_flows.py.)
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest
from mesh_kit import Agent, MeshLab, mesh_lab, wait_until

from wiremesh.lab.support import internet_checksum

pytestmark = pytest.mark.netns

# A may open SSH to B; C may open HTTP to A (which keeps A and C peers); nothing else.
POLICY = json.dumps(
    {
        "acls": [
            {"action": "accept", "src": ["alice@"], "dst": ["bob@:22"]},
            {"action": "accept", "src": ["carol@"], "dst": ["alice@:80"]},
        ]
    }
)
ETH_P_ALL = 0x0003
ICMP_UNREACHABLE, FRAGMENTATION_NEEDED = 3, 4


class Mesh:
    def __init__(self, m: MeshLab) -> None:
        self.m = m
        self.lab = m.lab
        users = {"a": "alice", "b": "bob", "c": "carol"}
        agents = [m.agent(n, self.lab.host(n), m.auth_key("--user", users[n]), wait=False) for n in "abc"]
        for agent in agents:
            m.wait_running(agent)
        self.a, self.b, self.c = agents
        self.listeners: dict[str, socket.socket] = {}
        for agent in (self.a, self.b):
            sock = self.lab.socket(agent.node, socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((agent.address(), 22))
            sock.listen(8)
            self.listeners[agent.name] = sock

    def connect(self, src: Agent, dst: Agent) -> tuple[socket.socket, socket.socket]:
        """A TCP connection src -> dst:22 that carried data both ways: (client, server)."""

        def attempt() -> socket.socket | None:
            sock = self.lab.socket(src.node, socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(1.0)
            try:
                sock.connect((dst.address(), 22))
            except OSError:
                sock.close()
                return None
            return sock

        client = wait_until(attempt, 20, f"{src.name} -> {dst.name}:22")
        listener = self.listeners[dst.name]
        listener.settimeout(5)
        while True:
            server, peer = listener.accept()
            if peer == client.getsockname():
                break
            server.close()
        server.settimeout(5)
        client.settimeout(5)
        client.sendall(b"hello")
        assert server.recv(16) == b"hello"
        server.sendall(b"welcome")
        assert client.recv(16) == b"welcome"
        return client, server

    def filter_drops(self, agent: Agent) -> int:
        return int(agent.status()["packet_filter"]["drops"].get("no_rule", 0))

    def install_policy(self) -> None:
        self.m.set_policy(POLICY)
        for agent in (self.a, self.b, self.c):
            wait_until(
                lambda agent=agent: (
                    agent.status()["packet_filter"]["rules"] > 0
                    or not agent.status()["packet_filter"]["allow_all"]
                ),
                10,
                f"{agent.name}'s filter",
            )


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with mesh_lab() as m:
        yield Mesh(m)


def test_the_first_policy_cuts_a_connection_the_peer_opened_while_no_policy_was_set(mesh: Mesh) -> None:
    b_to_a = mesh.connect(mesh.b, mesh.a)  # A does not allow B in: cut
    a_to_b = mesh.connect(mesh.a, mesh.b)  # B allows A on 22: kept
    with contextlib.ExitStack() as stack:
        for sock in (*b_to_a, *a_to_b):
            stack.enter_context(contextlib.closing(sock))
        mesh.install_policy()
        client, server = b_to_a
        # A's side keeps sending (a download, say): its packets must not make B's flow A's.
        server.sendall(b"more data")
        assert client.recv(16) == b"more data"
        client.sendall(b"after")
        server.settimeout(2.0)
        with pytest.raises(TimeoutError):
            server.recv(16)
        # The connection A opened while there was no policy, and that the policy allows, lives on.
        client, server = a_to_b
        client.sendall(b"still here")
        assert server.recv(16) == b"still here"
        server.sendall(b"so am i")
        assert client.recv(16) == b"so am i"


def forged_fragmentation_needed(src: str, dst: str, quoted_tcp: tuple[str, int, str, int]) -> bytes:
    """An ICMP "fragmentation needed" (MTU 576) from `src` to `dst` quoting a TCP segment."""
    local, lport, remote, rport = quoted_tcp
    quoted = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0x4000, 64, socket.IPPROTO_TCP, 0,
        ipaddress.IPv4Address(local).packed, ipaddress.IPv4Address(remote).packed,
    ) + struct.pack("!HHI", lport, rport, 1)  # fmt: skip
    icmp = struct.pack("!BBHHH", ICMP_UNREACHABLE, FRAGMENTATION_NEEDED, 0, 0, 576) + quoted
    icmp = icmp[:2] + struct.pack("!H", internet_checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, socket.IPPROTO_ICMP, 0,
        ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed,
    )  # fmt: skip
    return header + icmp


def test_an_icmp_error_about_our_flow_is_admitted_only_from_its_far_end(mesh: Mesh) -> None:
    mesh.install_policy()
    client, server = mesh.connect(mesh.a, mesh.b)
    with contextlib.closing(client), contextlib.closing(server):
        local, lport = client.getsockname()
        remote, rport = client.getpeername()
        a_ip, c_ip = mesh.a.address(), mesh.c.address()
        forged = forged_fragmentation_needed(c_ip, a_ip, (local, lport, remote, rport))
        sniffer = mesh.lab.socket(mesh.a.node, socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        sniffer.bind((mesh.a.ifname, 0))
        raw = mesh.lab.socket(mesh.c.node, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with contextlib.closing(sniffer), contextlib.closing(raw):
            before = mesh.filter_drops(mesh.a)
            delivered = False
            deadline = time.monotonic() + 10
            # C is A's peer (the policy lets C reach A): its packets arrive, decrypted and with
            # C's own address; only the filter stands between them and A's TCP stack.
            while time.monotonic() < deadline and mesh.filter_drops(mesh.a) == before:
                raw.sendto(forged, (a_ip, 0))
                end = time.monotonic() + 0.3
                while (left := end - time.monotonic()) > 0 and select.select([sniffer], [], [], left)[0]:
                    packet = sniffer.recv(2048)
                    if len(packet) >= 21 and packet[9] == socket.IPPROTO_ICMP and packet[20] == 3:
                        delivered = True
                if delivered:
                    break
            assert not delivered, "A's filter delivered C's forged ICMP error about A's flow with B"
            assert mesh.filter_drops(mesh.a) > before
        # The connection itself is untouched.
        client.sendall(b"ok")
        assert server.recv(16) == b"ok"
