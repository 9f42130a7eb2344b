"""The whole product in a real Kubernetes cluster built on this machine, end to end.

Two nodes (kubelet + containerd + runc + CNI bridge + kube-proxy, each in its own network
namespace with its own pod CIDR), a control plane with CoreDNS, images built with buildah from the
Dockerfile, `helm install` of charts/wiremesh, and a laptop behind a NAT router outside the cluster
joined with a MeshNode's pre-auth key (`wiremesh.lab.cluster`, `wiremesh.lab.k8smesh`). The tests
run in file order on one cluster: the ones that cut things off come last.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from wiremesh.lab.cluster import KubeCluster
from wiremesh.lab.k8smesh import (
    CHART,
    COORD_NODE_PORT,
    NAMESPACE,
    STUN_NODE_PORT,
    MeshOnCluster,
    expected_content,
)
from wiremesh.lab.lab import Lab
from wiremesh.lab.prometheus import Prometheus, check_rules, rule_groups, scrape_configs

pytestmark = [pytest.mark.netns, pytest.mark.slow]

BIG = 4 * 1024 * 1024  # "some megabytes" each way
WEB_PORT = 8080
LAPTOP_PORT = 8081
ALLOW_ALL = {
    "tagOwners": {"tag:k8s-node": []},
    "acls": [
        {"action": "accept", "src": ["tag:k8s-node"], "dst": ["*:*"]},
        {"action": "accept", "src": ["*"], "dst": ["tag:k8s-node:*", "10.244.0.0/16:*"]},
    ],
}
# The laptop may still reach the nodes themselves, but no pod.
NO_PODS_FOR_LAPTOP = {
    "tagOwners": {"tag:k8s-node": []},
    "acls": [
        {"action": "accept", "src": ["tag:k8s-node"], "dst": ["*:*"]},
        {"action": "accept", "src": ["*"], "dst": ["tag:k8s-node:*"]},
    ],
}


class World:
    """The cluster, the mesh on it, the laptop, two web pods and what was seen before the install."""

    def __init__(self, lab: Lab, cluster: KubeCluster) -> None:
        self.lab, self.cluster = lab, cluster
        self.mesh = MeshOnCluster(cluster)
        self.node1, self.node2 = cluster.nodes
        # Pods first: pod-to-pod over the CNI is checked before any agent exists.
        self.web1 = self.mesh.web_pod("web1", self.node1.name)
        self.web2 = self.mesh.web_pod("web2", self.node2.name, {"big.bin": BIG})
        self.before_agents = self.pod_to_pod()
        self.mesh.install()
        self.laptop = self.mesh.join_laptop()
        self.prometheus: Prometheus | None = None

    def pod_to_pod(self) -> tuple[str, str]:
        """(what web1 fetched from web2's pod IP, node1's route to web2): the CNI path."""
        fetched = self.fetch_in_pod("web1", f"http://{self.web2}:{WEB_PORT}/big.bin")
        route = self.lab.run(self.node1.host, ["ip", "route", "get", self.web2]).stdout
        return fetched, route

    def fetch_in_pod(self, pod: str, url: str) -> str:
        """sha256 of what `pod` downloads from `url` (python3 in the workload image)."""
        script = (
            "import hashlib,sys,urllib.request;"
            "print(hashlib.sha256(urllib.request.urlopen(sys.argv[1], timeout=20).read()).hexdigest())"
        )
        return self.mesh.pod_exec(pod, "python3", "-c", script, url).strip()

    def laptop_fetch(self, url: str, timeout: float = 20) -> str | None:
        """sha256 of what the laptop downloads from `url`, or None if it cannot."""
        script = (
            "import hashlib,sys,urllib.request\n"
            "try: print(hashlib.sha256(urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])).read()).hexdigest())\n"
            "except Exception as e: print('error', e); sys.exit(1)\n"
        )
        result = self.lab.run(
            self.laptop, [sys.executable, "-c", script, url, str(timeout)], check=False, timeout=timeout + 30
        )
        return result.stdout.strip() if result.returncode == 0 else None

    def laptop_address(self) -> str:
        return self.mesh.wiremesh_cli(self.laptop, "ip", "-4").strip()

    def set_acl(self, policy: dict[str, Any]) -> None:
        self.cluster.apply(
            {
                "apiVersion": "wiremesh.dev/v1alpha1",
                "kind": "ACL",
                "metadata": {"name": "default"},
                "spec": policy,
            }
        )


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    with Lab() as lab, KubeCluster(lab, nodes=2) as cluster:
        try:
            yield World(lab, cluster)
        except BaseException:
            _dump(cluster)
            raise


def _dump(cluster: KubeCluster) -> None:
    for args in (("get", "pods", "-A", "-o", "wide"), ("get", "events", "-A"), ("get", "meshnodes")):
        sys.stderr.write(cluster.kubectl(*args, check=False)[-6000:])


def _sha(size: int) -> str:
    return hashlib.sha256(expected_content(size)).hexdigest()


def _until(check: Any, timeout: float, what: str, interval: float = 0.5) -> float:
    """Seconds until `check()` is true (raises after `timeout`)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)
    return time.monotonic() - started


