"""`helm install` of charts/wiremesh into a real kube-apiserver (etcd + kube-apiserver on loopback,
built from their Go modules by wiremesh.lab.kube): the API server validates every object the
chart renders, installs the CRDs, and evaluates the operator's RBAC with SubjectAccessReviews.
No controllers or nodes run, so no pod starts: this is about the objects, not the workloads."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from wiremesh.lab.gobuild import helm as helm_binary
from wiremesh.lab.kube import KubeAPIServer

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wiremesh"
NAMESPACE = "mesh"
OPERATOR_SA = f"system:serviceaccount:{NAMESPACE}:wm-wiremesh-operator"
AGENT_SA = f"system:serviceaccount:{NAMESPACE}:wm-wiremesh-agent"
NODE_KEYS = f"{NAMESPACE}-node-keys"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


@dataclass
class Cluster:
    kube: KubeAPIServer
    helm: Path
    installed: subprocess.CompletedProcess[str]

    def run_helm(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.helm), "--kubeconfig", str(self.kube.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.kube.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.kube.token}", "Content-Type": "application/json"},
        )
        context = ssl.create_default_context(cafile=str(self.kube.ca_path))
        with urllib.request.urlopen(request, timeout=20, context=context) as response:
            return json.loads(response.read())

    def can(
        self,
        verb: str,
        group: str,
        resource: str,
        namespace: str = "",
        subresource: str = "",
        user: str = OPERATOR_SA,
    ) -> bool:
        review = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user,
                "groups": ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}"],
                "resourceAttributes": {
                    "verb": verb,
                    "group": group,
                    "resource": resource,
                    "subresource": subresource,
                    "namespace": namespace,
                },
            },
        }
        answer = self.api("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
        return bool(answer["status"].get("allowed"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    helm = helm_binary()
    with KubeAPIServer() as kube:
        argv = [str(helm), "--kubeconfig", str(kube.kubeconfig), "install", "wm", str(CHART)]
        argv += ["--namespace", NAMESPACE, "--create-namespace"]
        installed = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        yield Cluster(kube, helm, installed)


def test_install_is_accepted_by_the_api_server(cluster):
    assert cluster.installed.returncode == 0, cluster.installed.stderr


def test_install_uses_no_field_the_api_server_does_not_know(cluster):
    # kube-apiserver warns (rather than fails) on unknown fields; helm prints the warnings.
    assert "unknown field" not in cluster.installed.stderr, cluster.installed.stderr


def test_every_workload_is_stored(cluster):
    base = f"/apis/apps/v1/namespaces/{NAMESPACE}"
    deployments = {d["metadata"]["name"] for d in cluster.api("GET", f"{base}/deployments")["items"]}
    assert deployments == {f"wm-wiremesh-{c}" for c in ("coord", "keys", "stun", "derp", "operator")}
    daemonsets = {d["metadata"]["name"] for d in cluster.api("GET", f"{base}/daemonsets")["items"]}
    assert daemonsets == {"wm-wiremesh-agent"}


def test_the_crds_are_installed_with_the_chart(cluster):
    crds = cluster.api("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]
    assert {c["spec"]["group"] for c in crds} >= {"wiremesh.dev"}


def test_operator_may_manage_meshnodes_and_their_status(cluster):
    assert cluster.can("create", "wiremesh.dev", "meshnodes")
    assert cluster.can("patch", "wiremesh.dev", "meshnodes", subresource="status")
    assert cluster.can("watch", "wiremesh.dev", "acls")


def test_operator_may_watch_nodes_and_record_events(cluster):
    assert cluster.can("watch", "", "nodes")
    assert cluster.can("create", "", "events", namespace="default")


def test_operator_may_write_secrets_only_in_the_meshnode_keys_namespace(cluster):
    assert cluster.can("create", "", "secrets", namespace=f"{NAMESPACE}-meshnode-keys")
    assert not cluster.can("get", "", "secrets", namespace="kube-system")
    # The release namespace holds the admin key (and database and bus credentials): out of reach.
    assert not cluster.can("get", "", "secrets", namespace=NAMESPACE)
    assert not cluster.can("list", "", "secrets", namespace=NAMESPACE)


def test_operator_may_not_change_nodes(cluster):
    assert not cluster.can("patch", "", "nodes")


def test_upgrade_keeps_the_generated_admin_key(cluster):
    path = f"/api/v1/namespaces/{NAMESPACE}/secrets/wm-wiremesh-admin-key"
    before = cluster.api("GET", path)["data"]
    upgraded = cluster.run_helm("upgrade", "wm", str(CHART), "--namespace", NAMESPACE)
    assert upgraded.returncode == 0, upgraded.stderr
    assert cluster.api("GET", path)["data"] == before


def test_install_with_external_nats_and_a_database_secret_is_accepted(cluster):
    out = cluster.run_helm(
        "install", "wm2", str(CHART), "--namespace", "mesh2", "--create-namespace",
        "--set", "nats.enabled=false", "--set", "nats.url=tls://nats.example:4222",
        "--set", "nats.auth.existingSecrets.coord=bus-coord", "--set", "nats.auth.existingSecrets.keys=bus-keys",
        "--set", "nats.auth.existingSecrets.derp=bus-derp", "--set", "nats.tls.existingSecret=bus-ca",
        "--set", "networkPolicy.database.podSelector.app=postgres", "--set", "acl.create=true",
        "--set", "database.existingSecret=wiremesh-db", "--set", "coord.replicas=2",
        "--set", "adminKey.existingSecret=wiremesh-admin",
        "--set-json", 'coord.derpMap={"regions": {"1": {"name": "r1", "relay": "relay.example:3340"}}}',
        "--set", "derp.tls.existingSecret=relay-tls", "--set", "derp.service.type=LoadBalancer",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "unknown field" not in out.stderr, out.stderr
    # The default ACL passed the CRD's schema and its name rule.
    assert cluster.api("GET", "/apis/wiremesh.dev/v1alpha1/acls/default")["spec"]["acls"]


def test_upgrade_keeps_the_bus_credentials_and_certificate(cluster):
    paths = [
        f"/api/v1/namespaces/{NAMESPACE}/secrets/wm-wiremesh-nats-{name}"
        for name in ("coord", "keys", "derp", "tls")
    ]
    before = [cluster.api("GET", path)["data"] for path in paths]
    upgraded = cluster.run_helm("upgrade", "wm", str(CHART), "--namespace", NAMESPACE)
    assert upgraded.returncode == 0, upgraded.stderr
    assert [cluster.api("GET", path)["data"] for path in paths] == before


def test_only_the_bus_roles_may_reach_nats(cluster):
    policy = cluster.api(
        "GET", f"/apis/networking.k8s.io/v1/namespaces/{NAMESPACE}/networkpolicies/wm-wiremesh-nats"
    )
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["coord", "keys", "derp"]


# ---- per-node agent keys: RBAC as the API server evaluates it, and the init step for real


def test_agents_may_get_secrets_in_the_node_keys_namespace(cluster):
    assert cluster.can("get", "", "secrets", namespace=NODE_KEYS, user=AGENT_SA)


@pytest.mark.parametrize("verb", ["list", "watch", "create", "update", "delete"])
def test_agents_may_not_enumerate_or_change_node_key_secrets(cluster, verb):
    assert not cluster.can(verb, "", "secrets", namespace=NODE_KEYS, user=AGENT_SA)


def test_agents_may_not_read_the_release_namespaces_secrets(cluster):
    # the admin key and the database URL live there
    assert not cluster.can("get", "", "secrets", namespace=NAMESPACE, user=AGENT_SA)
    assert not cluster.can("get", "", "secrets", namespace="kube-system", user=AGENT_SA)


def test_agents_may_not_touch_meshnodes(cluster):
    assert not cluster.can("get", "wiremesh.dev", "meshnodes", user=AGENT_SA)


def test_operator_may_write_node_key_secrets(cluster):
    for verb in ("get", "create", "update", "delete"):
        assert cluster.can(verb, "", "secrets", namespace=NODE_KEYS), verb


def _agent_token(cluster: Cluster) -> str:
    """What the kubelet mounts into the init container: a short-lived token for the agent's SA."""
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 600},
    }
    answer = cluster.api(
        "POST", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/wm-wiremesh-agent/token", request
    )
    return str(answer["status"]["token"])


