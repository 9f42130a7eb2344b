"""One node of the lab cluster: containerd, kubelet and kube-proxy in a network namespace of their own.

Every node is a lab host on the lab's "internet" (like a cloud VM with a public address) with its
own pod CIDR, CNI bridge (``cni0``) and routes to the other nodes' pod CIDRs, which this module
installs the way a host-gateway CNI (flannel host-gw) would: those are "the CNI's routes" that
wiremesh must leave alone.

containerd and the kubelet join only the node's network namespace and stay in the machine's
mount namespace (``Lab.popen(host_mounts=True)``): the kubelet mounts secrets and volumes that runc
must see. Everything else of a node (containerd's root and state, the kubelet's root, pod logs,
pod network namespaces, runc's state) lives in one directory of its own. Two settings were needed
on this machine (``../shared/LAB.md``): ``failCgroupV1: false`` (the VM mounts cgroup v1) and
``restrict_oom_score_adj = true`` (the VM forbids lowering oom_score_adj).

Stopping a node stops the kubelet, kills every container of its containerd (containers outlive
containerd otherwise), stops containerd and kube-proxy, and unmounts what they left under the
node's directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from wiremesh.lab.lab import Host, Lab, LabError

log = logging.getLogger("wiremesh.lab.kubenode")

CNI_BIN_DIR = "/usr/lib/cni"
CLUSTER_CIDR = "10.244.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
START_TIMEOUT = 120.0


class NodeError(RuntimeError):
    """A node's runtime or kubelet failed; the message carries the tail of its log."""


