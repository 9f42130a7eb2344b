"""The Helm chart charts/wiremesh, linted and rendered by a real `helm` (built from its Go
module, see wiremesh.lab.gobuild), with the default values and a few combinations; the rendered objects
are parsed and checked for what a cluster operator relies on."""

from __future__ import annotations

import ast
import base64
import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from wiremesh.lab.gobuild import helm as helm_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wiremesh"
COMPONENTS = ("coord", "keys", "stun", "derp", "operator")
SOURCE_ROOTS = ("core", "services", "node-agent", "operator")
# The cluster version rendered against (a helm built with `go install` has no ldflags and would
# assume Kubernetes 1.20).
KUBE = ("--kube-version", "1.31.0")

# The first build of helm may take minutes; every later step is quick.
pytestmark = [pytest.mark.timeout(1800)]

EXTERNAL_NATS = (
    "--set", "nats.enabled=false", "--set", "nats.url=nats://nats.example:4222",
    *[arg for role in ("coord", "keys", "derp") for arg in ("--set", f"nats.auth.existingSecrets.{role}=bus-{role}")],
)  # fmt: skip
SERVICE_MONITORS = ("--set", "metrics.serviceMonitor.enabled=true")
POSTGRES = ("--set", "database.existingSecret=wiremesh-db", "--set", "coord.replicas=2")


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


