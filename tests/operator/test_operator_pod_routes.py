"""Mirrored cluster Nodes with pod-CIDR approval left to an admin (`--no-approve-pod-routes`,
the chart's operator.approvePodRoutes=false), against a real kube-apiserver and control plane."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
from operator_kit import Kube, OperatorProcess, coord_node, eventually, login, run_operator, secret_data

from wiremesh.lab import kube

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300 if kube.is_built() else kube.BUILD_TIMEOUT + 300),
]


@pytest.fixture(scope="module")
def operator(
    k8s: Kube, control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with run_operator(
        k8s, control_plane, tmp_path_factory.mktemp("operator"), "--no-approve-pod-routes"
    ) as op:
        yield op


def test_a_mirrored_pod_cidr_waits_for_an_admin_and_the_approval_given_stays(
    k8s, operator, control_plane, tmp_path
):
    name, cidr = "worker-" + secrets.token_hex(3), "10.244.5.0/24"
    k8s.core.create_node({"metadata": {"name": name}, "spec": {"podCIDR": cidr}})
    try:
        mirrored = eventually(lambda: k8s.get("meshnodes", name), "mirrored MeshNode", operator)
        assert mirrored["spec"]["advertiseRoutes"] == [cidr] and "approvedRoutes" not in mirrored["spec"]
        data = eventually(
            lambda: secret_data(k8s, operator.node_keys_namespace, f"meshnode-{name}-authkey"),
            "key",
            operator,
        )
        result = login(control_plane.url, data["hostname"], data["authkey"], (cidr,))
        node = eventually(
            lambda: (
                (k8s.get("meshnodes", name) or {}).get("status", {}).get("nodeId") == result.node_id
                and coord_node(control_plane, result.node_id)
            ),
            "MeshNode bound to the node",
            operator,
        )
        assert node["advertised_routes"] == [cidr] and node["approved_routes"] == []

        k8s.patch_spec("meshnodes", name, {"approvedRoutes": [cidr]})  # the admin approves
        eventually(
            lambda: (coord_node(control_plane, result.node_id) or {}).get("approved_routes") == [cidr],
            "the admin's approval in coord",
            operator,
        )
        # A restarted operator mirrors the Node afresh; it must leave the admin's approval be.
        operator.proc.terminate()
        operator.proc.wait(20)
        with run_operator(k8s, control_plane, tmp_path, "--no-approve-pod-routes") as again:
            polled = "Timer 'make_registry.<locals>.meshnode_poll' succeeded"
            eventually(lambda: f"node_mirrored node={name}" in again.log.read_text(), "mirrored again", again)
            eventually(lambda: again.log.read_text().count(polled) >= 2, "two polls", again)
            assert k8s.get("meshnodes", name)["spec"]["approvedRoutes"] == [cidr]
            assert coord_node(control_plane, result.node_id)["approved_routes"] == [cidr]
    finally:
        k8s.core.delete_node(name)
