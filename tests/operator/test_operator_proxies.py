"""Services on the mesh, reconciled by the operator against a real kube-apiserver and a real control
plane: an annotated Service gets a proxy (MeshNode, Deployment, and for egress a Service it points
at), the Service gets the proxy's mesh name and address, and the proxy goes with the annotation.
Traffic through real proxy pods is tested in the lab cluster (tests/k8s/test_k8s_services.py)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from operator_kit import Kube, OperatorProcess, eventually, login, run_operator, secret_data

from wiremesh.lab import kube

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300 if kube.is_built() else kube.BUILD_TIMEOUT + 300),
]

IMAGE = "wiremesh/agent:under-test"


@pytest.fixture(scope="module")
def operator(
    k8s: Kube, control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    extra = ("--proxy-image", IMAGE, "--proxy-tags", "tag:k8s-proxy", "--dns-domain", "mesh.test")
    # This API server allows no privileged pods: the proxies ask for ip_forward as a pod sysctl.
    extra += ("--service-routes", "10.96.0.0/16", "--proxy-forwarding", "sysctls")
    with run_operator(k8s, control_plane, tmp_path_factory.mktemp("operator"), *extra) as op:
        yield op


@pytest.fixture
def namespace(k8s: Kube) -> Iterator[str]:
    name = "apps-" + secrets.token_hex(3)
    k8s.core.create_namespace({"metadata": {"name": name}})
    yield name
    k8s.core.delete_namespace(name)


def service(k8s: Kube, namespace: str, name: str, annotations: dict[str, str], **spec: Any) -> Any:
    body = {
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {"ports": [{"port": 80, "protocol": "TCP"}], **spec},
    }
    return k8s.core.create_namespaced_service(namespace, body)


def deployment(k8s: Kube, operator: OperatorProcess, name: str) -> Any:
    import kubernetes

    apps = kubernetes.client.AppsV1Api(k8s.client)
    try:
        return apps.read_namespaced_deployment(name, operator.namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def test_an_exposed_service_gets_a_proxy_with_a_mesh_name_and_address(
    k8s, operator, control_plane, namespace
):
    svc = service(k8s, namespace, "web", {"wiremesh.dev/expose": "true"}, selector={"app": "web"})
    name = f"wm-{namespace}-web"
    meshnode = eventually(lambda: k8s.get("meshnodes", name), "the proxy's MeshNode", operator)
    assert (meshnode["spec"]["hostname"], meshnode["spec"]["tags"]) == (f"{namespace}-web", ["tag:k8s-proxy"])
    proxy = eventually(lambda: deployment(k8s, operator, name), "the proxy Deployment", operator)
    container = proxy.spec.template.spec.containers[0]
    assert container.image == IMAGE
    assert container.args[-2:] == ["--ingress-to", svc.spec.cluster_ip]
    assert container.env[0].value_from.secret_key_ref.name == f"meshnode-{name}-authkey"
    assert [(s.name, s.value) for s in proxy.spec.template.spec.security_context.sysctls] == [
        ("net.ipv4.ip_forward", "1")
    ]
    # The proxy pod joins with its MeshNode's key (here a client stands in for it).
    key = eventually(
        lambda: (secret_data(k8s, operator.namespace, f"meshnode-{name}-authkey") or {}).get("authkey"),
        "the proxy's key",
        operator,
    )
    joined = login(control_plane.url, f"{namespace}-web", key)

    def annotated() -> dict[str, str] | None:
        notes = k8s.core.read_namespaced_service("web", namespace).metadata.annotations or {}
        return notes if "wiremesh.dev/mesh-ipv4" in notes else None

    notes = eventually(annotated, "the Service's mesh address", operator)
    assert notes["wiremesh.dev/mesh-ipv4"] == joined.addresses[0].split("/")[0]
    assert notes["wiremesh.dev/mesh-name"] == f"{joined.name}.mesh.test"


def test_an_egress_service_points_at_a_proxy_for_the_mesh_device(k8s, operator, namespace):
    annotations = {"wiremesh.dev/tailnet-fqdn": "laptop.mesh.test"}
    service(k8s, namespace, "laptop", annotations, type="ExternalName", externalName="placeholder.invalid")
    name = f"wm-{namespace}-laptop"
    proxy = eventually(lambda: deployment(k8s, operator, name), "the egress proxy Deployment", operator)
    assert proxy.spec.template.spec.containers[0].args[-2:] == ["--egress-to", "laptop.mesh.test"]
    front = eventually(
        lambda: _service_or_none(k8s, operator.namespace, name), "the proxy's own Service", operator
    )
    assert [(p.protocol, p.port, p.target_port) for p in front.spec.ports] == [("TCP", 80, 80)]
    assert front.spec.selector == {"wiremesh.dev/proxy": name}
    target = f"{name}.{operator.namespace}.svc.cluster.local"
    eventually(
        lambda: k8s.core.read_namespaced_service("laptop", namespace).spec.external_name == target,
        "the ExternalName pointed at the proxy",
        operator,
    )


def test_removing_the_annotation_removes_the_proxy(k8s, operator, namespace):
    service(k8s, namespace, "gone", {"wiremesh.dev/expose": "true"}, selector={"app": "gone"})
    name = f"wm-{namespace}-gone"
    eventually(lambda: deployment(k8s, operator, name), "the proxy", operator)
    k8s.core.patch_namespaced_service(
        "gone", namespace, {"metadata": {"annotations": {"wiremesh.dev/expose": None}}}
    )
    eventually(lambda: deployment(k8s, operator, name) is None, "the proxy Deployment gone", operator)
    eventually(lambda: k8s.get("meshnodes", name) is None, "the proxy's MeshNode gone", operator)


def test_deleting_the_service_removes_its_proxy(k8s, operator, namespace):
    service(k8s, namespace, "brief", {"wiremesh.dev/expose": "true"}, selector={"app": "brief"})
    name = f"wm-{namespace}-brief"
    eventually(lambda: deployment(k8s, operator, name), "the proxy", operator)
    k8s.core.delete_namespaced_service("brief", namespace)
    eventually(lambda: deployment(k8s, operator, name) is None, "the proxy Deployment gone", operator)


def test_an_egress_service_that_is_not_external_name_gets_a_warning_and_no_proxy(k8s, operator, namespace):
    service(k8s, namespace, "wrong", {"wiremesh.dev/tailnet-ip": "100.64.0.9"}, selector={"app": "x"})
    events = eventually(
        lambda: [e for e in k8s.events_for("wrong") if e.reason == "ProxyInvalid"],
        "a ProxyInvalid event",
        operator,
    )
    assert "ExternalName" in events[0].message
    assert deployment(k8s, operator, f"wm-{namespace}-wrong") is None


def test_mirrored_nodes_also_offer_the_service_cidr(k8s, operator):
    name = "svcnode-" + secrets.token_hex(3)
    k8s.core.create_node({"metadata": {"name": name}, "spec": {"podCIDR": "10.244.9.0/24"}})
    try:
        mirrored = eventually(lambda: k8s.get("meshnodes", name), "mirrored MeshNode", operator)
        assert mirrored["spec"]["advertiseRoutes"] == ["10.244.9.0/24", "10.96.0.0/16"]
        assert mirrored["spec"]["approvedRoutes"] == ["10.244.9.0/24", "10.96.0.0/16"]
    finally:
        k8s.core.delete_node(name)


def _service_or_none(k8s: Kube, namespace: str, name: str) -> Any:
    try:
        return k8s.core.read_namespaced_service(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