# ---- the cluster and the install


def test_every_workload_of_the_chart_is_ready(world: World) -> None:
    kinds = {kind for kind, _ in world.mesh.workloads()}
    assert kinds == {"deployment", "statefulset", "daemonset"}
    for kind, name in world.mesh.workloads():
        status = world.cluster.kubectl_json("get", kind, name, "-n", NAMESPACE)["status"]
        if kind == "daemonset":
            assert status["numberReady"] == status["desiredNumberScheduled"] == 2, name
        else:
            assert status.get("readyReplicas", 0) == status["replicas"] >= 1, name


def test_the_runtime_images_hold_the_product_and_no_lab_sources_or_build_tools(world: World) -> None:
    probe = (
        "import importlib.util as u, os, shutil; "
        "from wiremesh.core.wireguard import kernel; "
        "print(u.find_spec('wiremesh.coord') is not None, u.find_spec('wiremesh.lab') is None, "
        "u.find_spec('hatchling') is None, u.find_spec('pip') is None, "
        "not os.path.exists('/src'), not os.path.exists('/opt/build'), shutil.which('gcc') is None, "
        "shutil.which('cargo') is None, kernel.NATIVE)"  # the Rust data path, built in the image
    )
    for component in ("coord", "agent"):
        out = world.cluster.kubectl(
            "exec", f"{_kind(component)}/wiremesh-{component}", "-n", NAMESPACE, "--", "python3", "-c", probe
        )
        assert out.split() == ["True"] * 9, (component, out)


def _kind(component: str) -> str:
    return "daemonset" if component == "agent" else "deployment"


def test_every_node_agent_joined_and_its_meshnode_is_online(world: World) -> None:
    meshnodes = world.mesh.meshnodes()
    for node in (world.node1, world.node2):
        status = meshnodes[node.name]["status"]
        assert status["online"] is True
        assert status["addresses"]["ipv4"].startswith("100.")
    table = world.cluster.kubectl("get", "meshnodes")
    header, *rows = table.splitlines()
    assert header.split()[:4] == ["NAME", "HOSTNAME", "IPV4", "ONLINE"]
    online = {row.split()[0] for row in rows if row.split()[3] == "true"}
    assert online >= {"node1", "node2", "laptop"}


# ---- the cluster's own routes


def test_pod_to_pod_uses_the_cni_route_before_and_while_the_agents_run(world: World) -> None:
    fetched_before, route_before = world.before_agents
    assert fetched_before == _sha(BIG)
    assert f"via {world.node2.address} dev eth0" in route_before
    fetched, route = world.pod_to_pod()
    assert fetched == _sha(BIG)
    assert route == route_before
    # The agent's routes are in table 52 only; main still has the CNI's route to node2's pods.
    main = world.lab.run(world.node1.host, ["ip", "route", "show", "table", "main"]).stdout
    assert f"{world.node2.pod_cidr} via {world.node2.address} dev eth0" in main
    assert "wm0" not in main
    assert (
        "100.64.0.0/10 dev wm0"
        in world.lab.run(world.node1.host, ["ip", "route", "show", "table", "52"]).stdout
    )


# ---- the laptop and the pods


def test_the_laptop_reaches_a_pod_on_another_node_through_the_mesh(world: World) -> None:
    digest = None

    def fetched() -> bool:
        nonlocal digest
        digest = world.laptop_fetch(f"http://{world.web2}:{WEB_PORT}/big.bin")
        return digest is not None

    _until(fetched, 60, "the laptop to fetch from web2")
    assert digest == _sha(BIG)
    status = json.loads(world.mesh.wiremesh_cli(world.laptop, "status", "--json"))
    node2 = next(p for p in status["peers"] if p["name"] == world.node2.name)
    assert world.node2.pod_cidr in node2["allowed_ips"]
    routes = world.lab.run(world.laptop, ["ip", "route", "show", "table", "52"]).stdout
    assert f"{world.node2.pod_cidr} dev wm0" in routes


