"""wiremeshd in mesh mode against real NATS, keys and coord, every process in its own namespace.

One lab for the module: services in "ctl", agents a and c on public hosts (accepting routes), agent
b in a router namespace with a "pod" host behind it (its advertised subnet). Tests that cut a node off use
a fresh agent of their own, so the shared three stay intact.
"""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from mesh_kit import Agent, MeshLab, mesh_lab, ping, pings, router_with_pod, wait_until

pytestmark = pytest.mark.netns

WIREMESH = [str(pathlib.Path(sys.executable).parent / "wiremesh")]


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
            m.agent("a", self.a_host, key, wait=False, flags=("--accept-routes",)),
            m.agent("b", self.router, key, routes=(self.pod_subnet,), wait=False),
            m.agent("c", self.c_host, key, wait=False, flags=("--accept-routes",)),
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


def test_agents_reach_each_other_over_ipv6_mesh_addresses(mesh):
    assert pings(mesh.lab, mesh.a.node, mesh.c.address(6))
    assert pings(mesh.lab, mesh.c.node, mesh.b.address(6))


def test_tun_carries_mesh_addresses_the_links_mtu_less_wireguards_and_mesh_routes(mesh):
    link = mesh.lab.run(mesh.a.node, ["ip", "-o", "link", "show", "dev", mesh.a.ifname]).stdout
    assert " mtu 1420 " in link  # --mtu auto: the lab's 1500-byte link less 80
    addrs = mesh.lab.run(mesh.a.node, ["ip", "-o", "addr", "show", "dev", mesh.a.ifname]).stdout
    assert f"{mesh.a.address(4)}/32" in addrs and f"{mesh.a.address(6)}/128" in addrs
    v4 = mesh.lab.run(mesh.a.node, ["ip", "route", "show", "table", "52", "dev", mesh.a.ifname]).stdout
    v6 = mesh.lab.run(mesh.a.node, ["ip", "-6", "route", "show", "table", "52", "dev", mesh.a.ifname]).stdout
    assert "100.64.0.0/10" in v4 and "fd7a:115c:a1e0::/48" in v6
    # The main table holds nothing of ours; two rules select table 52 after main's specific routes.
    assert mesh.a.ifname not in mesh.lab.run(mesh.a.node, ["ip", "route", "show", "table", "main"]).stdout
    rules = mesh.lab.run(mesh.a.node, ["ip", "rule", "show"]).stdout
    assert "5230:\tfrom all lookup main suppress_prefixlength 0" in rules
    assert "5270:\tfrom all lookup 52" in rules


def test_agents_report_their_interface_addresses_as_endpoints(mesh):
    nodes = {n["name"]: n for n in mesh.m.admin_cli("nodes", "list")}
    assert nodes["a"]["endpoints"] == [f"{mesh.a_host.address}:41641"]
    # The router agent lists its WAN (default route) address before its LAN one.
    assert nodes["b"]["endpoints"][:2] == [
        f"{mesh.router.wan_address}:41641",
        f"{mesh.router.lan_address}:41641",
    ]


def test_status_lists_self_and_peers_with_traffic_and_handshake(mesh):
    assert pings(mesh.lab, mesh.a.node, mesh.c.address())
    result = cli("status", "--json", "--socket", mesh.a.socket_path)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["backend_state"] == "Running"
    assert status["self"]["name"] == "a"
    peer = next(p for p in status["peers"] if p["name"] == "c")
    assert peer["online"] is True
    assert peer["addresses"][0] == mesh.c.address()
    assert peer["endpoint"] == f"{mesh.c_host.address}:41641"
    assert peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
    assert peer["last_handshake_seconds_ago"] is not None


