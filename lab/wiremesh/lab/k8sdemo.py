"""`make demo-k8s`: wiremesh installed with Helm into a real two-node cluster, and a laptop outside.

Builds what is missing (Kubernetes and CoreDNS from their Go modules, the images with buildah,
each once per machine), starts the cluster, installs charts/wiremesh, joins a laptop behind a NAT
router with a MeshNode's pre-auth key (MagicDNS as its resolver: --accept-dns), and shows what a
user would look at: `kubectl get meshnodes`, the laptop resolving a node (MagicDNS) and a cluster
Service (split DNS for cluster.local) by name and fetching a page from that Service on node2, the
path it took, a pod reaching the laptop, then tears everything down. Needs root. Ctrl-C stops it
at any point.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

from wiremesh.lab.cluster import KubeCluster
from wiremesh.lab.k8sservices import MESH_DOMAIN, ServicesOnCluster
from wiremesh.lab.lab import Lab

STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {text}", flush=True)


def show(title: str, text: str) -> None:
    print(f"\n$ {title}\n{text.rstrip()}\n", flush=True)


def run() -> int:
    say("building what is missing (first run on a machine: Kubernetes, CoreDNS, images; ~15 min)")
    with Lab() as lab:
        say("starting a control plane and two nodes (kubelet, containerd, runc, CNI bridge, kube-proxy)")
        with KubeCluster(lab, nodes=2) as cluster:
            show("kubectl get nodes -o wide", cluster.kubectl("get", "nodes", "-o", "wide"))
            mesh = ServicesOnCluster(cluster)
            try:
                return _demo(lab, cluster, mesh)
            finally:
                mesh.remove_netns_dirs()


def _demo(lab: Lab, cluster: KubeCluster, mesh: ServicesOnCluster) -> int:
    web = mesh.web_pod("web", cluster.nodes[1].name, {"hello.bin": 65536})
    service = mesh.web_service("web", "web")
    say(f"a web pod on {cluster.nodes[1].name} at {web}:8080, Service web at {service}")
    say("helm install wiremesh charts/wiremesh (coord, keys, relay, NATS, operator, agent DaemonSet)")
    mesh.install()
    show(
        "kubectl get pods -n wiremesh -o wide",
        cluster.kubectl("get", "pods", "-n", "wiremesh", "-o", "wide"),
    )
    say("a laptop behind a home NAT router joins with the pre-auth key of its MeshNode (--accept-dns)")
    laptop = mesh.join_laptop(resolv_conf=mesh.laptop_resolv_conf())
    show("kubectl get meshnodes", cluster.kubectl("get", "meshnodes"))
    # Names: a node by MagicDNS, a cluster Service by split DNS (cluster.local -> the cluster DNS).
    for name in (f"node2.{MESH_DOMAIN}", "web.default.svc.cluster.local"):
        answer = ""
        deadline = time.monotonic() + 60
        while not answer and time.monotonic() < deadline:
            answer = lab.run(laptop, ["getent", "hosts", name], check=False).stdout
            time.sleep(0.5)
        show(f"laptop$ getent hosts {name}", answer or "(no answer)")
    url = "http://web.default.svc.cluster.local:8080/hello.bin"
    deadline = time.monotonic() + 60
    fetched = None
    while fetched is None and time.monotonic() < deadline:
        result = lab.run(laptop, ["python3", "-c", _FETCH, url], check=False)
        fetched = result.stdout if result.returncode == 0 else None
    if fetched is None:
        say("the laptop could not reach the pod")
        return 1
    show(f"laptop$ curl {url}", fetched)
    show("laptop$ wiremesh status", mesh.wiremesh_cli(laptop, "status"))
    show("laptop$ wiremesh ping -c 2 node2", mesh.wiremesh_cli(laptop, "ping", "-c", "2", "node2"))
    address = mesh.wiremesh_cli(laptop, "ip", "-4").strip()
    page = f"{lab.tmpdir}/laptop-www"
    lab.run(laptop, ["mkdir", "-p", page])
    lab.run(laptop, ["sh", "-c", f"echo hello from the laptop > {page}/hello.txt"])
    lab.popen(
        laptop,
        ["python3", "-m", "http.server", "8081", "--bind", "0.0.0.0", "-d", page],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    say(f"the web pod fetches a page from the laptop at its mesh address {address}")
    answer = ""
    deadline = time.monotonic() + 30
    while not answer and time.monotonic() < deadline:
        answer = mesh.pod_exec(
            "web", "python3", "-c", _FETCH, f"http://{address}:8081/hello.txt", check=False
        )
        time.sleep(0.5)
    show(f"web$ curl http://{address}:8081/hello.txt", answer or "(no answer)")
    say("tearing down")
    return 0


# The workload image has python3 but no curl.
_FETCH = (
    "import sys,urllib.request; r = urllib.request.urlopen(sys.argv[1], timeout=5); "
    "print(r.status, r.reason, len(r.read()), 'bytes')"
)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        sys.exit(run())
    except KeyboardInterrupt:
        say("interrupted; everything was torn down")
        sys.exit(130)


if __name__ == "__main__":
    main()
