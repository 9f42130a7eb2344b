"""The chart's bus, trust and policy defaults (issue 9): credentials per role, the NATS server's
configuration run by a real nats-server, TLS, NetworkPolicies, route approval and the default ACL.

The NATS configuration the chart renders is started as it is (only its listen address and file
paths moved to this machine) and then attacked with the credentials the chart generated."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
import yaml

from wiremesh.core import bus, busauth
from wiremesh.lab.gobuild import helm as helm_binary
from wiremesh.lab.support import nats_server_binary, wait_until
from wiremesh.operator.acl import check_spec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wiremesh"
KUBE = ("--kube-version", "1.31.0")
ROLES = ("coord", "keys", "derp")
EXTERNAL = (
    "--set", "nats.enabled=false",
    "--set", "nats.url=tls://nats.example:4222",
    "--set", "nats.tls.existingSecret=bus-ca",
    *[arg for role in ROLES for arg in ("--set", f"nats.auth.existingSecrets.{role}=bus-{role}")],
)  # fmt: skip

pytestmark = [pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def helm() -> Path:
    return helm_binary()


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(helm), "template", "wm", str(CHART), "--namespace", "mesh", *KUBE, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def render(helm: Path, *args: str) -> list[dict[str, Any]]:
    out = run_helm(helm, *args)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def objects(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return dict(objects(docs, kind)[name]["spec"]["template"]["spec"])


def secret_names_mounted(pod: dict[str, Any]) -> set[str]:
    names = set()
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- credentials per role ---------------------------------------------------------------------


def test_each_role_gets_its_own_generated_credential_mounted_only_into_its_pods(helm: Path) -> None:
    docs = render(helm)
    secrets = objects(docs, "Secret")
    pods = {
        "coord": pod_spec(docs, "Deployment", "wm-wiremesh-coord"),
        "keys": pod_spec(docs, "Deployment", "wm-wiremesh-keys"),
        "derp": pod_spec(docs, "Deployment", "wm-wiremesh-derp"),
        "operator": pod_spec(docs, "Deployment", "wm-wiremesh-operator"),
        "agent": pod_spec(docs, "DaemonSet", "wm-wiremesh-agent"),
        "stun": pod_spec(docs, "Deployment", "wm-wiremesh-stun"),
    }
    passwords = set()
    for role in ROLES:
        name = f"wm-wiremesh-nats-{role}"
        user, _, password = base64.b64decode(secrets[name]["data"]["credentials"]).decode().partition(":")
        assert user == role and len(password) >= 40
        passwords.add(password)
        holders = {pod for pod, spec in pods.items() if name in secret_names_mounted(spec)}
        assert holders == {role}, (name, holders)
    assert len(passwords) == 3


def test_services_read_the_credential_and_ca_from_files_never_argv_or_env_values(helm: Path) -> None:
    docs = render(helm)
    for kind, name in (("Deployment", "wm-wiremesh-coord"), ("Deployment", "wm-wiremesh-keys")):
        (c,) = pod_spec(docs, kind, name)["containers"]
        assert env(c)["WIREMESH_NATS_URL"] == "tls://wm-wiremesh-nats:4222"
    for kind, name in (
        ("Deployment", "wm-wiremesh-coord"),
        ("Deployment", "wm-wiremesh-keys"),
        ("Deployment", "wm-wiremesh-derp"),
    ):
        c = pod_spec(docs, kind, name)["containers"][0]
        assert env(c)["WIREMESH_NATS_CREDENTIALS"] == "/etc/wiremesh-nats/credentials"
        assert env(c)["WIREMESH_NATS_CA"] == "/etc/wiremesh-nats-ca/ca.crt"
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts["/etc/wiremesh-nats"]["readOnly"] and mounts["/etc/wiremesh-nats-ca"]["readOnly"]
        assert not any("credentials" in str(a) and ":" in str(a) for a in c.get("args", []))
    # The services get the CA certificate only, never the server's key.
    for volume in pod_spec(docs, "Deployment", "wm-wiremesh-coord")["volumes"]:
        if volume["name"] == "nats-ca":
            assert volume["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]


def test_the_server_keeps_only_bcrypt_hashes_and_the_roles_permissions(helm: Path) -> None:
    secrets = objects(render(helm), "Secret")
    conf = secrets["wm-wiremesh-nats-config"]["stringData"]["nats.conf"]
    users = json.loads(re.search(r"^authorization: (.*)$", conf, re.M).group(1))["users"]  # type: ignore[union-attr]
    assert {u["user"] for u in users} == set(ROLES)
    for user in users:
        assert user["password"].startswith("$2a$")
        assert user["permissions"] == busauth.ROLES[user["user"]].permissions()
    for role in ROLES:
        password = base64.b64decode(secrets[f"wm-wiremesh-nats-{role}"]["data"]["credentials"]).decode()
        assert password.partition(":")[2] not in conf


def test_bus_tls_can_be_left_off_and_then_no_ca_is_generated_or_mounted(helm: Path) -> None:
    docs = render(helm, "--set", "nats.tls.enabled=false")
    assert "wm-wiremesh-nats-tls" not in objects(docs, "Secret")
    conf = objects(docs, "Secret")["wm-wiremesh-nats-config"]["stringData"]["nats.conf"]
    assert "tls:" not in conf and "authorization:" in conf
    (c,) = pod_spec(docs, "Deployment", "wm-wiremesh-coord")["containers"]
    assert env(c)["WIREMESH_NATS_URL"] == "nats://wm-wiremesh-nats:4222" and "WIREMESH_NATS_CA" not in env(c)


def test_an_external_nats_needs_a_credential_secret_per_role(helm: Path) -> None:
    out = run_helm(helm, "--set", "nats.enabled=false", "--set", "nats.url=nats://nats.example:4222")
    assert out.returncode != 0 and "nats.auth.existingSecrets." in out.stderr
    docs = render(helm, *EXTERNAL)
    assert not any(n.startswith("wm-wiremesh-nats") for n in objects(docs, "Secret"))
    assert "wm-wiremesh-nats" not in objects(docs, "NetworkPolicy")
    for role in ROLES:
        pod = pod_spec(docs, "Deployment", f"wm-wiremesh-{role}")
        assert {f"bus-{role}", "bus-ca"} <= secret_names_mounted(pod)


def test_in_chart_nats_refuses_credential_secrets_meant_for_an_external_one(helm: Path) -> None:
    out = run_helm(helm, "--set", "nats.auth.existingSecrets.derp=mine")
    assert out.returncode != 0 and "external NATS" in out.stderr


# --- the rendered server, run and attacked ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RenderedBus:
    def __init__(self, directory: Path, port: int, credentials: dict[str, Path], ca: Path) -> None:
        self.directory = directory
        self.port = port
        self.credentials = credentials
        self.ca = ca

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.port}"

    async def connect(self, role: str, **options: Any) -> Any:
        access = busauth.BusAccess(self.url, role, str(self.credentials[role]), str(self.ca))
        # The certificate names the nats Service, as the services dial it in the cluster.
        return await nats.connect(
            self.url,
            tls_hostname="wm-wiremesh-nats",
            allow_reconnect=False,
            **access.connect_options(),
            **options,
        )


@pytest.fixture(scope="module")
def rendered_bus(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("chart-bus")
    secrets = objects(render(helm), "Secret")
    tls = secrets["wm-wiremesh-nats-tls"]["data"]
    for name in ("ca.crt", "tls.crt", "tls.key"):
        (directory / name).write_bytes(base64.b64decode(tls[name]))
    credentials = {}
    for role in ROLES:
        credentials[role] = directory / f"{role}.credentials"
        credentials[role].write_bytes(
            base64.b64decode(secrets[f"wm-wiremesh-nats-{role}"]["data"]["credentials"])
        )
    port = free_port()
    conf = secrets["wm-wiremesh-nats-config"]["stringData"]["nats.conf"]
    conf = conf.replace('listen: "0.0.0.0:4222"', f'listen: "127.0.0.1:{port}"')
    conf = conf.replace('http: "0.0.0.0:8222"', f'http: "127.0.0.1:{free_port()}"')
    conf = conf.replace("/etc/nats-tls/", f"{directory}/")
    (directory / "nats.conf").write_text(conf)
    log = (directory / "nats.log").open("wb")
    proc = subprocess.Popen(
        [nats_server_binary(), "-c", str(directory / "nats.conf")], stdout=log, stderr=log
    )
    log.close()
    try:

        def listening() -> bool:
            assert proc.poll() is None, (directory / "nats.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 10, "the rendered nats-server")
        yield RenderedBus(directory, port, credentials, directory / "ca.crt")
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
async def registry(rendered_bus: RenderedBus) -> AsyncIterator[Any]:
    """keys, answering auth-key creation as the real registry would."""
    nc = await rendered_bus.connect("keys")

    async def answer(msg: Any) -> None:
        await msg.respond(bus.encode(bus.AuthKeyReply(secret="wmauth-minted")))

    await nc.subscribe(bus.AUTH_KEY_CREATE, queue=bus.KEYS_QUEUE, cb=answer)
    await nc.flush()
    yield nc
    await nc.close()


async def test_rendered_bus_lets_coord_ask_for_a_pre_auth_key(
    rendered_bus: RenderedBus, registry: Any
) -> None:
    coord = await rendered_bus.connect("coord")
    try:
        reply = await coord.request(
            bus.AUTH_KEY_CREATE, bus.encode(bus.AuthKeyCreate(user="alice")), timeout=10
        )
        assert bus.decode(bus.AuthKeyReply, reply.data).secret == "wmauth-minted"
    finally:
        await coord.close()


async def test_rendered_bus_refuses_the_relays_credential_a_pre_auth_key(
    rendered_bus: RenderedBus, registry: Any
) -> None:
    refused: asyncio.Queue[str] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        refused.put_nowait(str(exc))

    derp = await rendered_bus.connect("derp", error_cb=on_error)
    try:
        request = bus.encode(bus.AuthKeyCreate(user="mallory", reusable=True))
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await derp.request(bus.AUTH_KEY_CREATE, request, timeout=3)
        async with asyncio.timeout(10):
            while "permissions violation for publish" not in await refused.get():
                pass
    finally:
        await derp.close()


async def test_rendered_bus_refuses_a_client_without_a_credential_or_without_tls(
    rendered_bus: RenderedBus,
) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(
            rendered_bus.url,
            tls=busauth.BusAccess(rendered_bus.url, "derp", "", str(rendered_bus.ca)).connect_options()[
                "tls"
            ],
            tls_hostname="wm-wiremesh-nats",
            allow_reconnect=False,
        )
    user, _, password = rendered_bus.credentials["derp"].read_text().partition(":")
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(
            f"nats://127.0.0.1:{rendered_bus.port}",
            user=user,
            password=password,
            allow_reconnect=False,
            connect_timeout=5,
        )


# --- NetworkPolicy ------------------------------------------------------------------------------


def test_only_the_bus_roles_pods_may_reach_the_nats_port(helm: Path) -> None:
    docs = render(helm)
    policy = objects(docs, "NetworkPolicy")["wm-wiremesh-nats"]["spec"]
    nats_pod = objects(docs, "StatefulSet")["wm-wiremesh-nats"]["spec"]["template"]["metadata"]["labels"]
    assert all(nats_pod[k] == v for k, v in policy["podSelector"]["matchLabels"].items())
    assert policy["policyTypes"] == ["Ingress"]
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 4222, "protocol": "TCP"}]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == "wm"
    (components,) = source["podSelector"]["matchExpressions"]
    assert components["key"] == "app.kubernetes.io/component" and sorted(components["values"]) == sorted(
        ROLES
    )
    for pod in (
        objects(docs, "DaemonSet")["wm-wiremesh-agent"],
        objects(docs, "Deployment")["wm-wiremesh-operator"],
        objects(docs, "Deployment")["wm-wiremesh-stun"],
    ):
        labels = pod["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] not in components["values"]


def test_a_database_in_the_namespace_is_reachable_only_by_coord_and_keys(helm: Path) -> None:
    assert "wm-wiremesh-database" not in objects(render(helm), "NetworkPolicy")
    docs = render(helm, "--set", "networkPolicy.database.podSelector.app=postgres")
    policy = objects(docs, "NetworkPolicy")["wm-wiremesh-database"]["spec"]
    assert policy["podSelector"] == {"matchLabels": {"app": "postgres"}}
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 5432, "protocol": "TCP"}]
    assert rule["from"][0]["podSelector"]["matchExpressions"][0]["values"] == ["coord", "keys"]


def test_network_policies_can_be_left_to_the_cluster_operator(helm: Path) -> None:
    assert objects(render(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy") == {}


# --- defaults: route approval and the ACL --------------------------------------------------------


def operator_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (c,) = pod_spec(docs, "Deployment", "wm-wiremesh-operator")["containers"]
    return env(c)


def test_pod_cidr_approval_is_a_chart_value(helm: Path) -> None:
    assert operator_env(render(helm))["WIREMESH_APPROVE_POD_ROUTES"] == "true"
    assert (
        operator_env(render(helm, "--set", "operator.approvePodRoutes=false"))["WIREMESH_APPROVE_POD_ROUTES"]
        == "false"
    )


def test_no_acl_unless_asked(helm: Path) -> None:
    assert objects(render(helm), "ACL") == {}


def test_the_chart_installs_the_default_acl_from_values_and_it_is_a_valid_policy(helm: Path) -> None:
    acl = objects(render(helm, "--set", "acl.create=true"), "ACL")["default"]
    assert acl["apiVersion"] == "wiremesh.dev/v1alpha1"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert acl["spec"] == values["acl"]["policy"]
    checked = check_spec(acl["spec"])  # what the operator checks before it sets the policy in coord
    assert checked.valid and checked.rules > 0, checked.problems


def test_an_existing_policy_file_is_installed_as_it_is(helm: Path, tmp_path: Path) -> None:
    text = (
        '{\n  // everyone everywhere\n  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]},],\n}\n'
    )
    (tmp_path / "policy.hujson").write_text(text)
    docs = render(
        helm, "--set", "acl.create=true", "--set-file", f"acl.policyText={tmp_path / 'policy.hujson'}"
    )
    spec = objects(docs, "ACL")["default"]["spec"]
    assert spec == {"policy": text}
    assert check_spec(spec).valid