def test_a_pod_reaches_the_laptop_by_its_mesh_address(world: World) -> None:
    address = world.laptop_address()
    server = world.lab.popen(
        world.laptop,
        [sys.executable, "-c", _LAPTOP_SERVER, str(LAPTOP_PORT), str(BIG)],
    )
    try:
        _until(lambda: _listening(world, LAPTOP_PORT), 20, "the laptop's server to listen")
        assert world.fetch_in_pod("web2", f"http://{address}:{LAPTOP_PORT}/") == _sha(BIG)
    finally:
        world.lab.stop(server)


def _listening(world: World, port: int) -> bool:
    return bool(world.lab.run(world.laptop, ["ss", "-Hltn", f"sport = :{port}"]).stdout.strip())


_LAPTOP_SERVER = """
import http.server, sys
size = int(sys.argv[2])
body = bytes((i * 131 + 7) % 251 for i in range(size))
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


# ---- policy and revocation


def test_an_acl_applied_with_kubectl_cuts_the_laptop_off_the_pods_and_another_restores_it(
    world: World,
) -> None:
    url = f"http://{world.web2}:{WEB_PORT}/"
    world.set_acl(ALLOW_ALL)
    _until(
        lambda: world.laptop_fetch(url, timeout=3) is not None, 60, "the laptop to reach web2 under ALLOW_ALL"
    )
    started = time.monotonic()
    world.set_acl(NO_PODS_FOR_LAPTOP)
    cut = _until(lambda: world.laptop_fetch(url, timeout=2) is None, 30, "the ACL to cut the laptop off web2")
    print(f"ACL cut after {time.monotonic() - started:.1f} s (last probe {cut:.1f} s)")
    started = time.monotonic()
    world.set_acl(ALLOW_ALL)
    _until(
        lambda: world.laptop_fetch(url, timeout=3) is not None, 30, "the ACL to restore the laptop's access"
    )
    print(f"ACL restored after {time.monotonic() - started:.1f} s")
    acl = world.cluster.kubectl_json("get", "acl", "default")
    assert acl["status"]["valid"] is True


# ---- monitoring


def _chart_objects(world: World, *sets: str) -> list[dict[str, Any]]:
    values = world.cluster.dir / "values.json"
    flags = [a for s in sets for a in ("--set", s)]
    rendered = world.cluster.helm(
        "template", "wiremesh", str(CHART), "-n", NAMESPACE, "--values", str(values), *flags
    )
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@pytest.fixture(scope="module")
def prometheus(world: World) -> Iterator[Prometheus]:
    objects = _chart_objects(
        world,
        "metrics.serviceMonitor.enabled=true",
        "metrics.serviceMonitor.interval=3s",
        "metrics.serviceMonitor.scrapeTimeout=2s",
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.for.relayDown=4s",
    )
    monitors = [o for o in objects if o["kind"] in ("ServiceMonitor", "PodMonitor")]
    rules = [o for o in objects if o["kind"] == "PrometheusRule"]
    assert {m["kind"] for m in monitors} == {"ServiceMonitor", "PodMonitor"} and rules
    api = {
        "api_server": world.cluster.api_url,
        "tls_config": {"ca_file": str(world.cluster.pki["ca"])},
        "authorization": {"credentials": world.cluster.tokens["admin"]},
    }
    assert world.cluster.ctl is not None
    server = Prometheus(world.lab, world.cluster.ctl, world.cluster.dir / "prometheus")
    server.start(scrape_configs(monitors, api), rule_groups(rules))
    try:
        yield server
    finally:
        server.stop()


def test_the_shipped_alert_rules_pass_promtool(world: World) -> None:
    rules = [
        o
        for o in _chart_objects(world, "metrics.prometheusRule.enabled=true")
        if o["kind"] == "PrometheusRule"
    ]
    path = Path(world.cluster.dir) / "chart-rules.yml"
    path.write_text(yaml.safe_dump(rule_groups(rules)))
    result = check_rules(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_prometheus_finds_every_wiremesh_target_with_the_charts_selectors(
    world: World, prometheus: Prometheus
) -> None:
    def all_up() -> bool:
        targets = prometheus.targets()
        jobs = {t["labels"]["job"] for t in targets if t["health"] == "up"}
        return {
            "wiremesh-coord",
            "wiremesh-keys",
            "wiremesh-derp-metrics",
            f"{NAMESPACE}/wiremesh-agent",
        } <= jobs

    try:
        _until(all_up, 90, "every wiremesh target up", interval=2)
    except AssertionError:
        seen = [
            (t["labels"].get("job"), t["scrapeUrl"], t["health"], t.get("lastError"))
            for t in prometheus.targets()
        ]
        raise AssertionError(f"targets: {seen}\n{prometheus.log_tail()}") from None
    agents = [t for t in prometheus.targets() if t["labels"]["job"] == f"{NAMESPACE}/wiremesh-agent"]
    assert len(agents) == 2 and all(t["health"] == "up" for t in agents)


def test_every_dashboard_query_returns_data_from_prometheus(world: World, prometheus: Prometheus) -> None:
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    queries = [
        t["expr"].replace("$__rate_interval", "1m") for p in _panels(dashboard) for t in p.get("targets", [])
    ]
    assert len(queries) > 20
    # Handshakes and filter drops come from the laptop's allowed and blocked fetches above; a stray
    # datagram at the relay's STUN port and a garbage request at coord's agent endpoint, both from
    # outside, make the counted drops and refusals the dashboard charts.
    world.lab.run(
        world.laptop,
        [sys.executable, "-c", _STRAY, world.node1.address, str(STUN_NODE_PORT), str(COORD_NODE_PORT)],
    )
    empty: list[str] = []

    def every_query_answers() -> bool:
        empty[:] = [q for q in queries if not prometheus.query(q)]
        return not empty

    try:
        _until(every_query_answers, 120, "every dashboard query to return data", interval=3)
    except AssertionError:
        raise AssertionError(f"queries without data: {empty}") from None


_STRAY = """
import socket, sys, urllib.request
host, stun, coord = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(3):
        s.sendto(b"not a stun message", (host, stun))