@dataclasses.dataclass
class KubeNode:
    """One node: its lab host, pod CIDR, directory and processes."""

    name: str
    host: Host
    pod_cidr: str
    dir: Path
    procs: dict[str, subprocess.Popen[Any]] = dataclasses.field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.host.address

    @property
    def socket(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def bridge_address(self) -> str:
        """The CNI bridge's address: the pods' gateway (first host of the pod CIDR)."""
        network, _ = self.pod_cidr.split("/")
        return network.rsplit(".", 1)[0] + ".1"

    def log_tail(self, name: str, size: int = 4000) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    # ---- configuration files (pure: paths and values in, text out)

    def containerd_config(self, sandbox_image: str) -> str:
        d = self.dir
        return f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{d}/containerd.ttrpc.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      Root = "{d}/runc"
      SystemdCgroup = false
"""

    def cni_config(self) -> str:
        return json.dumps(
            {
                "cniVersion": "1.0.0",
                "name": "wmlab",
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": "cni0",
                        "isGateway": True,
                        "ipMasq": False,  # pods keep their addresses across the cluster
                        "hairpinMode": True,
                        "ipam": {
                            "type": "host-local",
                            "dataDir": str(self.dir / "cni-ipam"),
                            "ranges": [[{"subnet": self.pod_cidr}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                        },
                    }
                ],
            },
            indent=2,
        )

    def kubelet_config(self, cluster_dns: str) -> str:
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,
            "cgroupDriver": "cgroupfs",
            "cgroupsPerQOS": False,
            "enforceNodeAllocatable": [],
            "failSwapOn": False,
            "address": self.address,
            "healthzBindAddress": "127.0.0.1",
            "readOnlyPort": 0,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [cluster_dns],
            "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(self.dir / "resolv.conf"),
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "podCIDR": self.pod_cidr,
            "podLogsDir": str(self.dir / "pod-logs"),
            # Images are imported, never pulled: never collect them, never evict for disk.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%"},
            "serializeImagePulls": False,
            "maxPods": 60,
            "syncFrequency": "10s",
            "nodeStatusUpdateFrequency": "5s",
        }
        return yaml.safe_dump(config)

    def kube_proxy_config(self, kubeconfig: Path) -> str:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "mode": "nftables",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "hostnameOverride": self.name,
            "clusterCIDR": CLUSTER_CIDR,
            "metricsBindAddress": "127.0.0.1:10249",
            "healthzBindAddress": "127.0.0.1:10256",
            "conntrack": {"maxPerCore": 0},  # leave the machine-wide conntrack table size alone
        }
        return yaml.safe_dump(config)

    # ---- lifecycle

    def prepare(self, lab: Lab, peers: list[KubeNode], cluster_dns: str, sandbox_image: str) -> None:
        """Network settings and configuration files; nothing is started."""
        for sub in ("cni", "cni-ipam", "pod-logs", "kubelet", "runc"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        lab.sysctl(
            self.host,
            {
                "net.ipv4.ip_forward": 1,
                "net.ipv6.conf.all.forwarding": 1,
                # Pod -> Service -> pod on the same bridge must pass kube-proxy's DNAT both ways.
                "net.bridge.bridge-nf-call-iptables": 1,
                "net.bridge.bridge-nf-call-ip6tables": 1,
            },
        )
        for peer in peers:
            if peer is not self:
                lab.run(self.host, ["ip", "route", "add", peer.pod_cidr, "via", peer.address])
        (self.dir / "cni" / "10-wmlab.conflist").write_text(self.cni_config())
        (self.dir / "containerd.toml").write_text(self.containerd_config(sandbox_image))
        (self.dir / "kubelet.yaml").write_text(self.kubelet_config(cluster_dns))
        (self.dir / "resolv.conf").write_text(f"nameserver {cluster_dns}\n")

    def spawn(self, lab: Lab, name: str, argv: list[str], *, host_mounts: bool = True) -> None:
        with open(self.dir / f"{name}.log", "ab") as out:
            self.procs[name] = lab.popen(
                self.host, argv, host_mounts=host_mounts, stdout=out, stderr=subprocess.STDOUT
            )

    def start_containerd(self, lab: Lab) -> None:
        self.spawn(lab, "containerd", ["containerd", "--config", str(self.dir / "containerd.toml")])
        self.wait(lambda: self.ctr("version", check=False).returncode == 0, "containerd", "containerd")

    def import_images(self, archive: Path) -> None:
        result = self.ctr("images", "import", str(archive), check=False, timeout=900)
        if result.returncode != 0:
            raise NodeError(f"{self.name}: importing images failed: {result.stderr[-2000:]}")

    def start_kubelet(self, lab: Lab, kubeconfig: Path, kubelet_bin: Path) -> None:
        self.spawn(
            lab,
            "kubelet",
            [
                str(kubelet_bin),
                "--config", str(self.dir / "kubelet.yaml"),
                "--kubeconfig", str(kubeconfig),
                "--root-dir", str(self.dir / "kubelet"),
                "--cert-dir", str(self.dir / "kubelet-pki"),
                "--hostname-override", self.name,
                "--node-ip", self.address,
                "--v", "1",
            ],
        )  # fmt: skip

    def start_kube_proxy(self, lab: Lab, kubeconfig: Path, proxy_bin: Path) -> None:
        (self.dir / "kube-proxy.yaml").write_text(self.kube_proxy_config(kubeconfig))
        self.spawn(lab, "kube-proxy", [str(proxy_bin), "--config", str(self.dir / "kube-proxy.yaml")])

    def ctr(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise NodeError(f"ctr {' '.join(args)} on {self.name}: {result.stderr.strip()[-1000:]}")
        return result

    def wait(self, check: Any, what: str, proc_name: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            proc = self.procs.get(proc_name)
            if proc is not None and proc.poll() is not None:
                raise NodeError(
                    f"{self.name}: {proc_name} exited {proc.returncode}:\n{self.log_tail(proc_name)}"
                )
            if time.monotonic() > deadline:
                raise NodeError(f"{self.name}: no {what} after {timeout:g} s:\n{self.log_tail(proc_name)}")
            time.sleep(0.2)

    def stop(self, lab: Lab) -> None:
        """Kubelet first (it would restart containers), then every container of this node and its
        shim, then containerd and kube-proxy; then unmount what they left under the directory."""
        started = time.monotonic()
        self._stop_process(lab, "kubelet")
        self._kill_containers()
        for name in ("containerd", "kube-proxy"):
            self._stop_process(lab, name)
        self._unmount_leftovers()
        log.info("kubenode: %s stopped in %.1f s", self.name, time.monotonic() - started)

    def _stop_process(self, lab: Lab, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            lab.stop(proc)

    def _shims(self) -> list[tuple[int, str]]:
        """(pid, container id) of the runc shims this node's containerd started: their command
        line names its socket (a path only this node uses)."""
        marker = str(self.socket).encode()
        found = []
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                argv = (pid_dir / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"containerd-shim-runc-v2") and marker in argv and b"-id" in argv:
                found.append((int(pid_dir.name), argv[argv.index(b"-id") + 1].decode()))
        return found

    def _kill_containers(self) -> None:
        """Every process in the cgroup of each of this node's containers (runc puts container ID
        under /k8s.io/ in each hierarchy), then the shims; then the emptied cgroups go too.
        Containers outlive containerd, and killing a shim does not kill what it started."""
        ids: set[str] = set()
        with contextlib.suppress(NodeError, OSError, subprocess.TimeoutExpired):
            ids.update(self.ctr("tasks", "ls", "-q", check=False, timeout=10).stdout.split())
        shims = self._shims()
        ids.update(cid for _, cid in shims)
        for cid in ids:
            _kill_cgroup(f"k8s.io/{cid}")
        for pid, _ in shims:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._shims():
            time.sleep(0.1)
        for cid in ids:
            _remove_cgroup(f"k8s.io/{cid}")

    def _unmount_leftovers(self) -> None:
        prefix = str(self.dir) + "/"
        for _ in range(3):
            with open("/proc/self/mounts") as f:
                points = [line.split()[1] for line in f if line.split()[1].startswith(prefix)]
            if not points:
                return
            for point in sorted(points, key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)
        log.warning("kubenode: mounts left under %s", self.dir)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_dirs(relative: str) -> list[Path]:
    """The directory of cgroup `relative` in every mounted hierarchy (v1) or the unified one."""
    unified = CGROUP_ROOT / relative
    if (CGROUP_ROOT / "cgroup.controllers").exists():
        return [unified]
    return [h / relative for h in CGROUP_ROOT.iterdir() if (h / relative).is_dir()]


def _kill_cgroup(relative: str) -> None:
    for _ in range(20):
        pids: set[int] = set()
        for directory in _cgroup_dirs(relative):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    log.warning("kubenode: processes left in cgroup %s", relative)


def _remove_cgroup(relative: str) -> None:
    for directory in _cgroup_dirs(relative):
        with contextlib.suppress(OSError):
            directory.rmdir()


def remove_dir(path: Path) -> None:
    """Remove a node's directory once nothing is mounted below it."""
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as f:
        if any(line.split()[1].startswith(prefix) for line in f):
            raise LabError(f"not removing {path}: something is still mounted below it")
    shutil.rmtree(path, ignore_errors=True)
