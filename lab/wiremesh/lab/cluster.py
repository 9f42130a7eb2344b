"""A real Kubernetes cluster in network namespaces: control plane, nodes, DNS, images.

    with Lab() as lab, KubeCluster(lab, nodes=2) as cluster:
        cluster.kubectl("get", "nodes")
        cluster.helm("install", ...)

Every part is real and built here: etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kubelet, kube-proxy and kubectl from one Kubernetes release (`wiremesh.lab.kube`), CoreDNS from
its Go module (`wiremesh.lab.gobuild`), containerd, runc and the CNI plugins from Debian, images
built with buildah from the project's Dockerfile (`wiremesh.lab.images`).

Layout, all on the lab's "internet" (each host like a cloud VM with a public address):
- ``k8s-ctl``: etcd (loopback), kube-apiserver (:6443), controller-manager, scheduler, and CoreDNS
  (:53) serving cluster.local; it routes to every pod CIDR, as a cluster member does.
- ``k8s-nodeN``: containerd + kubelet + kube-proxy (nftables mode), pod CIDR 10.244.N.0/24 on a
  CNI bridge, static routes to the other nodes' pod CIDRs (`wiremesh.lab.kubenode`).
kubectl and helm run inside ``k8s-ctl`` (the root namespace holds no lab address); `kubectl()`
and `helm()` return their output.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import secrets
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from wiremesh.lab import gobuild, kube
from wiremesh.lab.images import ImageSet
from wiremesh.lab.images import build as build_images
from wiremesh.lab.kubenode import CLUSTER_DOMAIN, KubeNode, NodeError, remove_dir
from wiremesh.lab.lab import Host, Lab
from wiremesh.lab.support import StartedService

log = logging.getLogger("wiremesh.lab.cluster")

API_PORT = 6443
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
START_TIMEOUT = 180.0


class ClusterError(RuntimeError):
    """The cluster could not be built or started, or a command in it failed."""


def _pki(directory: Path, apiserver_ip: str) -> dict[str, Path]:
    """A CA, the API server's serving certificate and the service-account key pair."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = kube.issue_cert("wiremesh-lab-cluster-ca", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
    ]
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in ["localhost", *names]]
    sans += [
        x509.IPAddress(ipaddress.ip_address(a)) for a in (apiserver_ip, KUBERNETES_SERVICE_IP, "127.0.0.1")
    ]
    server = kube.issue_cert("kube-apiserver", server_key, (ca, ca_key), ca=False, sans=sans)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths = {n: directory / f for n, f in (("ca", "ca.crt"), ("server_cert", "apiserver.crt"),
             ("server_key", "apiserver.key"), ("sa_key", "sa.key"), ("sa_pub", "sa.pub"))}  # fmt: skip
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server_cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    kube.write_key(paths["server_key"], server_key)
    kube.write_key(paths["sa_key"], sa_key)
    paths["sa_pub"].write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return paths


