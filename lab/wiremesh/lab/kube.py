"""A real Kubernetes API server on loopback for the operator's tests: etcd + kube-apiserver.

The Kubernetes programs (kube-apiserver, etcd, and for the lab cluster in `wiremesh.lab.cluster`
kubelet, kube-scheduler, kube-controller-manager, kube-proxy and kubectl) are built from their
published Go modules, once per machine, in one `go build`, into a cache directory keyed
by version (``~/.cache/wiremesh/kube/<version>``, or ``$WIREMESH_KUBE_CACHE``). k8s.io/kubernetes
replaces its staging modules (k8s.io/api, k8s.io/apiserver, ...) with paths inside its own
repository, so ``go install k8s.io/kubernetes/cmd/kube-apiserver@vX`` refuses; the usual way
round is a small module that requires k8s.io/kubernetes vX and replaces every staging module with
its published v0.Y twin. etcd's server (its ``main`` package is go.etcd.io/etcd/server/v3) is
built from the same module graph, at the version Kubernetes itself pins. No controller-manager
or scheduler: the operator needs only the API (so no garbage collection of owned objects).

    with KubeAPIServer() as kube:
        kube.kubeconfig      # path to a kubeconfig with a cluster-admin token
        kube.url, kube.token, kube.ca_path

Certificates, the service-account signing key and a static token file are generated in a
temporary directory; both processes listen on loopback ports only and are stopped by PID.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from wiremesh.lab.support import StartedService

log = logging.getLogger("wiremesh.lab.kube")

KUBE_VERSION = "v1.35.4"
# The published staging modules carry the same minor and patch as v0.Y.Z.
STAGING_VERSION = "v0." + KUBE_VERSION.removeprefix("v1.")
# k8s.io/kubernetes' go.mod replaces each of these with ./staging/src/k8s.io/<name>.
STAGING_MODULES = (
    "api", "apiextensions-apiserver", "apimachinery", "apiserver", "cli-runtime", "client-go",
    "cloud-provider", "cluster-bootstrap", "code-generator", "component-base", "component-helpers",
    "controller-manager", "cri-api", "cri-client", "csi-translation-lib",
    "dynamic-resource-allocation", "endpointslice", "externaljwt", "kms", "kube-aggregator",
    "kube-controller-manager", "kube-proxy", "kube-scheduler", "kubectl", "kubelet", "metrics",
    "mount-utils", "pod-security-admission", "sample-apiserver", "sample-cli-plugin",
    "sample-controller",
)  # fmt: skip
# What `kubectl version` and the nodes report (a plain `go build` says v0.0.0-master).
_VERSION_PKG = "k8s.io/component-base/version"
LDFLAGS = (
    f"-s -w -X {_VERSION_PKG}.gitVersion={KUBE_VERSION} -X {_VERSION_PKG}.gitMajor=1 "
    f"-X {_VERSION_PKG}.gitMinor={KUBE_VERSION.split('.')[1]} -X {_VERSION_PKG}.gitTreeState=clean"
)
APISERVER_PKG = "k8s.io/kubernetes/cmd/kube-apiserver"
ETCD_PKG = "go.etcd.io/etcd/server/v3"
# Every program of the lab cluster, built together (they share most of their packages).
PROGRAMS = {
    "kube-apiserver": APISERVER_PKG,
    "etcd": ETCD_PKG,
    "kubelet": "k8s.io/kubernetes/cmd/kubelet",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-proxy": "k8s.io/kubernetes/cmd/kube-proxy",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",
}
BUILD_TIMEOUT = 1800.0  # a first build on 2 cores, module downloads included


class KubeError(RuntimeError):
    """The API server could not be built or started; the message says why (with log tails)."""


def cache_dir() -> Path:
    root = os.environ.get("WIREMESH_KUBE_CACHE") or os.path.expanduser("~/.cache/wiremesh/kube")
    return Path(root) / KUBE_VERSION


def binaries(cache: Path | None = None) -> tuple[Path, Path]:
    """(kube-apiserver, etcd) paths in the cache (they may not exist yet)."""
    return program("kube-apiserver", cache), program("etcd", cache)


def program(name: str, cache: Path | None = None) -> Path:
    """The path of one of PROGRAMS in the cache (it may not exist yet)."""
    if name not in PROGRAMS:
        raise KeyError(f"not a lab Kubernetes program: {name}")
    return (cache or cache_dir()) / "bin" / name


def build_id() -> str:
    """What the cached binaries were built from and with; a different one means rebuild."""
    return f"{KUBE_VERSION} {' '.join(PROGRAMS)} {LDFLAGS}\n"


def is_built(cache: Path | None = None) -> bool:
    cache = cache or cache_dir()
    stamp = cache / "build-id"
    if not stamp.exists() or stamp.read_text() != build_id():
        return False
    return all(program(n, cache).is_file() and os.access(program(n, cache), os.X_OK) for n in PROGRAMS)


def go_binary() -> str:
    found = shutil.which("go") or ("/usr/local/go/bin/go" if os.path.exists("/usr/local/go/bin/go") else None)
    if found is None:
        raise KubeError("the Go toolchain is needed to build kube-apiserver: `go` not found")
    return found


def go_mod_text() -> str:
    replaces = "\n".join(f"\tk8s.io/{m} => k8s.io/{m} {STAGING_VERSION}" for m in STAGING_MODULES)
    return (
        "module wiremesh.lab/kube\n\n"
        "go 1.25.0\n\n"
        f"require k8s.io/kubernetes {KUBE_VERSION}\n\n"
        "tool (\n" + "".join(f"\t{pkg}\n" for pkg in PROGRAMS.values()) + ")\n\n"
        f"replace (\n{replaces}\n)\n"
    )


def build(cache: Path | None = None, timeout: float = BUILD_TIMEOUT) -> tuple[Path, Path]:
    """Build kube-apiserver and etcd into the cache unless already there; returns their paths.

    Concurrent callers (several test processes) wait on a lock file instead of building twice.
    """
    cache = cache or cache_dir()
    if is_built(cache):
        return binaries(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(cache):
            return binaries(cache)
        src = cache / "src"
        src.mkdir(exist_ok=True)
        (src / "go.mod").write_text(go_mod_text())
        env = {
            **os.environ,
            "GOTOOLCHAIN": "local",  # build with the installed Go, never download another one
            "GOFLAGS": "-buildvcs=false -mod=mod",
        }
        go = go_binary()
        started = time.monotonic()
        staging = cache / "bin.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        steps = [
            [go, "mod", "tidy"],
            [go, "build", "-trimpath", f"-ldflags={LDFLAGS}", "-o", str(staging) + "/", *PROGRAMS.values()],
        ]
        for step in steps:
            remaining = timeout - (time.monotonic() - started)
            try:
                result = subprocess.run(
                    step, cwd=src, env=env, capture_output=True, text=True, timeout=max(remaining, 1)
                )
            except subprocess.TimeoutExpired:
                raise KubeError(f"`{' '.join(step[1:3])}` did not finish within {timeout:g} s") from None
            if result.returncode != 0:
                raise KubeError(f"`go {' '.join(step[1:3])}` failed:\n{result.stderr[-4000:]}")
        # go names the etcd server's main package (.../server/v3) `server`; give it its usual name.
        (staging / "server").rename(staging / "etcd")
        bindir = cache / "bin"
        shutil.rmtree(bindir, ignore_errors=True)
        staging.rename(bindir)
        (cache / "build-id").write_text(build_id())
        elapsed = time.monotonic() - started
        (cache / "build-seconds").write_text(f"{elapsed:.0f}\n")
        log.info("kube_built version=%s seconds=%.0f dir=%s", KUBE_VERSION, elapsed, bindir)
    return binaries(cache)


# ---- certificates and keys ----


def write_key(path: Path, key: Any) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def issue_cert(
    subject: str,
    key: Any,
    issuer: tuple[x509.Certificate, Any] | None,
    *,
    ca: bool,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer[0].subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a serving certificate for 127.0.0.1/localhost and a service-account key pair."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = issue_cert("wiremesh-test-ca", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes.default.svc"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    server = issue_cert("kube-apiserver", server_key, (ca, ca_key), ca=False, sans=sans)
    # Service-account tokens are signed with RS256 by default; RSA keeps every client happy.
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    paths = {
        "ca": directory / "ca.crt",
        "server_cert": directory / "apiserver.crt",
        "server_key": directory / "apiserver.key",
        "sa_key": directory / "sa.key",
        "sa_pub": directory / "sa.pub",
    }
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["server_cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    write_key(paths["server_key"], server_key)
    write_key(paths["sa_key"], sa_key)
    paths["sa_pub"].write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return paths


def write_kubeconfig(path: Path, server: str, ca: Path, token: str, user: str) -> None:
    """A kubeconfig (mode 0600) for `user` with a bearer `token` at `server`, trusting `ca`."""
    import yaml

    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "wm", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": "wm", "context": {"cluster": "wm", "user": user}}],
        "current-context": "wm",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the process that started us dies, so a killed
    test run leaves no API server or etcd behind."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class KubeAPIServer(StartedService):
    """etcd + kube-apiserver on loopback, for as long as the context is open."""

    def __init__(self, start_timeout: float = 120.0, build_timeout: float = BUILD_TIMEOUT) -> None:
        self.start_timeout = start_timeout
        self.build_timeout = build_timeout
        self.dir: Path | None = None
        self.port = 0
        self.token = "wm-" + secrets.token_hex(20)
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.pki: dict[str, Path] = {}

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.pki["ca"]

    @property
    def kubeconfig(self) -> Path:
        assert self.dir is not None, "not started"
        return self.dir / "kubeconfig"

    def start(self) -> None:
        apiserver_bin, etcd_bin = build(timeout=self.build_timeout)
        self.dir = Path(tempfile.mkdtemp(prefix="wm-kube-"))
        self.pki = write_pki(self.dir)
        etcd_port, peer_port = _free_port(), _free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        self.etcd = self._spawn(
            "etcd",
            [
                str(etcd_bin),
                "--name", "wm",
                "--data-dir", str(self.dir / "etcd"),
                "--listen-client-urls", etcd_url,
                "--advertise-client-urls", etcd_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"wm={peer_url}",
                "--unsafe-no-fsync",  # a throwaway store: speed over durability
                "--log-level", "warn",
            ],
        )  # fmt: skip
        self._wait(lambda: self._http_ok(f"{etcd_url}/health"), "etcd /health", self.etcd, "etcd")
        (self.dir / "tokens.csv").write_text(f'{self.token},wiremesh-admin,1,"system:masters"\n')
        self.port = _free_port()
        self.apiserver = self._spawn(
            "kube-apiserver",
            [
                str(apiserver_bin),
                "--etcd-servers", etcd_url,
                "--bind-address", "127.0.0.1",
                "--advertise-address", "127.0.0.1",
                "--secure-port", str(self.port),
                "--tls-cert-file", str(self.pki["server_cert"]),
                "--tls-private-key-file", str(self.pki["server_key"]),
                "--token-auth-file", str(self.dir / "tokens.csv"),
                "--authorization-mode", "RBAC",
                "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file", str(self.pki["sa_pub"]),
                "--service-account-signing-key-file", str(self.pki["sa_key"]),
                "--service-cluster-ip-range", "10.96.0.0/16",
                # No controller-manager: nothing would maintain the kubernetes Service endpoints.
                "--endpoint-reconciler-type", "none",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--cert-dir", str(self.dir / "certs"),
                "--v", "1",
            ],
        )  # fmt: skip
        self._wait(self._ready, "kube-apiserver /readyz", self.apiserver, "kube-apiserver")
        write_kubeconfig(self.kubeconfig, self.url, self.ca_path, self.token, "wm-admin")
        log.info("kube_ready url=%s dir=%s", self.url, self.dir)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        assert self.dir is not None
        with open(self.dir / f"{name}.log", "ab") as out:
            return subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )

    def log_tail(self, name: str, size: int = 3000) -> str:
        if self.dir is None or not (self.dir / f"{name}.log").exists():
            return ""
        return (self.dir / f"{name}.log").read_text(errors="replace")[-size:]

    def _wait(self, check: Any, what: str, proc: subprocess.Popen[bytes], name: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while not check():
            if proc.poll() is not None:
                raise KubeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise KubeError(
                    f"timed out after {self.start_timeout:g} s waiting for {what}:\n{self.log_tail(name)}"
                )
            time.sleep(0.1)

    @staticmethod
    def _http_ok(
        url: str, context: ssl.SSLContext | None = None, headers: dict[str, str] | None = None
    ) -> bool:
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2, context=context) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def _ready(self) -> bool:
        return self._http_ok(
            f"{self.url}/readyz", self.ssl_context(), {"Authorization": f"Bearer {self.token}"}
        )

    def stop(self) -> None:
        _stop(self.apiserver)
        self.apiserver = None
        _stop(self.etcd)
        self.etcd = None
        if self.dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.dir)
            self.dir = None


def main() -> None:
    """`python -m wiremesh.lab.kube`: build (timed) and start once, print the kubeconfig path."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def stop(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through the context manager, which stops both servers

    # SIGTERM too (and SIGINT even when started in the background, where it is ignored).
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    started = time.monotonic()
    build()
    log.info("build ready after %.0f s (cache %s)", time.monotonic() - started, cache_dir())
    with KubeAPIServer() as kube:
        log.info("API server %s ready; KUBECONFIG=%s; Ctrl-C stops it", kube.url, kube.kubeconfig)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()


if __name__ == "__main__":
    main()
