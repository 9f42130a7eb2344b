"""Names and Services on the mesh in the real lab cluster (wiremesh.lab.k8sservices): split DNS for
cluster.local through the nodes, MagicDNS on a laptop outside the cluster (--accept-dns), a Service
exposed on the mesh by annotation (ingress proxy), and a mesh device reached from pods through an
ExternalName Service (egress proxy). One cluster for the module; tests run in file order.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from wiremesh.lab.cluster import KubeCluster
from wiremesh.lab.k8smesh import NAMESPACE
from wiremesh.lab.k8sservices import DNS_IP, MESH_DOMAIN, ServicesOnCluster
from wiremesh.lab.lab import Lab

pytestmark = [pytest.mark.netns, pytest.mark.slow]

WEB_PORT = 8080
LAPTOP_PORT = 8081
# Prints what it got: text as it is, anything else as its sha256.
FETCH = (
    "import hashlib, sys, urllib.request\n"
    "try: body = urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read()\n"
    "except Exception as e: print('error', e); sys.exit(1)\n"
    "try: print(body.decode())\n"
    "except UnicodeDecodeError: print(hashlib.sha256(body).hexdigest())\n"
)
SERVE = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        body = ('laptop sees ' + self.client_address[0]).encode()\n"
    "        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()\n"
    "        self.wfile.write(body)\n"
    "http.server.ThreadingHTTPServer(('0.0.0.0', int(sys.argv[1])), H).serve_forever()\n"
)


class World:
    def __init__(self, lab: Lab, cluster: KubeCluster) -> None:
        self.lab, self.cluster = lab, cluster
        self.mesh = ServicesOnCluster(cluster)
        self.node1, self.node2 = cluster.nodes
        self.web_ip = self.mesh.web_pod("web", self.node2.name, {"page.txt": 32})
        self.web_service = self.mesh.web_service("web", "web")
        self.mesh.install()
        self.laptop = self.mesh.join_laptop(resolv_conf=self.mesh.laptop_resolv_conf())
        self.laptop_server = lab.popen(self.laptop, [sys.executable, "-c", SERVE, str(LAPTOP_PORT)])

    def laptop_fetch(self, url: str, timeout: float = 5) -> str | None:
        result = self.lab.run(
            self.laptop, [sys.executable, "-c", FETCH, url, str(timeout)], check=False, timeout=timeout + 30
        )
        return result.stdout.strip() if result.returncode == 0 else None

    def dig(self, *args: str) -> list[str]:
        out = self.lab.run(self.laptop, ["dig", "+short", "+tries=2", "+time=3", *args], check=False).stdout
        return out.split()

    def until(self, check: Any, timeout: float, what: str, interval: float = 1.0) -> Any:
        started = time.monotonic()
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not within {timeout:g} s: {what}")
            time.sleep(interval)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    mesh = None
    try:
        with Lab() as lab, KubeCluster(lab, nodes=2) as cluster:
            try:
                w = World(lab, cluster)
                mesh = w.mesh
                yield w
            except BaseException:
                for args in (("get", "pods", "-A", "-o", "wide"), ("get", "meshnodes"), ("get", "svc", "-A")):
                    sys.stderr.write(cluster.kubectl(*args, check=False)[-6000:])
                raise
    finally:
        if mesh is not None:
            mesh.remove_netns_dirs()


def test_every_node_offers_the_service_cidr_and_one_is_primary(world: World) -> None:
    routes = world.until(
        lambda: [r for r in _routes(world) if r["prefix"] == "10.96.0.0/16" and r["approved"]],
        120,
        "both nodes' Service CIDR approved",
    )
    assert {r["node"] for r in routes} == {"node1", "node2"}
    assert sorted(r["primary"] for r in routes) == [False, True]


def _routes(world: World) -> list[dict[str, Any]]:
    import json

    out = world.cluster.kubectl(
        "exec", "deployment/wiremesh-coord", "-n", NAMESPACE, "--",
        "python3", "-c", _ADMIN_ROUTES,
    )  # fmt: skip
    return list(json.loads(out))


# coord's admin API from inside its own pod (the admin key is in its environment).
_ADMIN_ROUTES = (
    "import json, os, urllib.request\n"
    "r = urllib.request.Request('http://127.0.0.1:8080/api/v1/routes',"
    " headers={'Authorization': 'Bearer ' + os.environ['WIREMESH_ADMIN_KEY']})\n"
    "print(urllib.request.urlopen(r, timeout=10).read().decode())\n"
)


def test_the_laptop_resolves_cluster_services_by_name_through_split_dns(world: World) -> None:
    name = "web.default.svc.cluster.local"
    assert world.until(lambda: world.dig("@100.100.100.100", name) == [world.web_service], 90, "split DNS")
    # Its own resolver is MagicDNS (--accept-dns), so applications resolve the name too.
    page = world.until(lambda: world.laptop_fetch(f"http://{name}:{WEB_PORT}/page.txt"), 60, "the Service")
    assert page == _sha(32)
    # Both the cluster DNS and the Service's cluster IP are reached through the mesh (one node).
    for address in (DNS_IP, world.web_service):
        assert "dev wm0" in world.lab.run(world.laptop, ["ip", "route", "get", address]).stdout


def _sha(size: int) -> str:
    import hashlib

    from wiremesh.lab.k8smesh import expected_content

    return hashlib.sha256(expected_content(size)).hexdigest()


def test_the_laptop_resolves_mesh_peers_by_magicdns_name(world: World) -> None:
    addresses = world.until(lambda: world.dig(f"node2.{MESH_DOMAIN}"), 30, "node2's MagicDNS name")
    assert addresses[0].startswith("100.")
    status = world.mesh.wiremesh_cli(world.laptop, "status")
    assert f"# MagicDNS: NAME.{MESH_DOMAIN} at 100.100.100.100" in status


def test_an_exposed_service_is_reached_at_its_proxys_mesh_name(world: World) -> None:
    world.mesh.web_service("web", "web", annotations={"wiremesh.dev/expose": "true"})

    def annotated() -> dict[str, str] | None:
        notes = world.cluster.kubectl_json("get", "service", "web", "-n", "default")["metadata"].get(
            "annotations"
        )
        return notes if notes and "wiremesh.dev/mesh-ipv4" in notes else None

    notes = world.until(annotated, 240, "the proxy to join and the Service to get its mesh address")
    assert notes["wiremesh.dev/mesh-name"] == f"default-web.{MESH_DOMAIN}"
    url = f"http://default-web.{MESH_DOMAIN}:{WEB_PORT}/page.txt"
    assert world.until(lambda: world.laptop_fetch(url), 90, "the Service at its mesh name") == _sha(32)
    assert world.dig(f"default-web.{MESH_DOMAIN}") == [notes["wiremesh.dev/mesh-ipv4"]]


def test_a_pod_reaches_the_laptop_through_an_egress_service(world: World) -> None:
    world.mesh.egress_service("laptop", "laptop", LAPTOP_PORT)
    url = f"http://laptop.default.svc.cluster.local:{LAPTOP_PORT}/"

    def fetched() -> str | None:
        out = world.mesh.pod_exec("web", "python3", "-c", FETCH, url, "5", check=False)
        return out.strip() if out.startswith("laptop sees") else None

    answer = world.until(fetched, 240, "the web pod to reach the laptop through the egress proxy")

    def proxy_address() -> str | None:
        # The operator copies the address into the MeshNode's status at its next poll, which may
        # come after the first request went through.
        status = world.cluster.kubectl_json("get", "meshnode", "wm-default-laptop").get("status", {})
        return status.get("addresses", {}).get("ipv4")

    # The laptop sees the proxy's mesh address, an identity its ACL knows.
    proxy = world.until(proxy_address, 60, "the egress proxy's MeshNode status to show its address")
    assert answer == f"laptop sees {proxy}"


def test_removing_the_annotation_takes_the_proxy_off_the_mesh(world: World) -> None:
    world.cluster.kubectl("annotate", "service", "web", "-n", "default", "wiremesh.dev/expose-")
    world.until(
        lambda: "wm-default-web" not in world.cluster.kubectl("get", "meshnodes", check=False),
        60,
        "the proxy's MeshNode gone",
    )
    url = f"http://default-web.{MESH_DOMAIN}:{WEB_PORT}/page.txt"
    world.until(lambda: world.laptop_fetch(url, timeout=2) is None, 60, "the name to stop answering")
