"""Exit nodes with real agents, coord, a relay and NAT routers.

- "exit" (a public host, tagged tag:exit, auto-approved by the policy's autoApprovers.exitNode)
  runs `wiremeshd --advertise-exit-node`.
- "client" (alice's laptop) sits behind a home NAT router with a "printer" on its LAN; it may use
  exit nodes (autogroup:internet). "bob" may reach the exit node but not the internet through it.
- "www" is a public server that answers every TCP connection with the address it came from.
- "blocked" sits behind a router that drops all UDP: the client reaches it only through the relay.

The client reaches www through the exit node only (www sees the exit node's address; with the
exit node gone nothing gets out), its LAN only when allowed, and coord and the relay keep
working while the exit node carries everything else.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from wiremesh.agent.state import StateDir
from wiremesh.core import crypto
from wiremesh.lab import Host, Lab, NatKind

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "nat"))
from mesh_kit import VENV_BIN, Agent, RelayMapMeshLab, peer_endpoint, pings, wait_until
from natlab import NatWorld

pytestmark = pytest.mark.netns

WWW_PORT = 8000
POLICY = """{
  "tagOwners": {"tag:exit": ["alice@"]},
  "autoApprovers": {"exitNode": ["tag:exit"]},
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["autogroup:internet:*"]},
    {"action": "accept", "src": ["autogroup:member"], "dst": ["tag:exit:*", "autogroup:member:*"]},
  ],
}"""
# Answers each connection with the peer's address, then closes it.
WHO_AM_I = (
    "import socket\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    f"s.bind(('0.0.0.0', {WWW_PORT})); s.listen()\n"
    "while True:\n"
    "    c, a = s.accept(); c.sendall(a[0].encode()); c.close()\n"
)


class World:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        relays = NatWorld(lab, regions=1)
        derp_map = pathlib.Path(lab.tmpdir) / "derp-map.json"
        derp_map.write_text(json.dumps(relays.derp_map()))
        m = RelayMapMeshLab(lab, str(derp_map))
        self.m = m
        self.home = lab.nat_router("home", kind=NatKind.EIM_APDF)
        self.client_host = lab.host("client", behind=self.home)
        self.printer = lab.host("printer", behind=self.home)
        self.exit_host = lab.host("exit")
        lab.sysctl(self.exit_host, {"net.ipv4.ip_forward": 1})
        self.bob_host = lab.device("bob", NatKind.EIM_APDF)
        self.blocked_host = lab.device("blocked", NatKind.UDP_BLOCKED)
        self.www = lab.host("www")
        names = ("exit", "client", "bob", "blocked")
        for name in names:  # the relay admits the agents' node keys only
            keys = StateDir(m.dir / f"state-{name}").load_or_create_keys()
            relays.extra_keys.append(crypto.public_key(keys.node))
        relays.start_relay(1)
        m.start_services()
        m.set_policy(POLICY)
        lab.popen(self.www, [sys.executable, "-c", WHO_AM_I], stdout=subprocess.DEVNULL)
        alice = m.auth_key("--reusable")
        exit_key = m.auth_key("--tags", "tag:exit")
        bob_key = str(m.admin_cli("authkeys", "create", "--user", "bob")["key"])
        self.exit = m.agent("exit", self.exit_host, exit_key, wait=False, flags=("--advertise-exit-node",))
        self.client = m.agent("client", self.client_host, alice, wait=False)
        self.bob = m.agent("bob", self.bob_host, bob_key, wait=False)
        self.blocked = m.agent("blocked", self.blocked_host, alice, wait=False)
        for agent in (self.exit, self.client, self.bob, self.blocked):
            m.wait_running(agent, timeout=60)

    def who_am_i(self, node: Host, timeout: float = 5) -> str:
        """The address www sees a TCP connection from `node` come from ("" if none gets through)."""
        code = (
            "import socket, sys\n"
            f"s = socket.create_connection(({self.www.address!r}, {WWW_PORT}), timeout={timeout})\n"
            "print(s.recv(100).decode())\n"
        )
        result = self.lab.run(node, [sys.executable, "-c", code], check=False, timeout=timeout + 20)
        return result.stdout.strip() if result.returncode == 0 else ""

    def up(self, agent: Agent, *flags: str) -> subprocess.CompletedProcess[str]:
        argv = [str(VENV_BIN / "wiremesh"), "up", "--socket", agent.socket_path, *flags]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    def use_exit(self, agent: Agent, *flags: str) -> None:
        done = self.up(agent, "--exit-node", "exit", *flags)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: agent.status()["self"]["exit_node"]["name"] == "exit", 15, "exit node in use")


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        w = World(lab)
        try:
            yield w
        except BaseException:
            sys.stderr.write(w.m.logs()[-20000:])
            raise


def test_the_exit_node_is_auto_approved_and_offered_to_peers(world):
    routes = {(r["node"], r["prefix"], r["approved"]) for r in world.m.admin_cli("routes", "list")}
    assert {("exit", "0.0.0.0/0", True), ("exit", "::/0", True)} <= routes
    wait_until(
        lambda: next(p for p in world.client.status()["peers"] if p["name"] == "exit")["exit_node_option"],
        15,
        "client to see the exit node offered",
    )


def test_without_an_exit_node_www_sees_the_home_routers_address(world):
    world.up(world.client, "--exit-node", "")
    assert world.who_am_i(world.client_host) == world.home.wan_address


def test_through_the_exit_node_www_sees_the_exit_nodes_address(world):
    world.use_exit(world.client)
    assert wait_until(lambda: world.who_am_i(world.client_host), 20, "www through the exit node")
    assert world.who_am_i(world.client_host) == world.exit_host.address
    route = world.lab.run(world.client_host, ["ip", "route", "get", world.www.address]).stdout
    assert world.client.ifname in route
    # The default route is in the mesh's table only; the host's main table is untouched.
    table = world.lab.run(world.client_host, ["ip", "route", "show", "table", "52"]).stdout
    assert f"default dev {world.client.ifname}" in table
    main = world.lab.run(world.client_host, ["ip", "route", "show", "table", "main"]).stdout
    assert world.client.ifname not in main and f"default via {world.home.lan_address}" in main
    status = subprocess.run(
        [str(VENV_BIN / "wiremesh"), "status", "--socket", world.client.socket_path],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert "# exit node: exit (without LAN access)" in status


def test_the_lan_is_not_reached_directly_unless_allowed(world):
    world.use_exit(world.client)
    ping = ["ping", "-n", "-c", "1", "-W", "2", world.printer.address]
    assert world.lab.run(world.client_host, ping, check=False).returncode != 0
    world.use_exit(world.client, "--exit-node-allow-lan-access")
    wait_until(lambda: world.lab.run(world.client_host, ping, check=False).returncode == 0, 15, "printer")
    # The internet still goes through the exit node.
    assert world.who_am_i(world.client_host) == world.exit_host.address


def test_coord_and_the_relay_keep_working_while_the_exit_node_carries_everything_else(world):
    world.use_exit(world.client)
    # The relay: "blocked" has no UDP at all, so the client reaches it through region 1.
    assert pings(world.lab, world.client_host, world.blocked.address(), timeout=30)
    assert peer_endpoint(world.client, "blocked").startswith("relay")
    # coord: a rename reaches the client's netmap stream.
    node_id = world.blocked.status()["self"]["id"]
    world.m.admin_cli("nodes", "rename", str(node_id), "blocked2")
    wait_until(lambda: "blocked2" in world.client.peer_names(), 15, "the rename to reach the client")
    world.m.admin_cli("nodes", "rename", str(node_id), "blocked")
    wait_until(lambda: "blocked" in world.client.peer_names(), 15, "the rename back")
    assert world.who_am_i(world.client_host) == world.exit_host.address


def test_a_user_without_autogroup_internet_gets_nothing_through_the_exit_node(world):
    world.use_exit(world.bob)
    assert world.who_am_i(world.bob_host, timeout=3) == ""
    assert pings(world.lab, world.bob_host, world.exit.address())  # the exit node itself: allowed


def test_with_the_exit_node_gone_nothing_leaks_around_it(world):
    world.use_exit(world.client)
    world.m.stop_agent(world.exit)
    wait_until(
        lambda: not next(p for p in world.client.status()["peers"] if p["name"] == "exit")["online"],
        20,
        "the exit node offline",
    )
    assert world.who_am_i(world.client_host, timeout=3) == ""
    world.up(world.client, "--exit-node", "")
    wait_until(lambda: world.who_am_i(world.client_host) == world.home.wan_address, 20, "direct again")