@functools.cache
def _render(helm: Path, *args: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run(
        [str(helm), "template", "wm", str(CHART), "--namespace", "mesh", *KUBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if out.returncode != 0:
        raise AssertionError(out.stderr)
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    return list(_render(helm, *args))


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = objects(docs, kind)
    assert name in found, f"no {kind} {name}; have {sorted(found)}"
    return found[name]


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "DaemonSet", "StatefulSet")]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------- lint


def test_chart_lints_clean_with_default_values(helm):
    out = subprocess.run([str(helm), "lint", "--strict", *KUBE, str(CHART)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "args",
    [EXTERNAL_NATS, SERVICE_MONITORS, POSTGRES, (*EXTERNAL_NATS, *SERVICE_MONITORS, *POSTGRES)],
    ids=["external-nats", "service-monitors", "postgres-secret", "all-three"],
)
def test_chart_lints_clean_with_value_combinations(helm, args):
    out = subprocess.run(
        [str(helm), "lint", "--strict", *KUBE, str(CHART), *args], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


# ---------------------------------------------------------------------- components


def test_default_render_has_every_component(helm):
    docs = render(helm)
    deployments = objects(docs, "Deployment")
    for component in COMPONENTS:
        assert f"wm-wiremesh-{component}" in deployments, sorted(deployments)
    one(docs, "DaemonSet", "wm-wiremesh-agent")
    one(docs, "StatefulSet", "wm-wiremesh-nats")
    services = objects(docs, "Service")
    for name in ("coord", "keys", "stun", "derp", "nats"):
        assert f"wm-wiremesh-{name}" in services, sorted(services)


def test_images_are_the_dockerfile_targets_at_the_chart_version(helm):
    targets = set(re.findall(r"^FROM runtime AS (\w+)", (ROOT / "Dockerfile").read_text(), re.M))
    assert targets == {"coord", "keys", "stun", "derp", "operator", "agent"}
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    for doc in workloads(render(helm)):
        for c in containers(doc):
            repo, _, tag = c["image"].rpartition(":")
            if repo == "nats":
                continue
            assert repo.startswith("wiremesh/") and repo.split("/", 1)[1] in targets, c["image"]
            assert tag == version, c["image"]


def test_image_registry_prefixes_every_wiremesh_image(helm):
    docs = render(helm, "--set", "imageRegistry=registry.example/team")
    images = {c["image"] for d in workloads(docs) for c in containers(d)}
    assert {i for i in images if not i.startswith("nats:")} == {
        i for i in images if i.startswith("registry.example/team/wiremesh/")
    }


def test_skaffold_deploys_this_chart_and_sets_values_that_exist(helm):
    skaffold = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    (release,) = skaffold["deploy"]["helm"]["releases"]
    assert (ROOT / release["chartPath"]).resolve() == CHART
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    built = {a["image"] for a in skaffold["build"]["artifacts"]}
    for path in release["setValueTemplates"]:
        node: Any = values
        for part in path.split("."):
            assert isinstance(node, dict) and part in node, f"{path} is not in values.yaml"
            node = node[part]
    for component in (*COMPONENTS, "agent"):
        assert values[component]["image"]["repository"] in built, component


# ---------------------------------------------------------------------- the node agent


def test_agent_daemonset_runs_on_the_host_network_with_net_admin_and_tun(helm):
    ds = one(render(helm), "DaemonSet", "wm-wiremesh-agent")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    (agent,) = pod["containers"]
    assert agent["securityContext"]["capabilities"]["add"] == ["NET_ADMIN"]
    assert agent["securityContext"]["privileged"] is False
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    tun = next(name for name, path in mounts.items() if path == "/dev/net/tun")
    assert volumes[tun]["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}


def test_agent_keeps_its_keys_in_a_host_directory(helm):
    ds = one(render(helm), "DaemonSet", "wm-wiremesh-agent")
    pod = ds["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    state_dir = agent["args"][agent["args"].index("--state-dir") + 1]
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == state_dir)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == "/var/lib/wiremesh"


SHARED_KEY = ("--set", "agent.authKey.fromOperator=false")


def test_agent_takes_a_shared_auth_key_from_a_secret_in_the_environment_when_asked(helm):
    ds = one(
        render(helm, *SHARED_KEY, "--set", "agent.authKey.existingSecret=join-key"),
        "DaemonSet",
        "wm-wiremesh-agent",
    )
    (agent,) = containers(ds)
    ref = env_of(agent)["WIREMESH_AUTH_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "join-key" and ref["key"] == "authkey"
    assert "--auth-key" not in agent["args"]  # argv is visible in ps


def test_agent_logs_in_to_the_coord_service_by_default(helm):
    (agent,) = containers(one(render(helm), "DaemonSet", "wm-wiremesh-agent"))
    assert (
        agent["args"][agent["args"].index("--login-server") + 1] == "http://wm-wiremesh-coord.mesh.svc:8080"
    )


# ---------------------------------------------------------------------- secrets


SECRET_ENV = re.compile(r"(_KEY|PASSWORD|TOKEN|SECRET|DATABASE_URL)$")


@pytest.mark.parametrize(
    "args",
    [(), POSTGRES, ("--set", "adminKey.existingSecret=adm", *POSTGRES)],
    ids=["defaults", "postgres-secret", "own-admin-key"],
)
def test_no_secret_value_is_inlined_in_a_pod(helm, args):
    for doc in workloads(render(helm, *args)):
        for c in containers(doc):
            for name, entry in env_of(c).items():
                if SECRET_ENV.search(name):
                    assert "secretKeyRef" in entry.get("valueFrom", {}), (doc["metadata"]["name"], name)
            for arg in map(str, [*c.get("command", []), *c.get("args", [])]):
                assert "postgresql" not in arg and "wmauth-" not in arg, (doc["metadata"]["name"], arg)
                # the only mention of a key: the file the init container writes it to
                assert "authkey" not in arg.replace("file:/run/wiremesh/authkey", "").replace(
                    "meshnode-$(NODE_NAME)-authkey", ""
                ), (doc["metadata"]["name"], arg)


def test_the_chart_writes_only_the_secrets_it_generates(helm):
    bus = [
        "wm-wiremesh-nats-config",
        "wm-wiremesh-nats-coord",
        "wm-wiremesh-nats-derp",
        "wm-wiremesh-nats-keys",
    ]
    assert sorted(objects(render(helm), "Secret")) == sorted(
        ["wm-wiremesh-admin-key", "wm-wiremesh-operator-key", *bus, "wm-wiremesh-nats-tls"]
    )
    assert sorted(objects(render(helm, "--set", "adminKey.existingSecret=adm"), "Secret")) == sorted(
        ["wm-wiremesh-operator-key", *bus, "wm-wiremesh-nats-tls"]
    )
    own_keys = ("--set", "adminKey.existingSecret=adm", "--set", "operator.scopedAdminKey=false")
    assert objects(render(helm, *own_keys, *EXTERNAL_NATS), "Secret") == {}


def test_operator_uses_its_own_scoped_key_that_coord_provisions(helm):
    docs = render(helm)
    secret = one(docs, "Secret", "wm-wiremesh-operator-key")
    key = base64.b64decode(secret["data"]["operator-key"]).decode()
    assert re.fullmatch(r"wmadm-[a-z0-9]{12}-[A-Za-z0-9]{48}", key), key
    (operator,) = containers(one(docs, "Deployment", "wm-wiremesh-operator"))
    ref = env_of(operator)["WIREMESH_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "wm-wiremesh-operator-key", "key": "operator-key"}
    coord = one(docs, "Deployment", "wm-wiremesh-coord")
    (c,) = containers(coord)
    grant = env_of(c)["WIREMESH_PROVISION_ADMIN_KEYS"]["value"]
    assert grant == "nodes,authkeys,policy=/run/wiremesh/operator-key/operator-key"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "operator-key")
    assert mount == {"name": "operator-key", "mountPath": "/run/wiremesh/operator-key", "readOnly": True}
    volume = next(v for v in coord["spec"]["template"]["spec"]["volumes"] if v["name"] == "operator-key")
    assert volume["secret"]["secretName"] == "wm-wiremesh-operator-key"


def test_operator_falls_back_to_the_bootstrap_key_when_asked(helm):
    docs = render(helm, "--set", "operator.scopedAdminKey=false")
    (operator,) = containers(one(docs, "Deployment", "wm-wiremesh-operator"))
    ref = env_of(operator)["WIREMESH_ADMIN_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "wm-wiremesh-admin-key", "key": "admin-key"}
    (c,) = containers(one(docs, "Deployment", "wm-wiremesh-coord"))
    assert "WIREMESH_PROVISION_ADMIN_KEYS" not in env_of(c)


def test_database_url_comes_from_its_secret_for_coord_and_keys(helm):
    docs = render(helm, *POSTGRES)
    for name in ("wm-wiremesh-coord", "wm-wiremesh-keys"):
        (c,) = containers(one(docs, "Deployment", name))
        ref = env_of(c)["WIREMESH_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "wiremesh-db", "key": "url"}


OIDC = (
    "--set", "coord.oidc.issuer=https://idp.example.com",
    "--set", "coord.oidc.clientId=wiremesh",
    "--set", "coord.oidc.clientSecret.existingSecret=wiremesh-oidc",
    "--set", "coord.loginServer=https://mesh.example.com",
    "--set", "coord.oidc.allowedDomains={example.com,example.org}",
    "--set", "coord.oidc.allowedGroups={admins@example.com}",
    "--set", "coord.oidc.groupsClaim=roles",
)  # fmt: skip


def test_oidc_values_reach_coord_as_the_login_it_parses(helm, monkeypatch):
    import argparse

    from wiremesh.coord import oidc_login

    (c,) = containers(one(render(helm, *OIDC), "Deployment", "wm-wiremesh-coord"))
    env = env_of(c)
    assert env["WIREMESH_OIDC_CLIENT_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "wiremesh-oidc",
        "key": "client-secret",
    }
    for name, entry in env.items():
        if name.startswith(("WIREMESH_OIDC_", "WIREMESH_SERVER_URL")):
            monkeypatch.setenv(name, entry.get("value", "the-secret-from-the-secret"))
    parser = argparse.ArgumentParser()
    oidc_login.add_arguments(parser)
    config, server_url = oidc_login.config_from_args(parser.parse_args([]), "0.0.0.0:8080")
    assert server_url == "https://mesh.example.com"
    assert config is not None
    assert config.issuer == "https://idp.example.com" and config.client_id == "wiremesh"
    assert config.client_secret == "the-secret-from-the-secret"
    assert config.redirect_uri == "https://mesh.example.com/oidc/callback"
    assert config.allowed_domains == ("example.com", "example.org")
    assert config.allowed_groups == ("admins@example.com",)
    assert config.groups_claim == "roles"


def test_no_oidc_login_unless_an_issuer_is_set(helm):
    (c,) = containers(one(render(helm), "Deployment", "wm-wiremesh-coord"))
    assert not [name for name in env_of(c) if name.startswith("WIREMESH_OIDC_")]


@pytest.mark.parametrize(
    "args, message",
    [
        (("--set", "coord.oidc.issuer=https://idp.example.com"), "needs coord.oidc.clientId"),
        (OIDC[:6], "serverUrl (or coord.loginServer)"),
    ],
    ids=["no-client", "no-server-url"],
)
def test_incomplete_oidc_values_are_a_clear_error(helm, args, message):
    with pytest.raises(AssertionError) as refused:
        render(helm, *args)
    assert message in str(refused.value)


def test_coord_replicas_without_a_shared_database_are_refused(helm):
    out = subprocess.run(
        [str(helm), "template", "wm", str(CHART), *KUBE, "--set", "coord.replicas=2"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "database.existingSecret" in out.stderr


# ---------------------------------------------------------------------- NATS


def test_external_nats_replaces_the_in_chart_server(helm):
    docs = render(helm, *EXTERNAL_NATS)
    assert objects(docs, "StatefulSet") == {}
    for name in ("wm-wiremesh-coord", "wm-wiremesh-keys"):
        (c,) = containers(one(docs, "Deployment", name))
        assert env_of(c)["WIREMESH_NATS_URL"]["value"] == "nats://nats.example:4222"
    derp = containers(one(docs, "Deployment", "wm-wiremesh-derp"))[0]
    assert derp["args"][derp["args"].index("--nats-url") + 1] == "nats://nats.example:4222"


def test_in_chart_nats_is_what_the_services_use_by_default(helm):
    (c,) = containers(one(render(helm), "Deployment", "wm-wiremesh-coord"))
    assert env_of(c)["WIREMESH_NATS_URL"]["value"] == "tls://wm-wiremesh-nats:4222"


def test_external_nats_without_a_url_is_a_clear_error(helm):
    out = subprocess.run(
        [str(helm), "template", "wm", str(CHART), *KUBE, "--set", "nats.enabled=false"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "nats.url is required" in out.stderr


# ---------------------------------------------------------------------- services, probes, hardening


def test_derp_service_carries_the_relay_port_and_stun_over_udp(helm):
    svc = one(render(helm), "Service", "wm-wiremesh-derp")
    ports = {(p["port"], p["protocol"]) for p in svc["spec"]["ports"]}
    assert ports == {(3340, "TCP"), (3478, "UDP")}


def test_derp_serves_tls_from_its_secret(helm):
    derp = one(render(helm, "--set", "derp.tls.existingSecret=relay-tls"), "Deployment", "wm-wiremesh-derp")
    c = containers(derp)[0]
    assert c["args"][c["args"].index("--tls-cert") + 1].startswith("/etc/wiremesh/tls/")
    volumes = derp["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls", "secret": {"secretName": "relay-tls"}} in volumes


def test_derp_map_reaches_coord_as_a_file(helm):
    derp_map = {"regions": {"1": {"name": "r1", "relay": "relay.example:3340", "stun": "relay.example:3478"}}}
    docs = render(helm, "--set-json", f"coord.derpMap={json.dumps(derp_map)}")
    cm = one(docs, "ConfigMap", "wm-wiremesh-derp-map")
    assert json.loads(cm["data"]["derp-map.json"]) == derp_map
    (c,) = containers(one(docs, "Deployment", "wm-wiremesh-coord"))
    assert c["args"][c["args"].index("--derp-map") + 1] == "/etc/wiremesh/derp-map.json"


def test_every_service_process_is_probed_on_healthz(helm):
    for doc in workloads(render(helm)):
        if doc["kind"] == "DaemonSet":
            continue  # wiremeshd has no HTTP surface but /metrics: a TCP probe on it
        for c in containers(doc):
            assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", (doc["metadata"]["name"], c["name"])


def test_every_container_has_resources_and_a_hardened_security_context(helm):
    for doc in workloads(render(helm)):
        for c in containers(doc):
            where = (doc["metadata"]["name"], c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where


def test_only_the_agent_runs_as_root(helm):
    for doc in workloads(render(helm)):
        if doc["kind"] == "DaemonSet":
            continue
        assert doc["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True, doc["metadata"][
            "name"
        ]


# ---------------------------------------------------------------------- operator RBAC


def _rules(
    docs: list[dict[str, Any]], kind: str, name: str = "wm-wiremesh-operator"
) -> list[tuple[str, str, set[str]]]:
    role = one(docs, kind, name)
    return [
        (group, resource, set(rule["verbs"]))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    ]


def _allowed(rules: list[tuple[str, str, set[str]]], group: str, resource: str, verb: str) -> bool:
    return any(g == group and r == resource and verb in verbs for g, r, verbs in rules)


def test_operator_may_manage_the_crds_it_serves(helm):
    rules = _rules(render(helm), "ClusterRole")
    for crd in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(crd.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            group, plural = doc["spec"]["group"], doc["spec"]["names"]["plural"]
            for verb in ("watch", "patch", "create", "delete"):
                assert _allowed(rules, group, plural, verb), (group, plural, verb)
            assert _allowed(rules, group, f"{plural}/status", "patch"), (group, plural)


def test_operator_may_read_nodes_and_write_events_cluster_wide(helm):
    rules = _rules(render(helm), "ClusterRole")
    assert _allowed(rules, "", "nodes", "watch")
    assert _allowed(rules, "", "events", "create")


def test_operator_writes_secrets_only_in_the_meshnode_keys_namespace(helm):
    docs = render(helm)
    assert not any(r == "secrets" for _, r, _ in _rules(docs, "ClusterRole"))
    role = one(docs, "Role", "wm-wiremesh-operator")
    assert role["metadata"]["namespace"] == "mesh-meshnode-keys"
    assert _allowed(_rules(docs, "Role", "wm-wiremesh-operator"), "", "secrets", "create")
    binding = one(docs, "RoleBinding", "wm-wiremesh-operator")
    assert binding["metadata"]["namespace"] == "mesh-meshnode-keys"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "wm-wiremesh-operator", "namespace": "mesh"}
    ]
    assert "mesh-meshnode-keys" in objects(docs, "Namespace")
    (operator,) = containers(one(docs, "Deployment", "wm-wiremesh-operator"))
    assert env_of(operator)["WIREMESH_OPERATOR_NAMESPACE"]["value"] == "mesh-meshnode-keys"
    # Nothing binds the operator to a Role in the release namespace, where the admin key lives.
    for name, rb in objects(docs, "RoleBinding").items():
        if any(sub["name"] == "wm-wiremesh-operator" for sub in rb["subjects"]):
            assert rb["metadata"].get("namespace") in ("mesh-meshnode-keys", "mesh-node-keys"), name


# ---------------------------------------------------------------------- per-node agent keys


def _agent_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod: dict[str, Any] = one(docs, "DaemonSet", "wm-wiremesh-agent")["spec"]["template"]["spec"]
    return pod


def test_each_agent_fetches_its_own_nodes_secret_in_an_init_container(helm):
    pod = _agent_pod(render(helm))
    (init,) = pod["initContainers"]
    args = init["args"]
    assert init["command"] == ["python", "-m", "wiremesh.operator.agentkey"]
    assert args[args.index("--secret") + 1] == "meshnode-$(NODE_NAME)-authkey"
    assert args[args.index("--namespace") + 1] == "mesh-node-keys"
    assert env_of(init)["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


def test_agent_reads_the_key_hostname_and_routes_the_init_container_wrote(helm):
    pod = _agent_pod(render(helm))
    (agent,) = pod["containers"]
    script = agent["command"][2]
    for piece in ("file:/run/wiremesh/authkey", "/run/wiremesh/hostname", "/run/wiremesh/advertise-routes"):
        assert piece in script
    assert "WIREMESH_AUTH_KEY" not in env_of(agent)
    (init,) = pod["initContainers"]
    shared = {m["name"] for m in agent["volumeMounts"]} & {m["name"] for m in init["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] in shared]
    assert volume["emptyDir"]["medium"] == "Memory"  # the key never touches the node's disk


def test_only_the_init_container_holds_a_kubernetes_token(helm):
    pod = _agent_pod(render(helm))
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == "wm-wiremesh-agent"
    token_volumes = {
        v["name"]
        for v in pod["volumes"]
        if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))
    }
    (init,) = pod["initContainers"]
    (agent,) = pod["containers"]
    assert token_volumes & {m["name"] for m in init["volumeMounts"]}
    assert not token_volumes & {m["name"] for m in agent["volumeMounts"]}


def test_init_container_is_hardened_and_bounded(helm):
    (init,) = _agent_pod(render(helm))["initContainers"]
    sc = init["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert init["resources"]["limits"]["memory"]


def test_agents_may_only_get_secrets_and_only_in_the_node_keys_namespace(helm):
    docs = render(helm)
    role = one(docs, "Role", "wm-wiremesh-agent-read-node-key")
    assert role["metadata"]["namespace"] == "mesh-node-keys"
    assert _rules(docs, "Role", "wm-wiremesh-agent-read-node-key") == [("", "secrets", {"get"})]
    binding = one(docs, "RoleBinding", "wm-wiremesh-agent-read-node-key")
    assert binding["metadata"]["namespace"] == "mesh-node-keys"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "wm-wiremesh-agent", "namespace": "mesh"}
    ]
    assert not any(
        s.get("name") == "wm-wiremesh-agent"
        for d in objects(docs, "ClusterRoleBinding").values()
        for s in d["subjects"]
    )


def test_operator_writes_node_keys_into_the_node_keys_namespace(helm):
    docs = render(helm)
    (operator,) = containers(one(docs, "Deployment", "wm-wiremesh-operator"))
    assert env_of(operator)["WIREMESH_NODE_KEYS_NAMESPACE"]["value"] == "mesh-node-keys"
    assert one(docs, "Role", "wm-wiremesh-operator-node-keys")["metadata"]["namespace"] == "mesh-node-keys"
    assert _allowed(_rules(docs, "Role", "wm-wiremesh-operator-node-keys"), "", "secrets", "create")
    assert one(docs, "Namespace", "mesh-node-keys")


def test_node_keys_namespace_can_be_named_and_left_to_the_user(helm):
    docs = render(
        helm,
        "--set", "agent.authKey.nodeKeysNamespace=keys-only",
        "--set", "agent.authKey.createNodeKeysNamespace=false",
    )  # fmt: skip
    assert "keys-only" not in objects(docs, "Namespace") and "mesh-node-keys" not in objects(
        docs, "Namespace"
    )
    assert one(docs, "Role", "wm-wiremesh-agent-read-node-key")["metadata"]["namespace"] == "keys-only"


@pytest.mark.parametrize("off", ["operator.enabled=false", "operator.mirrorNodes=false"])
def test_per_node_keys_without_the_operator_mirroring_nodes_is_a_clear_error(helm, off):
    out = subprocess.run(
        [str(helm), "template", "wm", str(CHART), *KUBE, "--set", off], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert "agent.authKey.fromOperator needs operator.enabled and operator.mirrorNodes" in out.stderr


def test_shared_key_mode_has_no_init_container_token_or_agent_rbac(helm):
    docs = render(helm, *SHARED_KEY)
    pod = _agent_pod(docs)
    assert "initContainers" not in pod and "serviceAccountName" not in pod
    assert "wm-wiremesh-agent-read-node-key" not in objects(docs, "Role")


# ---------------------------------------------------------------------- monitoring


def test_no_service_monitor_unless_asked(helm):
    docs = render(helm)
    assert not [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")]


def test_service_monitors_scrape_a_named_port_of_a_real_service(helm):
    docs = render(helm, *SERVICE_MONITORS)
    monitors = objects(docs, "ServiceMonitor")
    assert sorted(monitors) == [f"wm-wiremesh-{c}" for c in ("coord", "derp", "keys", "stun")]
    services = list(objects(docs, "Service").values())
    for name, monitor in monitors.items():
        wanted = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if wanted.items() <= s["metadata"]["labels"].items()]
        ports = {p["name"] for s in matched for p in s["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in ports, (name, endpoint["port"], ports)


def test_agents_are_scraped_through_a_pod_monitor(helm):
    docs = render(helm, *SERVICE_MONITORS)
    monitor = one(docs, "PodMonitor", "wm-wiremesh-agent")
    (agent,) = containers(one(docs, "DaemonSet", "wm-wiremesh-agent"))
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    assert port in {p["name"] for p in agent["ports"]}
    assert (
        f"$(POD_IP):{next(p['containerPort'] for p in agent['ports'] if p['name'] == port)}" in agent["args"]
    )


def test_dashboard_config_map_carries_the_grafana_label(helm):
    cm = one(render(helm), "ConfigMap", "wm-wiremesh-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["wiremesh.json"])["panels"]


@functools.cache
def exported_metric_names() -> frozenset[str]:
    """Metric names the code registers: string constants that look like our metric names in the
    modules that use prometheus_client (names built from tables count too)."""
    names: set[str] = set()
    pattern = re.compile(r"^(wiremesh|derp|stun)_[a-z0-9_]+$")
    for root in SOURCE_ROOTS:
        for path in (ROOT / root).rglob("*.py"):
            text = path.read_text()
            if "prometheus_client" not in text:
                continue
            for node in ast.walk(ast.parse(text)):
                if (
                    isinstance(node, ast.Constant)
                    and isinstance(node.value, str)
                    and pattern.match(node.value)
                ):
                    names.add(node.value)
    return frozenset(names)


def dashboard_queries() -> list[str]:
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_only_metrics_the_code_exports():
    exported = exported_metric_names()
    assert "wiremesh_magicsock_peer_path" in exported and "derp_packets_dropped" in exported
    queries = dashboard_queries()
    assert len(queries) >= 10
    for expr in queries:
        for name in re.findall(r"\b(?:wiremesh|derp|stun)_[a-z0-9_]+", expr):
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base in exported, f"{name} in {expr!r} is not exported by any service"


def test_dashboard_covers_every_component():
    text = " ".join(dashboard_queries())
    for prefix in (
        "wiremesh_magicsock_",
        "wiremesh_peer_",
        "wiremesh_coord_",
        "wiremesh_keys_",
        "derp_",
        "stun_",
    ):
        assert prefix in text, prefix


# ---------------------------------------------------------------------- values schema


def _template_error(helm: Path, *args: str) -> str:
    out = subprocess.run(
        [str(helm), "template", "wm", str(CHART), *KUBE, *args], capture_output=True, text=True
    )
    assert out.returncode != 0, "rendered although the values are wrong"
    return out.stderr


@pytest.mark.parametrize(
    ("args", "where"),
    [
        (("--set", "coord.replicass=2"), "/coord"),
        (("--set", "agent.tunName=an-interface-name-too-long"), "/agent/tunName"),
        (("--set", "nats.enabled=false", "--set", "nats.url=http://nats:4222"), "/nats/url"),
        (("--set", "derp.service.type=Ingress"), "/derp/service/type"),
        (("--set", "agent.metrics.port=70000"), "/agent/metrics/port"),
        (("--set", "operator.nodeTags={k8s-node}"), "/operator/nodeTags"),
    ],
    ids=["misspelt-key", "long-ifname", "nats-url-scheme", "service-type", "port-range", "tag-prefix"],
)
def test_values_schema_refuses_wrong_values_and_names_them(helm, args, where):
    assert where in _template_error(helm, *args)
