"""A real kube-apiserver (built once per machine, see wiremesh.lab.kube), the wiremesh CRDs
applied to it, and the operator run as its console entry point against it and a real control
plane (NATS + keys + coord from tests/fixtures_services.py)."""

from __future__ import annotations

import os
import pathlib
import secrets
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from wiremesh.lab import kube
from wiremesh.lab.support import wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "charts/wiremesh/crds").glob("*.yaml"))


# Per module: the API server does not idle on through the rest of the suite.
@pytest.fixture(scope="module")
def kube_apiserver() -> Iterator[kube.KubeAPIServer]:
    with kube.KubeAPIServer() as server:
        yield server


class Kube:
    """The official client's APIs, bound to the test API server."""

    def __init__(self, server: kube.KubeAPIServer) -> None:
        import kubernetes

        self.server = server
        self.client = kubernetes.config.new_client_from_config(config_file=str(server.kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self.ext = kubernetes.client.ApiextensionsV1Api(self.client)

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj: dict[str, Any] = self.custom.get_cluster_custom_object(
                "wiremesh.dev", "v1alpha1", plural, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return obj

    def create(self, plural: str, kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": "wiremesh.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}
        obj: dict[str, Any] = self.custom.create_cluster_custom_object(
            "wiremesh.dev", "v1alpha1", plural, body
        )
        return obj

    def patch_spec(self, plural: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.patch_cluster_custom_object(
            "wiremesh.dev", "v1alpha1", plural, name, {"spec": spec}
        )
        return obj

    def delete(self, plural: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.custom.delete_cluster_custom_object("wiremesh.dev", "v1alpha1", plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise

    def events_for(self, name: str) -> list[Any]:
        events = self.core.list_event_for_all_namespaces(field_selector=f"involvedObject.name={name}")
        return list(events.items)


@pytest.fixture(scope="module")
def k8s(kube_apiserver: kube.KubeAPIServer) -> Kube:
    api = Kube(kube_apiserver)
    for path in CRDS:
        api.ext.create_custom_resource_definition(yaml.safe_load(path.read_text()))

    def established() -> bool:
        for path in CRDS:
            name = yaml.safe_load(path.read_text())["metadata"]["name"]
            crd = api.ext.read_custom_resource_definition(name)
            conditions = {c.type: c.status for c in (crd.status.conditions or [])}
            if conditions.get("Established") != "True":
                return False
        return True

    wait_until(established, 30, what="CRDs established", interval=0.1)
    return api


class OperatorProcess:
    def __init__(
        self, proc: subprocess.Popen[bytes], log: pathlib.Path, namespace: str, node_keys_namespace: str
    ) -> None:
        self.proc = proc
        self.log = log
        self.namespace = namespace
        self.node_keys_namespace = node_keys_namespace  # Secrets of mirrored cluster Nodes

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture(scope="module")
def operator(
    k8s: Kube, control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    namespace = "wm-op-" + secrets.token_hex(3)
    k8s.core.create_namespace({"metadata": {"name": namespace}})
    node_keys = namespace + "-node-keys"
    k8s.core.create_namespace({"metadata": {"name": node_keys}})
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "wiremesh.operator.main",
                "--coord-url", control_plane.url,
                "--namespace", namespace,
                "--node-keys-namespace", node_keys,
                "--poll-interval", "1",
                "--health-listen", "",
                "--log-level", "debug",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={
                **os.environ,
                "KUBECONFIG": str(k8s.server.kubeconfig),
                "WIREMESH_ADMIN_KEY": control_plane.admin_key,
            },
        )  # fmt: skip
    handle = OperatorProcess(proc, log, namespace, node_keys)
    try:
        yield handle
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
