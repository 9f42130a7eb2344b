"""MagicDNS and split DNS with real resolvers: dig and getent inside namespaces, dnsmasq upstreams.

- coord's DNS configuration (--dns-config): domain mesh.test, split DNS corp.test -> 10.61.0.53.
- "corpgw" routes 10.61.0.0/24 (auto-approved); on it, "corpdns" runs dnsmasq answering
  db.corp.test: reachable only through the mesh.
- "isp" runs dnsmasq answering www.example.test: the laptops' original resolver.
- "laptop" runs wiremeshd --accept-dns --accept-routes; "desk" runs it without --accept-dns.

Each laptop's /etc/resolv.conf is /etc/netns/<namespace>/resolv.conf (bind-mounted by
`ip netns exec`): the host's own file is never touched.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest
from mesh_kit import COORD_ARGS, COORD_PORT, VENV_BIN, MeshLab, wait_until

from wiremesh.lab import Host, Lab

pytestmark = pytest.mark.netns

DOMAIN = "mesh.test"
CORP_DNS = "10.61.0.53"
WWW = "198.18.7.7"
POLICY = """{
  "autoApprovers": {"routes": {"10.61.0.0/24": ["alice@"]}},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}"""


class DNSMeshLab(MeshLab):
    def __init__(self, lab: Lab, dns_config: dict) -> None:
        super().__init__(lab)
        self.dns_file = self.dir / "dns.json"
        self.dns_file.write_text(json.dumps(dns_config))

    def start_coord(self) -> None:
        self.coord = self._service(
            "wiremesh.coord.app",
            "coord",
            f"{self.ctl.address}:{COORD_PORT}",
            ["--replica-id", "coord-0", *COORD_ARGS, "--dns-config", str(self.dns_file)],
        )


def dnsmasq(lab: Lab, node: Host, listen: str, *records: str) -> None:
    argv = ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces", "--user=root"]
    argv += [f"--listen-address={listen}", "--log-facility=-", *(f"--host-record={r}" for r in records)]
    lab.popen(node, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class World:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.netns_dirs: list[pathlib.Path] = []
        m = DNSMeshLab(lab, {"domain": DOMAIN, "routes": {"corp.test": [CORP_DNS]}})
        self.m = m
        m.start_services()
        m.set_policy(POLICY)
        self.isp = lab.host("isp")
        dnsmasq(lab, self.isp, self.isp.address, f"www.example.test,{WWW}")
        self.corpgw_host, self.corpdns = lab.host("corpgw"), lab.host("corpdns")
        self._corp_subnet()
        dnsmasq(lab, self.corpdns, CORP_DNS, f"db.corp.test,{CORP_DNS}")
        self.laptop_host, self.desk_host = lab.host("laptop"), lab.host("desk")
        self.original = f"# the ISP's\nnameserver {self.isp.address}\nsearch lab.example\noptions ndots:1\n"
        for host in (self.laptop_host, self.desk_host):
            self.resolv_conf(host).write_text(self.original)
        key = m.auth_key("--reusable")
        self.corpgw = m.agent("corpgw", self.corpgw_host, key, routes=("10.61.0.0/24",))
        self.laptop = m.agent("laptop", self.laptop_host, key, flags=("--accept-dns", "--accept-routes"))
        self.desk = m.agent("desk", self.desk_host, key)

    def _corp_subnet(self) -> None:
        """10.61.0.0/24 between corpgw and corpdns (a veth pair), routed by corpgw only."""
        lab = self.lab
        lab.run(self.corpgw_host, ["ip", "link", "add", "corp0", "type", "veth", "peer", "name", "corp1"])
        lab.run(self.corpgw_host, ["ip", "link", "set", "corp1", "netns", lab.ns_of(self.corpdns)])
        lab.run(self.corpgw_host, ["ip", "addr", "add", "10.61.0.1/24", "dev", "corp0"])
        lab.run(self.corpgw_host, ["ip", "link", "set", "corp0", "up"])
        lab.run(self.corpdns, ["ip", "addr", "add", f"{CORP_DNS}/24", "dev", "corp1"])
        lab.run(self.corpdns, ["ip", "link", "set", "corp1", "up"])
        lab.run(self.corpdns, ["ip", "route", "replace", "10.61.0.0/24", "dev", "corp1"])
        lab.sysctl(self.corpgw_host, {"net.ipv4.ip_forward": 1})

    def resolv_conf(self, host: Host) -> pathlib.Path:
        """The namespace's own /etc/resolv.conf, as `ip netns exec` mounts it."""
        directory = pathlib.Path("/etc/netns") / self.lab.ns_of(host)
        if directory not in self.netns_dirs:
            directory.mkdir(parents=True, exist_ok=False)
            self.netns_dirs.append(directory)
        return directory / "resolv.conf"

    def close(self) -> None:
        for directory in self.netns_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        with_parent = pathlib.Path("/etc/netns")
        if with_parent.is_dir() and not any(with_parent.iterdir()):
            with_parent.rmdir()

    def dig(self, host: Host, *args: str) -> list[str]:
        out = self.lab.run(host, ["dig", "+short", "+tries=2", "+time=3", *args], check=False).stdout
        return [line for line in out.split() if line]

    def getent(self, host: Host, name: str) -> str:
        return self.lab.run(host, ["getent", "ahostsv4", name], check=False).stdout


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab:
        w = None
        try:
            w = World(lab)
            yield w
        except BaseException:
            if w is not None:
                sys.stderr.write(w.m.logs()[-20000:])
            raise
        finally:
            if w is not None:
                w.close()
            assert not any(pathlib.Path("/etc/netns").glob(f"{lab.prefix}*"))


