"""A real kube-apiserver (built once per machine, see wiremesh.lab.kube), the wiremesh CRDs
applied to it, and the operator run as its console entry point against it and a real control
plane (NATS + keys + coord from tests/fixtures_services.py)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from operator_kit import Kube, OperatorProcess, run_operator

from wiremesh.lab import kube
from wiremesh.lab.support import wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRDS = sorted((ROOT / "charts/wiremesh/crds").glob("*.yaml"))


# Per module: the API server does not idle on through the rest of the suite.
@pytest.fixture(scope="module")
def kube_apiserver() -> Iterator[kube.KubeAPIServer]:
    with kube.KubeAPIServer() as server:
        yield server


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


@pytest.fixture(scope="module")
def operator(
    k8s: Kube, control_plane: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    with run_operator(k8s, control_plane, tmp_path_factory.mktemp("operator")) as handle:
        yield handle