def _fetch(cluster: Cluster, tmp_path: Path, namespace: str, secret: str) -> subprocess.CompletedProcess[str]:
    token = tmp_path / "token"
    token.write_text(_agent_token(cluster))
    return subprocess.run(
        [
            sys.executable, "-m", "wiremesh.operator.agentkey",
            "--api-url", cluster.kube.url, "--token-file", str(token), "--ca-file", str(cluster.kube.ca_path),
            "--namespace", namespace, "--secret", secret, "--default-hostname", "worker-1",
            "--out", str(tmp_path / "out"), "--wait", "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


def test_agent_init_step_fetches_its_nodes_key_with_its_own_token(cluster, tmp_path):
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "meshnode-worker-7-authkey"},
        "stringData": {
            "authkey": "wmauth-test-key",
            "hostname": "worker-7",
            "advertise-routes": "10.244.7.0/24",
        },
    }
    cluster.api("POST", f"/api/v1/namespaces/{NODE_KEYS}/secrets", secret)
    out = _fetch(cluster, tmp_path, NODE_KEYS, "meshnode-worker-7-authkey")
    assert out.returncode == 0, out.stderr
    files = {
        p.name: p.read_text().strip() for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")
    }
    assert files == {
        "authkey": "wmauth-test-key",
        "hostname": "worker-7",
        "advertise-routes": "10.244.7.0/24",
    }
    assert (tmp_path / "out" / "authkey").stat().st_mode & 0o077 == 0


def test_agent_init_step_is_refused_the_admin_key_secret(cluster, tmp_path):
    out = _fetch(cluster, tmp_path, NAMESPACE, "wm-wiremesh-admin-key")
    assert out.returncode == 1
    assert "refused to show Secret" in out.stderr and "403" in out.stderr
    assert not (tmp_path / "out").exists()


def test_agent_init_step_starts_without_a_key_when_its_secret_never_comes(cluster, tmp_path):
    out = _fetch(cluster, tmp_path, NODE_KEYS, "meshnode-not-mirrored-authkey")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "authkey").read_text().strip() == ""
    assert (tmp_path / "out" / "hostname").read_text().strip() == "worker-1"