class KubeCluster(StartedService):
    """A control plane and `nodes` nodes in `lab`, for as long as the context is open."""

    def __init__(self, lab: Lab, nodes: int = 2, *, images: ImageSet | None = None) -> None:
        if not 1 <= nodes <= 9:
            raise ValueError("1 to 9 nodes")
        self.lab = lab
        self.node_count = nodes
        self.images = images
        self.dir = Path(tempfile.mkdtemp(prefix="wm-cluster-"))
        self.ctl: Host | None = None
        self.nodes: list[KubeNode] = []
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.tokens = {role: "wm-" + secrets.token_hex(20) for role in
                       ("admin", "controller-manager", "scheduler", "kube-proxy")}  # fmt: skip
        self.pki: dict[str, Path] = {}

    # ---- context

    @property
    def api_url(self) -> str:
        assert self.ctl is not None
        return f"https://{self.ctl.address}:{API_PORT}"

    @property
    def kubeconfig(self) -> Path:
        """The cluster-admin kubeconfig (usable inside the lab's namespaces)."""
        return self.dir / "admin.kubeconfig"

    # ---- start

    def start(self) -> None:
        started = time.monotonic()
        kube.build()
        coredns = gobuild.coredns()
        helm = gobuild.helm()
        if self.images is None:
            self.images = build_images()
        log.info("cluster: programs and images ready after %.0f s", time.monotonic() - started)
        self.helm_bin = helm
        self.ctl = self.lab.host("k8s-ctl")
        self.nodes = [
            KubeNode(f"node{i}", self.lab.host(f"k8s-node{i}"), f"10.244.{i}.0/24", self.dir / f"node{i}")
            for i in range(1, self.node_count + 1)
        ]
        for node in self.nodes:
            self.lab.run(self.ctl, ["ip", "route", "add", node.pod_cidr, "via", node.address])
        self.pki = _pki(self.dir, self.ctl.address)
        self._write_tokens_and_kubeconfigs()
        self._start_control_plane(coredns)
        archive = self._images_archive()
        for node in self.nodes:
            node.prepare(self.lab, self.nodes, self.ctl.address, self.images.pause)
            node.start_containerd(self.lab)
        for node in self.nodes:
            node.import_images(archive)
            node.start_kubelet(self.lab, self._kubeconfig_for(f"node-{node.name}"), kube.program("kubelet"))
            node.start_kube_proxy(self.lab, self._kubeconfig_for("kube-proxy"), kube.program("kube-proxy"))
        archive.unlink()
        self._wait(self._nodes_registered, "every node registered", "kube-apiserver")
        for node in self.nodes:
            # What a CNI's IPAM controller would do: the node's pod CIDR, matching its bridge.
            patch = {"spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]}}
            self.kubectl("patch", "node", node.name, "--type", "merge", "-p", json.dumps(patch))
        self.wait_for(self._nodes_ready, "every node Ready", START_TIMEOUT)
        log.info(
            "cluster: %d nodes Ready after %.0f s (%s)", len(self.nodes), time.monotonic() - started, self.dir
        )

    def _write_tokens_and_kubeconfigs(self) -> None:
        lines = [
            f'{self.tokens["admin"]},wiremesh-admin,admin,"system:masters"',
            f"{self.tokens['controller-manager']},system:kube-controller-manager,cm",
            f"{self.tokens['scheduler']},system:kube-scheduler,scheduler",
            f"{self.tokens['kube-proxy']},system:kube-proxy,kube-proxy",
        ]
        for node in self.nodes:
            token = "wm-" + secrets.token_hex(20)
            self.tokens[f"node-{node.name}"] = token
            lines.append(f'{token},system:node:{node.name},{node.name},"system:nodes"')
        (self.dir / "tokens.csv").write_text("\n".join(lines) + "\n")
        (self.dir / "tokens.csv").chmod(0o600)
        for role, token in self.tokens.items():
            kube.write_kubeconfig(self._kubeconfig_for(role), self.api_url, self.pki["ca"], token, role)

    def _kubeconfig_for(self, role: str) -> Path:
        return self.kubeconfig if role == "admin" else self.dir / f"{role}.kubeconfig"

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.ctl is not None
        with open(self.dir / f"{name}.log", "ab") as out:
            self.procs[name] = self.lab.popen(self.ctl, argv, stdout=out, stderr=subprocess.STDOUT)

    def _start_control_plane(self, coredns: Path) -> None:
        assert self.ctl is not None
        d = self.dir
        self._spawn(
            "etcd",
            [
                str(kube.program("etcd")), "--name", "lab", "--data-dir", str(d / "etcd"),
                "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
                "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                "--initial-cluster", "lab=http://127.0.0.1:2380", "--unsafe-no-fsync", "--log-level", "warn",
            ],
        )  # fmt: skip
        self._spawn(
            "kube-apiserver",
            [
                str(kube.program("kube-apiserver")),
                "--etcd-servers", "http://127.0.0.1:2379",
                "--bind-address", "0.0.0.0", "--advertise-address", self.ctl.address,
                "--secure-port", str(API_PORT),
                "--tls-cert-file", str(self.pki["server_cert"]), "--tls-private-key-file", str(self.pki["server_key"]),
                "--client-ca-file", str(self.pki["ca"]),
                "--token-auth-file", str(d / "tokens.csv"),
                "--authorization-mode", "Node,RBAC",
                "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file", str(self.pki["sa_pub"]),
                "--service-account-signing-key-file", str(self.pki["sa_key"]),
                "--service-cluster-ip-range", SERVICE_CIDR,
                "--allow-privileged=true",
                # Reach kubelets (logs, exec) by address: nothing here resolves node names.
                "--kubelet-preferred-address-types", "InternalIP",
                "--enable-priority-and-fairness=false", "--profiling=false",
                "--cert-dir", str(d / "apiserver-certs"), "--v", "1",
            ],
        )  # fmt: skip
        self._wait(self._api_ready, "kube-apiserver /readyz", "kube-apiserver")
        self._spawn(
            "kube-controller-manager",
            [
                str(kube.program("kube-controller-manager")),
                "--kubeconfig", str(self._kubeconfig_for("controller-manager")),
                "--authentication-kubeconfig", str(self._kubeconfig_for("controller-manager")),
                "--authorization-kubeconfig", str(self._kubeconfig_for("controller-manager")),
                "--service-account-private-key-file", str(self.pki["sa_key"]),
                "--root-ca-file", str(self.pki["ca"]),
                "--use-service-account-credentials=true",
                "--controllers", "*,-nodeipam,-cloud-node-lifecycle,-route,-service",
                "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "10257", "--v", "1",
            ],
        )  # fmt: skip
        self._spawn(
            "kube-scheduler",
            [
                str(kube.program("kube-scheduler")),
                "--kubeconfig", str(self._kubeconfig_for("scheduler")),
                "--authentication-kubeconfig", str(self._kubeconfig_for("scheduler")),
                "--authorization-kubeconfig", str(self._kubeconfig_for("scheduler")),
                "--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", "10259", "--v", "1",
            ],
        )  # fmt: skip
        corefile = d / "Corefile"
        corefile.write_text(
            f".:53 {{\n  bind {self.ctl.address}\n  errors\n"
            f"  kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
            f"    kubeconfig {self.kubeconfig} wm\n    pods insecure\n    fallthrough in-addr.arpa ip6.arpa\n  }}\n"
            "  cache 5\n}\n"
        )
        self._spawn("coredns", [str(coredns), "-conf", str(corefile)])

    def _images_archive(self) -> Path:
        """The OCI layout as one tar, for `ctr images import`."""
        assert self.images is not None
        archive = self.dir / "images.tar"
        subprocess.run(
            ["tar", "-C", str(self.images.layout), "-cf", str(archive), "."], check=True, timeout=600
        )
        return archive

    # ---- commands

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60) -> str:
        """kubectl as cluster admin, run in the control-plane namespace; its standard output."""
        return self._run(
            [str(kube.program("kubectl")), "--kubeconfig", str(self.kubeconfig), *args], check, input, timeout
        )

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def apply(self, manifest: dict[str, Any] | Sequence[dict[str, Any]]) -> str:
        docs = [manifest] if isinstance(manifest, dict) else list(manifest)
        return self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    def helm(self, *args: str, check: bool = True, timeout: float = 600) -> str:
        return self._run(
            [str(self.helm_bin), "--kubeconfig", str(self.kubeconfig), *args], check, None, timeout
        )

    def _run(self, argv: list[str], check: bool, input: str | None, timeout: float) -> str:
        assert self.ctl is not None
        result = self.lab.run(self.ctl, argv, check=False, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(
                f"{Path(argv[0]).name} {' '.join(argv[3:])[:300]} exited {result.returncode}: {result.stderr.strip()[-3000:]}"
            )
        return result.stdout

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(ClusterError):
                value = check()
                if value:
                    return value
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited {proc.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(0.5)

    def _wait(self, check: Callable[[], Any], what: str, log_name: str) -> None:
        try:
            self.wait_for(check, what, START_TIMEOUT)
        except ClusterError as exc:
            raise ClusterError(f"{exc}\n{log_name} log:\n{self.log_tail(log_name)}") from None

    def log_tail(self, name: str, size: int = 4000) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def _api_ready(self) -> bool:
        return self.kubectl("get", "--raw", "/readyz", check=False).strip() == "ok"

    def _nodes_registered(self) -> bool:
        names = {n["metadata"]["name"] for n in self.kubectl_json("get", "nodes")["items"]}
        return names >= {n.name for n in self.nodes}

    def _nodes_ready(self) -> bool:
        for item in self.kubectl_json("get", "nodes")["items"]:
            ready = [c for c in item["status"].get("conditions", []) if c["type"] == "Ready"]
            if not ready or ready[0]["status"] != "True":
                return False
        return True

    # ---- stop

    def stop(self) -> None:
        for node in reversed(self.nodes):
            try:
                node.stop(self.lab)
            except (NodeError, OSError) as exc:
                log.warning("cluster: stopping %s: %s", node.name, exc)
        for name in ("coredns", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self.procs.pop(name, None)
            if proc is not None:
                self.lab.stop(proc)
        for node in self.nodes:
            with contextlib.suppress(Exception):
                remove_dir(node.dir)
        with contextlib.suppress(Exception):
            remove_dir(self.dir)


def main() -> None:
    """`python -m wiremesh.lab.cluster`: build what is missing, start a two-node cluster, print
    `kubectl get nodes -o wide`, and keep it running until Ctrl-C."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with Lab() as lab, KubeCluster(lab) as cluster:
        print(cluster.kubectl("get", "nodes", "-o", "wide"), flush=True)
        print(
            f"kubectl: ip netns exec {lab.prefix}k8s-ctl {kube.program('kubectl')} --kubeconfig {cluster.kubeconfig}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