def test_peers_resolve_by_name_at_the_agents_resolver(world):
    desk_v4, desk_v6 = world.desk.address(4), world.desk.address(6)
    assert world.dig(world.laptop_host, "@100.100.100.100", f"desk.{DOMAIN}") == [desk_v4]
    assert world.dig(world.laptop_host, "@fd7a:115c:a1e0::53", f"desk.{DOMAIN}", "AAAA") == [desk_v6]
    # Over TCP too, and on a node that did not ask to be the host's resolver.
    assert world.dig(world.desk_host, "+tcp", "@100.100.100.100", f"laptop.{DOMAIN}") == [
        world.laptop.address(4)
    ]
    assert world.dig(world.laptop_host, "@100.100.100.100", "-x", desk_v4) == [f"desk.{DOMAIN}."]


def test_accept_dns_points_the_hosts_resolver_at_magicdns(world):
    text = world.resolv_conf(world.laptop_host).read_text()
    assert "nameserver 100.100.100.100" in text and f"search {DOMAIN} lab.example" in text
    assert f"{world.desk.address(4)} " in world.getent(world.laptop_host, f"desk.{DOMAIN}")
    assert f"{world.corpgw.address(4)} " in world.getent(world.laptop_host, "corpgw")  # the search domain
    # The node without --accept-dns keeps its resolver as it was.
    assert world.resolv_conf(world.desk_host).read_text() == world.original


def test_other_names_are_forwarded_to_the_hosts_original_resolver(world):
    assert world.dig(world.laptop_host, "@100.100.100.100", "www.example.test") == [WWW]
    assert f"{WWW} " in world.getent(world.laptop_host, "www.example.test")
    assert world.dig(world.desk_host, "@100.100.100.100", "www.example.test") == [WWW]


def test_the_resolver_addresses_are_never_the_source_of_mesh_traffic(world):
    # Otherwise a forwarded query (or any packet) would leave as 100.100.100.100: no peer's
    # allowed IPs hold that address, so no reply could ever come back.
    route = world.lab.run(world.laptop_host, ["ip", "route", "get", CORP_DNS]).stdout
    assert f"src {world.laptop.address(4)} " in route
    route6 = world.lab.run(world.laptop_host, ["ip", "-6", "route", "get", world.desk.address(6)]).stdout
    assert f"src {world.laptop.address(6)} " in route6


def test_split_dns_reaches_the_routes_resolver_through_the_subnet_router(world):
    wait_until(
        lambda: world.dig(world.laptop_host, "@100.100.100.100", "db.corp.test") == [CORP_DNS],
        20,
        "db.corp.test through corpgw",
    )
    assert f"{CORP_DNS} " in world.getent(world.laptop_host, "db.corp.test")


def test_names_follow_the_netmap(world):
    node_id = world.desk.status()["self"]["id"]
    world.m.admin_cli("nodes", "rename", str(node_id), "desk2")
    try:
        wait_until(
            lambda: (
                world.dig(world.laptop_host, "@100.100.100.100", f"desk2.{DOMAIN}") == [world.desk.address(4)]
            ),
            15,
            "the new name",
        )
        assert world.dig(world.laptop_host, "@100.100.100.100", f"desk.{DOMAIN}") == []
    finally:
        world.m.admin_cli("nodes", "rename", str(node_id), "desk")


def test_status_shows_magicdns_names(world):
    out = subprocess.run(
        [str(VENV_BIN / "wiremesh"), "status", "--socket", world.laptop.socket_path],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    assert f"# MagicDNS: NAME.{DOMAIN} at 100.100.100.100" in out and "(resolv.conf)" in out
    assert {line.split()[1] for line in out.splitlines() if not line.startswith("#")} >= {"desk", "laptop"}
    status = world.laptop.status()
    assert status["self"]["dns_name"] == f"laptop.{DOMAIN}."
    assert status["dns"]["upstream"] == [world.isp.address]


def test_stopping_the_agent_restores_the_hosts_resolver(world):
    # Last: it stops the laptop's agent.
    world.m.stop_agent(world.laptop)
    assert world.resolv_conf(world.laptop_host).read_text() == world.original
    assert not (world.laptop.state_dir / "resolv.conf.before-wiremesh").exists()
    assert os.path.exists(world.resolv_conf(world.laptop_host))
