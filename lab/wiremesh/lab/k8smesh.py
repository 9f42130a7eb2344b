"""wiremesh installed with Helm into the lab cluster, and a laptop outside it, behind a NAT router.

    with Lab() as lab, KubeCluster(lab) as cluster:
        mesh = MeshOnCluster(cluster)
        mesh.install()                 # helm install charts/wiremesh; every workload Ready
        laptop = mesh.join_laptop()    # a MeshNode, its pre-auth key, wiremeshd behind NAT
        mesh.laptop_http(laptop, "http://10.244.2.5:8080/")

The chart runs as a user would run it on a small cloud cluster: coord, the relay (with its STUN
sidecar) and NATS inside; coord and the relay exposed as NodePorts on node1 (the relay with
externalTrafficPolicy Local, so STUN sees the laptop's NAT mapping); the operator mirrors each
Node into a MeshNode; the agent DaemonSet joins each node with its own one-off key and
advertises the node's pod CIDR. The laptop gets its key from a MeshNode of its own and joins with
``--accept-routes``, as a Tailscale user reaching a cluster's pods would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from wiremesh.lab.cluster import ClusterError, KubeCluster
from wiremesh.lab.lab import Host, NatKind, Router

log = logging.getLogger("wiremesh.lab.k8smesh")

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "wiremesh"
NAMESPACE = "wiremesh"
# The chart keeps the MeshNodes' pre-auth key Secrets in a namespace of their own (the operator's
# Secret rights reach nothing else): operator.meshNodeKeysNamespace, default RELEASE_NAMESPACE-meshnode-keys.
MESHNODE_KEYS_NAMESPACE = f"{NAMESPACE}-meshnode-keys"
RELEASE = "wiremesh"
COORD_NODE_PORT = 30080
DERP_NODE_PORT = 30340
STUN_NODE_PORT = 30478
AGENT_PORT = 41641
READY_TIMEOUT = 300.0


def _name(component: str) -> str:
    return f"{RELEASE}-{component}"  # the release name contains "wiremesh": no second prefix


class MeshOnCluster:
    """The chart in `cluster`, and laptops joined from outside."""

    def __init__(self, cluster: KubeCluster) -> None:
        self.cluster = cluster
        self.lab = cluster.lab
        self.laptops: dict[str, tuple[Host, Router]] = {}
        self.netns_dirs: list[Path] = []  # /etc/netns/NS directories made for laptops' resolv.conf

    @property
    def relay_node(self) -> Any:
        return self.cluster.nodes[0]

    @property
    def login_server(self) -> str:
        return f"http://{self.relay_node.address}:{COORD_NODE_PORT}"

    def values(self) -> dict[str, Any]:
        """The chart values for the lab: local images, NodePorts on node1, fast metrics."""
        images = self.cluster.images
        assert images is not None
        image = {"tag": images.tag, "pullPolicy": "Never"}
        nats_repo, nats_tag = images.nats.rsplit(":", 1)
        on_node1 = {"kubernetes.io/hostname": self.relay_node.name}
        derp_map = {
            "regions": {
                "1": {
                    "name": "lab",
                    "relay": f"{self.relay_node.address}:{DERP_NODE_PORT}",
                    "stun": f"{self.relay_node.address}:{STUN_NODE_PORT}",
                }
            }
        }
        return {
            "nats": {"image": {"repository": nats_repo, "tag": nats_tag, "pullPolicy": "Never"}},
            "coord": {
                "image": {"repository": "wiremesh/coord", **image},
                "service": {"type": "NodePort", "nodePort": COORD_NODE_PORT},
                "derpMap": derp_map,
            },
            "keys": {"image": {"repository": "wiremesh/keys", **image}},
            # The relay's STUN sidecar answers (it runs the stun image).
            "stun": {"enabled": False, "image": {"repository": "wiremesh/stun", **image}},
            "derp": {
                "image": {"repository": "wiremesh/derp", **image},
                "service": {"type": "NodePort", "nodePort": DERP_NODE_PORT, "stunNodePort": STUN_NODE_PORT},
                "nodeSelector": on_node1,
            },
            "operator": {"image": {"repository": "wiremesh/operator", **image}, "pollInterval": 2},
            # Both lab nodes are one machine: keep each node's keys apart, in this cluster's directory.
            "agent": {
                "image": {"repository": "wiremesh/agent", **image},
                "stateDir": str(self.cluster.dir / "agent-state"),
                "stateDirPerNode": True,
            },
            "metrics": {"dashboard": {"enabled": True}},
        }

    def install(self) -> None:
        values = self.cluster.dir / "values.json"
        values.write_text(json.dumps(self.values()))
        started = time.monotonic()
        self.cluster.helm(
            "install",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--values",
            str(values),
        )
        self.wait_ready()
        log.info("k8smesh: chart installed and every workload Ready after %.0f s", time.monotonic() - started)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        for kind, name in self.workloads():
            self.cluster.kubectl(
                "rollout", "status", f"{kind}/{name}", "-n", NAMESPACE, f"--timeout={int(timeout)}s",
                timeout=timeout + 30,
            )  # fmt: skip
        nodes = {n.name for n in self.cluster.nodes}
        self.cluster.wait_for(
            lambda: nodes <= self.online_meshnodes(), f"MeshNodes {sorted(nodes)} online", timeout
        )

    def workloads(self) -> list[tuple[str, str]]:
        out = []
        for kind in ("deployment", "statefulset", "daemonset"):
            listing = self.cluster.kubectl_json("get", kind, "-n", NAMESPACE)
            out += [(kind, item["metadata"]["name"]) for item in listing["items"]]
        return out

    def meshnodes(self) -> dict[str, dict[str, Any]]:
        listing = self.cluster.kubectl_json("get", "meshnodes")
        return {item["metadata"]["name"]: item for item in listing["items"]}

    def online_meshnodes(self) -> set[str]:
        return {name for name, item in self.meshnodes().items() if (item.get("status") or {}).get("online")}

    # ---- laptops

    def join_laptop(
        self,
        name: str = "laptop",
        kind: NatKind = NatKind.EIM_APDF,
        *,
        flags: tuple[str, ...] = (),
        resolv_conf: str | None = None,
    ) -> Host:
        """A MeshNode for the laptop, and wiremeshd behind a NAT router joined with its key.

        `resolv_conf`: the laptop's own /etc/resolv.conf (/etc/netns/NS/resolv.conf, which
        `ip netns exec` mounts; the host's file is never touched), and wiremeshd --accept-dns."""
        self.cluster.apply(
            {
                "apiVersion": "wiremesh.dev/v1alpha1",
                "kind": "MeshNode",
                "metadata": {"name": name},
                "spec": {},
            }
        )
        secret = f"meshnode-{name}-authkey"
        key = self.cluster.wait_for(lambda: self._secret_value(secret, "authkey"), f"Secret {secret}", 60)
        router = self.lab.nat_router(f"{name}-nat", kind=kind)
        host = self.lab.host(name, behind=router)
        state = Path(self.lab.tmpdir) / f"{name}-state"
        state.mkdir()
        key_file = state.parent / f"{name}.authkey"
        key_file.write_text(key)
        key_file.chmod(0o600)
        if resolv_conf is not None:
            directory = Path("/etc/netns") / self.lab.ns_of(host)
            directory.mkdir(parents=True)
            self.netns_dirs.append(directory)
            (directory / "resolv.conf").write_text(resolv_conf)
            flags = (*flags, "--accept-dns")
        with open(state.parent / f"{name}.log", "ab") as out:
            self.lab.popen(
                host,
                [
                    sys.executable, "-m", "wiremesh.agent.daemon",
                    "--login-server", self.login_server, "--auth-key", f"file:{key_file}",
                    "--state-dir", str(state), "--socket", str(state / "wiremeshd.sock"),
                    "--tun", "wm0", "--hostname", name, "--listen-port", str(AGENT_PORT), "--accept-routes",
                    *flags,
                ],
                stdout=out,
                stderr=out,
            )  # fmt: skip
        self.laptops[name] = (host, router)
        self.cluster.wait_for(
            lambda: name in self.online_meshnodes(), f"MeshNode {name} online", READY_TIMEOUT
        )
        return host

    def remove_netns_dirs(self) -> None:
        """Remove the /etc/netns/NS directories join_laptop made (call after the lab closed)."""
        import shutil

        for directory in self.netns_dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self.netns_dirs.clear()
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty

    def laptop_socket(self, name: str = "laptop") -> str:
        return str(Path(self.lab.tmpdir) / f"{name}-state" / "wiremeshd.sock")

    def laptop_log(self, name: str = "laptop") -> str:
        path = Path(self.lab.tmpdir) / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wiremesh_cli(self, host: Host, *args: str, name: str = "laptop") -> str:
        cli = str(Path(sys.executable).parent / "wiremesh")
        return self.lab.run(host, [cli, *args, "--socket", self.laptop_socket(name)], timeout=60).stdout

    def _secret_value(self, secret: str, key: str) -> str | None:
        import base64

        try:
            data = (
                self.cluster.kubectl_json("get", "secret", secret, "-n", MESHNODE_KEYS_NAMESPACE).get("data")
                or {}
            )
        except ClusterError:
            return None
        value = data.get(key)
        return base64.b64decode(value).decode() if value else None

    # ---- workloads for tests and the demo

    def web_pod(self, name: str, node: str, files: dict[str, int] | None = None) -> str:
        """A pod on `node` serving HTTP on :8080 (python3 http.server over generated files of the
        given sizes, content a pure function of the name); returns its IP."""
        images = self.cluster.images
        assert images is not None
        make = "; ".join(
            f"open('/srv/{fname}','wb').write(bytes((i * 131 + 7) % 251 for i in range({size})))"
            for fname, size in (files or {}).items()
        )
        script = f"import os; os.makedirs('/srv', exist_ok=True); {make or 'pass'}; os.chdir('/srv'); "
        script += "import http.server; http.server.ThreadingHTTPServer(('', 8080), http.server.SimpleHTTPRequestHandler).serve_forever()"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {
                "nodeName": node,
                "containers": [
                    {
                        "name": "web",
                        "image": images.workload,
                        "imagePullPolicy": "Never",
                        "command": ["python3", "-u", "-c", script],
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                    }
                ],
                "terminationGracePeriodSeconds": 1,
            },
        }
        self.cluster.apply(pod)
        self.cluster.kubectl(
            "wait", "--for=condition=Ready", f"pod/{name}", "-n", "default", "--timeout=180s", timeout=200
        )
        return str(self.cluster.kubectl_json("get", "pod", name, "-n", "default")["status"]["podIP"])

    def pod_exec(self, pod: str, *argv: str, timeout: float = 60, check: bool = True) -> str:
        return self.cluster.kubectl("exec", pod, "-n", "default", "--", *argv, timeout=timeout, check=check)


def expected_content(size: int) -> bytes:
    """What web_pod serves for a file of `size` bytes."""
    return bytes((i * 131 + 7) % 251 for i in range(size))