for _ in range(3):
    try:
        urllib.request.urlopen(urllib.request.Request(f"http://{host}:{coord}/machine/login", data=b"garbage"), timeout=5)
    except Exception:
        pass
"""


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from _panels(panel)


def test_the_relay_down_alert_fires_when_the_relay_stops(world: World, prometheus: Prometheus) -> None:
    def firing() -> bool:
        return any(
            a["labels"]["alertname"] == "WiremeshRelayDown" and a["state"] == "firing"
            for a in prometheus.alerts()
        )

    assert not firing()
    replicas = world.cluster.kubectl_json("get", "deployment/wiremesh-derp", "-n", NAMESPACE)["spec"][
        "replicas"
    ]
    world.cluster.kubectl("scale", "deployment/wiremesh-derp", "-n", NAMESPACE, "--replicas=0")
    try:
        seconds = _until(firing, 90, "WiremeshRelayDown to fire", interval=1)
        print(f"WiremeshRelayDown fired {seconds:.1f} s after the relay was scaled to 0")
    finally:
        world.cluster.kubectl("scale", "deployment/wiremesh-derp", "-n", NAMESPACE, f"--replicas={replicas}")


# ---- cutting off, and the agents gone


def test_deleting_the_laptops_meshnode_cuts_it_off(world: World) -> None:
    url = f"http://{world.web2}:{WEB_PORT}/"
    _until(lambda: world.laptop_fetch(url, timeout=3) is not None, 60, "the laptop to reach web2 again")
    started = time.monotonic()
    world.cluster.kubectl("delete", "meshnode", "laptop", "--wait=false")
    _until(lambda: world.laptop_fetch(url, timeout=2) is None, 30, "the deleted laptop to be cut off")
    print(f"laptop cut off {time.monotonic() - started:.1f} s after its MeshNode was deleted")
    status = json.loads(world.mesh.wiremesh_cli(world.laptop, "status", "--json"))
    assert status["backend_state"] == "NeedsLogin"


def test_pod_to_pod_keeps_the_cni_route_after_the_agents_stop(world: World) -> None:
    world.cluster.kubectl("delete", "daemonset/wiremesh-agent", "-n", NAMESPACE, "--wait=true", timeout=120)

    def agents_gone() -> bool:
        pods = world.cluster.kubectl_json(
            "get", "pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=agent"
        )
        return not pods["items"]

    _until(agents_gone, 90, "the agent pods to terminate")
    for node in (world.node1, world.node2):
        rules = world.lab.run(node.host, ["ip", "rule", "show"]).stdout
        assert "lookup 52" not in rules and "5230:" not in rules, node.name
        assert "wiremesh_wm0" not in world.lab.run(node.host, ["nft", "list", "tables"]).stdout
    fetched, route = world.pod_to_pod()
    assert fetched == _sha(BIG)
    assert route == world.before_agents[1]