def test_status_table_names_every_peer(mesh):
    result = cli("status", "--socket", mesh.b.socket_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[1] == "b" and lines[0].endswith("self")
    assert {line.split()[1] for line in lines[1:]} >= {"a", "c"}


def test_ip_prints_the_mesh_addresses_by_family(mesh):
    v4 = cli("ip", "-4", "--socket", mesh.a.socket_path)
    v6 = cli("ip", "-6", "--socket", mesh.a.socket_path)
    assert v4.returncode == 0 and v6.returncode == 0
    assert v4.stdout.strip() == mesh.a.address(4) and v4.stdout.startswith("100.")
    assert v6.stdout.strip() == mesh.a.address(6) and v6.stdout.startswith("fd7a:115c:a1e0:")


def test_cli_without_a_daemon_fails_with_a_clear_message(tmp_path):
    result = cli("status", "--socket", str(tmp_path / "none.sock"))
    assert result.returncode == 1
    assert "cannot reach wiremeshd" in result.stderr


def test_advertised_route_is_reachable_only_after_admin_approval(mesh):
    pod = mesh.pod.address
    assert ping(mesh.lab, mesh.a.node, pod, count=1, wait=1)[1] == 0
    routes = mesh.m.admin_cli("routes", "list")
    assert any(r["prefix"] == mesh.pod_subnet and not r["approved"] for r in routes)
    mesh.m.admin_cli("routes", "approve", "b", mesh.pod_subnet)
    wait_until(lambda: mesh.pod_subnet in _mesh_routes(mesh, mesh.a), 10, "a to route the pod subnet")
    assert pings(mesh.lab, mesh.a.node, pod)
    assert pings(mesh.lab, mesh.c.node, pod)


def _mesh_routes(mesh: Mesh, agent: Agent) -> str:
    return mesh.lab.run(agent.node, ["ip", "route", "show", "table", "52", "dev", agent.ifname]).stdout


def _approved(mesh: Mesh) -> None:
    mesh.m.admin_cli("routes", "approve", "b", mesh.pod_subnet)
    wait_until(lambda: mesh.pod_subnet in _mesh_routes(mesh, mesh.a), 10, "a to route the pod subnet")


def test_a_subnet_router_masquerades_both_ways_and_clamps_tcp_mss_to_the_tunnel(mesh):
    _approved(mesh)
    # mesh -> subnet: the pod sees the router's LAN address, so it needs no route into the mesh.
    assert _connect_and_see_peer(mesh, server=mesh.pod, client=mesh.a.node, address=mesh.pod.address) == (
        mesh.router.lan_address
    )
    # subnet -> mesh: a sees b's mesh address. The pod's SYN offers 1460 (its LAN's MTU); the
    # router clamps it to what fits the 1420-byte tunnel (1380) before it enters the tunnel.
    table = "wmtest_mss"
    syn = f"tcp dport {MSS_PORT} tcp flags & (syn | ack) == syn"
    mesh.lab.run(
        mesh.a.node,
        ["nft", "-f", "-"],
        input=(
            f"table inet {table} {{ chain pre {{ type filter hook prerouting priority -300;\n"
            f"  {syn} tcp option maxseg size > 1380 counter\n"
            f"  {syn} tcp option maxseg size <= 1380 counter\n}}\n}}\n"
        ),
    )
    try:
        peer = _connect_and_see_peer(mesh, server=mesh.a.node, client=mesh.pod, address=mesh.a.address())
        counters = re.findall(
            r"packets (\d+)", mesh.lab.run(mesh.a.node, ["nft", "list", "table", "inet", table]).stdout
        )
    finally:
        mesh.lab.run(mesh.a.node, ["nft", "delete", "table", "inet", table], check=False)
    assert peer == mesh.b.address()
    too_big, clamped = (int(c) for c in counters)
    assert too_big == 0 and clamped >= 1


MSS_PORT = 7413


def _connect_and_see_peer(mesh: Mesh, *, server: object, client: object, address: str) -> str:
    """One TCP connection from `client` to `address` (served in `server`): the source address the
    server saw."""
    proc = mesh.lab.popen(
        server, [sys.executable, "-c", _ACCEPT_ONE, str(MSS_PORT)], stdout=subprocess.PIPE, text=True
    )  # type: ignore[arg-type]
    try:
        wait_until(lambda: _listening(mesh, server, MSS_PORT), 10, "the server to listen")
        connect = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 10).close()"
        result = mesh.lab.run(client, [sys.executable, "-c", connect, address, str(MSS_PORT)], check=False)  # type: ignore[arg-type]
        assert result.returncode == 0, result.stderr
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out.strip()


def test_a_node_without_accept_routes_keeps_its_own_route_for_an_advertised_subnet(mesh):
    _approved(mesh)
    b_routes = _mesh_routes(mesh, mesh.b)
    assert mesh.pod_subnet not in b_routes  # its own advertisement stays local
    # The router itself still reaches the pod over its LAN, not the mesh.
    route = mesh.lab.run(mesh.router, ["ip", "route", "get", mesh.pod.address]).stdout
    assert mesh.b.ifname not in route


