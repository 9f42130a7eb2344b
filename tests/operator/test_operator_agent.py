"""A real agent joins with the key the operator put in a MeshNode's Secret: wiremeshd in a
network namespace, the control plane in another (tests/mesh/mesh_kit.py), the operator and the
kube-apiserver on this host's loopback, reaching coord through a forwarder whose far end is a
socket opened inside the control namespace (the root namespace gets no lab address)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "mesh"))
from mesh_kit import COORD_PORT, MeshLab, mesh_lab

from wiremesh.lab import kube
from wiremesh.lab.support import wait_until

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(300 if kube.is_built() else kube.BUILD_TIMEOUT + 300),
]


class Forwarder:
    """127.0.0.1:port here -> coord inside the lab's control namespace."""

    def __init__(self, mesh: MeshLab) -> None:
        self.mesh = mesh
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = self.mesh.lab.socket(self.mesh.ctl, socket.AF_INET, socket.SOCK_STREAM)
                upstream.connect((self.mesh.ctl.address, COORD_PORT))
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@pytest.fixture
def mesh() -> Iterator[MeshLab]:
    with mesh_lab() as lab:
        yield lab


@pytest.fixture
def lab_operator(k8s, mesh: MeshLab, tmp_path: pathlib.Path) -> Iterator[Any]:
    forwarder = Forwarder(mesh)
    namespace = "wm-opa-" + secrets.token_hex(3)
    k8s.core.create_namespace({"metadata": {"name": namespace}})
    log = tmp_path / "operator.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "wiremesh.operator.main",
                "--coord-url", f"http://127.0.0.1:{forwarder.port}",
                "--login-server", mesh.login_server,
                "--namespace", namespace,
                "--poll-interval", "1",
                "--health-listen", "",
                "--no-mirror-nodes",
            ],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "KUBECONFIG": str(k8s.server.kubeconfig), "WIREMESH_ADMIN_KEY": mesh.admin_key},
        )  # fmt: skip
    try:
        yield namespace, log
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        forwarder.close()


def test_agent_joining_with_the_meshnode_secret_shows_online_with_its_address(k8s, mesh, lab_operator):
    import base64

    namespace, log = lab_operator
    name = "op" + secrets.token_hex(3)
    k8s.create("meshnodes", "MeshNode", name, {"user": "alice"})

    def secret() -> dict[str, str] | None:
        try:
            found = k8s.core.read_namespaced_secret(f"meshnode-{name}-authkey", namespace)
        except Exception:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (found.data or {}).items()}

    def eventually(predicate: Any, what: str) -> Any:
        try:
            return wait_until(predicate, 45, what=what, interval=0.2)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n--- operator\n{log.read_text()[-5000:]}\n{mesh.logs()}") from None

    data = eventually(secret, "the MeshNode's Secret")
    assert data["login-server"] == mesh.login_server
    host = mesh.lab.host(name)
    agent = mesh.agent(name, host, data["authkey"])  # wiremeshd --login-server ... --auth-key ...

    def online() -> Any:
        status = (k8s.get("meshnodes", name) or {}).get("status", {})
        return status.get("online") is True and status

    status = eventually(online, "MeshNode online")
    assert status["addresses"]["ipv4"] == agent.address(4)
    assert status["hostname"] == name
    k8s.delete("meshnodes", name)
    eventually(lambda: k8s.get("meshnodes", name) is None, "MeshNode deleted")
