"""What the operator tests share (a module with a unique name, so that importing it never
depends on which conftest.py pytest loaded last): the Kubernetes client bound to the test API
server, the operator run as a process, and small waits and look-ups."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pathlib
import secrets
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

from wiremesh.agent.control import ControlClient
from wiremesh.core import crypto
from wiremesh.lab import kube
from wiremesh.lab.support import wait_until

DEADLINE = 30.0  # the operator polls coord every second; this is for a loaded 2-core machine


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


@contextlib.contextmanager
def run_operator(
    k8s: Kube, control_plane: Any, workdir: pathlib.Path, *extra: str
) -> Iterator[OperatorProcess]:
    """wiremesh-operator as a process against the test API server and control plane."""
    namespace = "wm-op-" + secrets.token_hex(3)
    k8s.core.create_namespace({"metadata": {"name": namespace}})
    node_keys = namespace + "-node-keys"
    k8s.core.create_namespace({"metadata": {"name": node_keys}})
    log = workdir / "operator.log"
    # The operator runs with the narrowest admin key that serves it, as the chart gives it.
    scoped = control_plane.admin(
        "POST", "/adminkeys", {"scopes": ["nodes", "authkeys", "policy"], "description": "operator"}
    )
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
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={
                **os.environ,
                "KUBECONFIG": str(k8s.server.kubeconfig),
                "WIREMESH_ADMIN_KEY": scoped["key"],
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


def eventually(predicate: Any, what: str, operator: Any, timeout: float = DEADLINE) -> Any:
    try:
        return wait_until(predicate, timeout, what=what, interval=0.2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- operator log\n{operator.logs()}") from None


def coord_node(control_plane: Any, node_id: int) -> dict[str, Any] | None:
    try:
        node: dict[str, Any] = control_plane.admin("GET", f"/nodes/{node_id}")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise
    return node


def new_key() -> str:
    return crypto.encode_key(crypto.public_key(crypto.generate_private_key()))


def login(url: str, hostname: str, auth_key: str, routes: tuple[str, ...] = ()) -> Any:
    async def go() -> Any:
        client = ControlClient(url, crypto.generate_private_key(), timeout=10)
        try:
            return await client.login(
                new_key(), new_key(), hostname, auth_key=auth_key, advertised_routes=routes
            )
        finally:
            await client.aclose()

    return asyncio.run(go())


def secret_data(k8s, namespace: str, name: str) -> dict[str, str] | None:
    try:
        secret = k8s.core.read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}