def _listening(mesh: Mesh, node: object, port: int) -> bool:
    out = mesh.lab.run(node, ["ss", "-Hltn", f"sport = :{port}"]).stdout  # type: ignore[arg-type]
    return bool(out.strip())


# Prints the source address of the first connection it accepts.
_ACCEPT_ONE = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
c, addr = s.accept()
print(addr[0], flush=True)
"""


def test_down_stops_forwarding_and_up_restores_it(mesh):
    assert pings(mesh.lab, mesh.a.node, mesh.c.address())
    down = cli("down", "--socket", mesh.a.socket_path)
    assert down.returncode == 0, down.stderr
    status = mesh.a.status()
    assert status["backend_state"] == "Stopped"
    assert ping(mesh.lab, mesh.a.node, mesh.c.address(), count=2, wait=1)[1] == 0
    assert all(not p["active"] for p in status["peers"])
    up = cli("up", "--socket", mesh.a.socket_path)
    assert up.returncode == 0, up.stderr
    assert mesh.a.status()["backend_state"] == "Running"
    assert pings(mesh.lab, mesh.a.node, mesh.c.address())


def _join_extra(mesh: Mesh, name: str) -> Agent:
    agent = mesh.m.agent(name, mesh.lab.host(name), mesh.key)
    for other in mesh.all():
        wait_peers(other, {name})
    assert pings(mesh.lab, mesh.a.node, agent.address())
    return agent


def _assert_cut_off(mesh: Mesh, agent: Agent, started: float) -> None:
    def dropped_by_all() -> bool:
        return all(agent.name not in other.peer_names() for other in mesh.all())

    wait_until(dropped_by_all, 5 - (time.monotonic() - started), f"every peer to drop {agent.name}")
    for other in mesh.all():
        keys = {p["node_key"] for p in other.status()["peers"]}
        assert agent.status()["self"]["node_key"] not in keys
    address = agent.address()
    assert ping(mesh.lab, agent.node, mesh.a.address(), count=2, wait=1)[1] == 0
    assert ping(mesh.lab, mesh.a.node, address, count=2, wait=1)[1] == 0
    wait_until(lambda: agent.status()["backend_state"] == "NeedsLogin", 5, f"{agent.name} to need login")


def test_deleting_a_node_with_the_admin_cli_cuts_it_off_within_5s(mesh):
    agent = _join_extra(mesh, "d")
    started = time.monotonic()
    mesh.m.admin_cli("nodes", "delete", "d")
    _assert_cut_off(mesh, agent, started)


def test_expiring_a_node_with_the_admin_cli_cuts_it_off_within_5s(mesh):
    agent = _join_extra(mesh, "e")
    started = time.monotonic()
    mesh.m.admin_cli("nodes", "expire", "e")
    _assert_cut_off(mesh, agent, started)


def test_restarting_coord_and_nats_keeps_tunnels_up_and_agents_resync(mesh):
    m = mesh.m
    before = {x.name: (x.status()["self"]["id"], x.address(4), x.address(6)) for x in mesh.all()}
    assert pings(mesh.lab, mesh.a.node, mesh.b.address())
    loop = mesh.lab.popen(
        mesh.a.node,
        ["ping", "-n", "-i", "0.2", "-c", "40", "-W", "1", mesh.b.address()],
        stdout=subprocess.PIPE,
        text=True,
    )
    m.stop_process(m.coord)
    m.stop_process(m.nats)
    m.start_nats()
    m.start_coord()
    m.wait_services()
    # A change made after the restart reaches every agent through its resumed stream.
    m.admin_cli("nodes", "tag", "c", "tag:restarted")

    def tagged_everywhere() -> bool:
        for viewer in (mesh.a, mesh.b):
            peer = next((p for p in viewer.status()["peers"] if p["name"] == "c"), None)
            if peer is None or peer["tags"] != ["tag:restarted"]:
                return False
        return mesh.c.status()["self"]["tags"] == ["tag:restarted"]

    wait_until(tagged_everywhere, 20, "the change after the restart to reach the agents")
    out, _ = loop.communicate(timeout=30)
    mesh.lab.stop(loop)
    sent, received = (int(x) for x in re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    # One echo may be lost to scheduling on a loaded machine; an interruption would cost many.
    assert sent == 40 and received >= sent - 1, out
    after = {x.name: (x.status()["self"]["id"], x.address(4), x.address(6)) for x in mesh.all()}
    assert after == before


def test_restarted_agent_with_same_state_dir_keeps_identity_without_auth_key(mesh):
    before = mesh.c.status()["self"]
    mesh.m.stop_agent(mesh.c)

    def c_offline_for_a() -> bool:
        return any(p["name"] == "c" and not p["online"] for p in mesh.a.status()["peers"])

    wait_until(c_offline_for_a, 10, "a to see c offline")
    mesh.m.agent("c", mesh.c_host, auth_key=None)
    after = mesh.c.status()["self"]
    assert (after["id"], after["addresses"], after["node_key"]) == (
        before["id"],
        before["addresses"],
        before["node_key"],
    )
    assert pings(mesh.lab, mesh.a.node, mesh.c.address())


def test_logout_deregisters_the_node_and_removes_its_state(mesh):
    agent = _join_extra(mesh, "f")
    assert (agent.state_dir / "machine.key").exists()
    result = cli("logout", "--socket", agent.socket_path)
    assert result.returncode == 0, result.stderr
    assert agent.status()["backend_state"] == "LoggedOut"
    assert not any((agent.state_dir / name).exists() for name in ("machine.key", "node.key", "state.json"))
    wait_until(lambda: all("f" not in x.peer_names() for x in mesh.all()), 5, "peers to drop f")
    ip = cli("ip", "--socket", agent.socket_path)
    assert ip.returncode == 1 and "logged out" in ip.stderr


def test_state_dir_and_local_api_socket_are_private(mesh):
    state = mesh.a.state_dir
    assert state.stat().st_mode & 0o777 == 0o700
    for name in ("machine.key", "node.key", "disco.key", "state.json"):
        assert (state / name).stat().st_mode & 0o777 == 0o600, name
    assert pathlib.Path(mesh.a.socket_path).stat().st_mode & 0o777 == 0o600
    # Only public keys leave the node: coord knows the node key's public half, never the private one.
    private = (state / "node.key").read_text().strip()
    nodes = mesh.m.admin_cli("nodes", "list")
    assert private not in json.dumps(nodes)
    assert any(n["node_key"] == mesh.a.status()["self"]["node_key"] for n in nodes)


def test_sigterm_exits_0_and_removes_interface_and_socket(mesh):
    agent = mesh.m.agent("g", mesh.lab.host("g"), mesh.key)
    proc = agent.proc
    assert proc is not None
    mesh.m.stop_agent(agent)
    assert proc.returncode == 0, agent.log_text()[-2000:]
    assert not pathlib.Path(agent.socket_path).exists()
    links = mesh.lab.run(agent.node, ["ip", "-o", "link", "show"]).stdout
    assert agent.ifname not in links


def test_expired_node_comes_back_with_up_and_a_new_auth_key(mesh):
    agent = _join_extra(mesh, "h")
    before = agent.status()["self"]
    mesh.m.admin_cli("nodes", "expire", "h")
    wait_until(lambda: agent.status()["backend_state"] == "NeedsLogin", 10, "h to need login")
    key_file = mesh.m.dir / "h-new.authkey"
    key_file.write_text(mesh.m.auth_key())
    result = cli("up", "--auth-key", f"file:{key_file}", "--socket", agent.socket_path)
    assert result.returncode == 0, result.stderr
    mesh.m.wait_running(agent)
    after = agent.status()["self"]
    assert (after["id"], after["addresses"]) == (before["id"], before["addresses"])
    assert after["node_key"] != before["node_key"]  # coord takes no expired node key back
    wait_peers(mesh.a, {"h"})
    assert pings(mesh.lab, mesh.a.node, agent.address())


def test_agent_started_while_coord_is_down_joins_once_coord_is_back(mesh):
    m = mesh.m
    m.stop_process(m.coord)
    try:
        agent = m.agent("i", mesh.lab.host("i"), mesh.key, wait=False)

        def waiting_for_coord() -> bool:
            status = agent.try_status()
            return bool(status and status["backend_state"] == "Starting" and status["error"])

        wait_until(waiting_for_coord, 15, "i to report coord unreachable")
    finally:
        m.start_coord()
        m.wait_services()
    m.wait_running(agent)
    wait_peers(mesh.a, {"i"})
    assert pings(mesh.lab, agent.node, mesh.a.address())
