"""The operator against a real kube-apiserver and a real control plane: ACL and MeshNode
resources become coord configuration, and coord's state comes back into their status.

The first run on a machine builds kube-apiserver and etcd from their Go modules (cached under
~/.cache/wiremesh/kube), hence the long timeout then; later runs start in a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.error
import urllib.request
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from operator_kit import coord_node, eventually, login, new_key, secret_data

from wiremesh.agent.control import ControlClient, ControlRefused, NetmapWatcher
from wiremesh.core import crypto
from wiremesh.lab import kube

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300 if kube.is_built() else kube.BUILD_TIMEOUT + 300),
]


POLICY = """{
  // everyone may reach tag:web on 443
  "tagOwners": {"tag:web": ["alice@example.com"]},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
  ],
  "tests": [{"src": "alice@example.com", "accept": ["tag:web:443"]}],
}
"""

BROKEN = """{
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["*:22"]},
    {"action": "accept", "src": ["nobody-knows-this"], "dst": ["*:*"]},
  ],
}
"""


def coord_policy(control_plane: Any) -> Any:
    return control_plane.admin("GET", "/policy")


@pytest.fixture
def acl(k8s, operator, control_plane):
    """Deletes the ACL after the test and waits until the operator has cleared coord's policy."""
    yield "default"
    k8s.delete("acls", "default")
    eventually(lambda: k8s.get("acls", "default") is None, "ACL deleted (finalizer released)", operator)


# ---- CRD validation by the real API server ----


def test_meshnode_with_a_route_that_is_not_a_cidr_is_refused_by_the_api_server(k8s):
    with pytest.raises(ApiException) as refused:
        k8s.create("meshnodes", "MeshNode", "bad-route", {"advertiseRoutes": ["10.0.0.0/33"]})
    assert refused.value.status == 422
    assert "must be a CIDR" in refused.value.body


def test_meshnode_approving_a_route_it_does_not_advertise_is_refused(k8s):
    spec = {"advertiseRoutes": ["10.1.0.0/24"], "approvedRoutes": ["10.2.0.0/24"]}
    with pytest.raises(ApiException) as refused:
        k8s.create("meshnodes", "MeshNode", "bad-approval", spec)
    assert refused.value.status == 422
    assert "must also be in advertiseRoutes" in refused.value.body


def test_meshnode_with_a_malformed_tag_is_refused(k8s):
    with pytest.raises(ApiException) as refused:
        k8s.create("meshnodes", "MeshNode", "bad-tag", {"tags": ["web"]})
    assert refused.value.status == 422
    assert "spec.tags" in refused.value.body


def test_acl_not_named_default_is_refused(k8s):
    with pytest.raises(ApiException) as refused:
        k8s.create("acls", "ACL", "second", {"policy": POLICY})
    assert refused.value.status == 422
    assert "one ACL per mesh" in refused.value.body


# ---- ACL -> coord policy ----


def test_applied_acl_becomes_coords_policy(k8s, operator, control_plane, acl):
    k8s.create("acls", "ACL", acl, {"policy": POLICY})
    eventually(
        lambda: coord_policy(control_plane)["policy"] == POLICY, "coord has the ACL's policy", operator
    )
    status = eventually(
        lambda: (
            (k8s.get("acls", acl) or {}).get("status", {}).get("appliedGeneration") == 1
            and k8s.get("acls", acl)["status"]
        ),
        "ACL status applied",
        operator,
    )
    assert status["valid"] is True
    assert (status["rules"], status["testsSummary"]) == (1, "1/1")


def test_invalid_acl_reports_the_error_line_and_coord_keeps_its_policy(k8s, operator, control_plane, acl):
    k8s.create("acls", "ACL", acl, {"policy": POLICY})
    eventually(lambda: coord_policy(control_plane)["policy"] == POLICY, "first policy applied", operator)
    before = coord_policy(control_plane)

    k8s.patch_spec("acls", acl, {"policy": BROKEN})
    status = eventually(
        lambda: (
            (k8s.get("acls", acl) or {}).get("status", {}).get("observedGeneration") == 2
            and k8s.get("acls", acl)["status"]
        ),
        "ACL status for generation 2",
        operator,
    )
    assert status["valid"] is False
    error = status["errors"][0]
    assert (error["line"], error["col"]) == (4, 34)  # the unknown source in the second rule
    assert "nobody-knows-this" in status["errors"][0]["message"]
    assert status["appliedGeneration"] == 1  # what is in force is still generation 1
    assert coord_policy(control_plane) == before


def test_invalid_acl_is_announced_by_a_warning_event(k8s, operator, control_plane, acl):
    k8s.create("acls", "ACL", acl, {"policy": BROKEN})

    def warned() -> bool:
        return any(e.reason == "PolicyInvalid" and e.type == "Warning" for e in k8s.events_for(acl))

    eventually(warned, "a PolicyInvalid event", operator)


def test_structured_acl_is_applied_as_json(k8s, operator, control_plane, acl):
    spec = {"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}
    k8s.create("acls", "ACL", acl, spec)

    def applied() -> bool:
        text = coord_policy(control_plane)["policy"]
        return text is not None and json.loads(text)["acls"] == spec["acls"]

    eventually(applied, "coord has the structured policy", operator)


def test_deleting_the_acl_clears_coords_policy(k8s, operator, control_plane):
    k8s.create("acls", "ACL", "default", {"policy": POLICY})
    eventually(lambda: coord_policy(control_plane)["policy"] == POLICY, "policy applied", operator)
    k8s.delete("acls", "default")
    eventually(lambda: coord_policy(control_plane)["policy"] is None, "coord policy cleared", operator)
    eventually(lambda: k8s.get("acls", "default") is None, "ACL gone", operator)


def test_acl_applied_while_coord_is_down_reaches_coord_once_it_is_back(k8s, operator, control_plane, acl):
    control_plane.coord.stop()
    try:
        k8s.create("acls", "ACL", acl, {"policy": POLICY})
        eventually(lambda: "unreachable" in operator.logs(), "the operator meeting coord down", operator)
    finally:
        control_plane.coord.start()
    eventually(
        lambda: coord_policy(control_plane)["policy"] == POLICY, "policy applied after restart", operator
    )


# ---- MeshNode -> pre-auth key, node, status ----


@pytest.fixture
def meshnode_name(k8s):
    """A fresh MeshNode name; the MeshNode is deleted after the test whatever happened."""
    name = "mn-" + secrets.token_hex(3)
    yield name
    k8s.delete("meshnodes", name)


def wait_secret(k8s, operator, name: str) -> dict[str, str]:
    secret_name = f"meshnode-{name}-authkey"
    return eventually(
        lambda: secret_data(k8s, operator.namespace, secret_name), f"Secret {secret_name}", operator
    )


def test_meshnode_gets_a_secret_with_an_auth_key_that_registers_the_node(
    k8s, operator, control_plane, meshnode_name
):
    name = meshnode_name
    k8s.create("meshnodes", "MeshNode", name, {"user": "alice", "advertiseRoutes": ["10.44.0.0/24"]})
    data = wait_secret(k8s, operator, name)
    assert data["hostname"] == name and data["advertise-routes"] == "10.44.0.0/24"

    result = login(control_plane.url, data["hostname"], data["authkey"], ("10.44.0.0/24",))
    assert result.user == "alice"
    status = eventually(
        lambda: (
            (k8s.get("meshnodes", name) or {}).get("status", {}).get("nodeId") == result.node_id
            and k8s.get("meshnodes", name)["status"]
        ),
        "MeshNode status names the registered node",
        operator,
    )
    assert f"{status['addresses']['ipv4']}/32" in result.addresses
    assert status["nodeKey"] and status["advertisedRoutes"] == ["10.44.0.0/24"]


def test_meshnode_auth_key_is_one_off(k8s, operator, control_plane, meshnode_name):
    name = meshnode_name
    k8s.create("meshnodes", "MeshNode", name, {})
    data = wait_secret(k8s, operator, name)
    login(control_plane.url, name, data["authkey"])
    with pytest.raises(ControlRefused, match="auth key already used"):
        login(control_plane.url, name + "-again", data["authkey"])


def test_meshnode_approved_routes_and_tags_are_pushed_to_coord(k8s, operator, control_plane, meshnode_name):
    name = meshnode_name
    spec = {"tags": ["tag:router"], "advertiseRoutes": ["10.45.0.0/24"], "approvedRoutes": ["10.45.0.0/24"]}
    k8s.create("meshnodes", "MeshNode", name, spec)
    data = wait_secret(k8s, operator, name)
    result = login(control_plane.url, name, data["authkey"], ("10.45.0.0/24",))

    def pushed() -> bool:
        node = coord_node(control_plane, result.node_id) or {}
        return node.get("approved_routes") == ["10.45.0.0/24"] and node.get("tags") == ["tag:router"]

    eventually(pushed, "route approved and tag set in coord", operator)


def test_deleting_a_meshnode_removes_its_node_from_coord(k8s, operator, control_plane, meshnode_name):
    name = meshnode_name
    k8s.create("meshnodes", "MeshNode", name, {})
    data = wait_secret(k8s, operator, name)
    result = login(control_plane.url, name, data["authkey"])
    eventually(
        lambda: (k8s.get("meshnodes", name) or {}).get("status", {}).get("nodeId") == result.node_id,
        "node registered in status",
        operator,
    )
    k8s.delete("meshnodes", name)
    eventually(lambda: coord_node(control_plane, result.node_id) is None, "node gone from coord", operator)
    eventually(lambda: k8s.get("meshnodes", name) is None, "MeshNode gone (finalizer released)", operator)
    assert secret_data(k8s, operator.namespace, f"meshnode-{name}-authkey") is None


async def test_meshnode_status_shows_the_node_online_while_its_agent_is_connected(
    k8s, operator, control_plane, meshnode_name
):
    name = meshnode_name
    k8s.create("meshnodes", "MeshNode", name, {})
    data = await asyncio.to_thread(wait_secret, k8s, operator, name)
    client = ControlClient(control_plane.url, crypto.generate_private_key(), timeout=10)
    node_key = new_key()
    await client.login(node_key, new_key(), name, auth_key=data["authkey"])
    watcher = NetmapWatcher(client, node_key, keepalive=2).start()  # the agent's netmap stream
    try:
        await watcher.wait_for(lambda netmap: True)

        def online() -> Any:
            status = (k8s.get("meshnodes", name) or {}).get("status", {})
            return status.get("online") is True and status

        status = await asyncio.to_thread(eventually, online, "MeshNode online", operator)
        assert status["nodeKey"] == node_key
        assert status["path"] != "offline" and status["lastSeen"]
    finally:
        await watcher.stop()
        await client.aclose()


def test_kubectl_get_meshnodes_shows_hostname_address_and_online(k8s, operator, control_plane, meshnode_name):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {})
    data = wait_secret(k8s, operator, meshnode_name)
    result = login(control_plane.url, meshnode_name, data["authkey"])
    eventually(
        lambda: (k8s.get("meshnodes", meshnode_name) or {}).get("status", {}).get("nodeId") == result.node_id,
        "node registered in status",
        operator,
    )
    # What kubectl asks for: the server-side table built from the CRD's printer columns.
    server = k8s.server
    request = urllib.request.Request(
        f"{server.url}/apis/wiremesh.dev/v1alpha1/meshnodes/{meshnode_name}",
        headers={
            "Authorization": f"Bearer {server.token}",
            "Accept": "application/json;as=Table;v=v1;g=meta.k8s.io",
        },
    )
    with urllib.request.urlopen(request, timeout=10, context=server.ssl_context()) as response:
        table = json.loads(response.read())
    columns = [c["name"] for c in table["columnDefinitions"]]
    row = dict(zip(columns, table["rows"][0]["cells"], strict=True))
    assert row["Hostname"] == meshnode_name
    assert f"{row['IPv4']}/32" in result.addresses
    assert row["Online"] is False and row["Path"] == "offline"  # logged in, no netmap stream yet


def test_ephemeral_meshnode_registers_an_ephemeral_node(k8s, operator, control_plane, meshnode_name):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {"ephemeral": True})
    data = wait_secret(k8s, operator, meshnode_name)
    assert login(control_plane.url, meshnode_name, data["authkey"]).ephemeral is True


def test_routes_edited_on_a_meshnode_are_rewritten_into_its_secret_with_the_same_key(
    k8s, operator, meshnode_name
):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {"advertiseRoutes": ["10.46.0.0/24"]})
    first = wait_secret(k8s, operator, meshnode_name)
    k8s.patch_spec("meshnodes", meshnode_name, {"advertiseRoutes": ["10.46.0.0/24", "10.47.0.0/24"]})

    def rewritten() -> Any:
        data = secret_data(k8s, operator.namespace, f"meshnode-{meshnode_name}-authkey") or {}
        return data.get("advertise-routes") == "10.46.0.0/24,10.47.0.0/24" and data

    assert eventually(rewritten, "Secret rewritten", operator)["authkey"] == first["authkey"]


def test_tags_edited_on_a_registered_meshnode_reach_coord(k8s, operator, control_plane, meshnode_name):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {})
    data = wait_secret(k8s, operator, meshnode_name)
    result = login(control_plane.url, meshnode_name, data["authkey"])
    eventually(
        lambda: (k8s.get("meshnodes", meshnode_name) or {}).get("status", {}).get("nodeId") == result.node_id,
        "node registered in status",
        operator,
    )
    k8s.patch_spec("meshnodes", meshnode_name, {"tags": ["tag:db"]})
    eventually(
        lambda: (coord_node(control_plane, result.node_id) or {}).get("tags") == ["tag:db"],
        "coord node tagged",
        operator,
    )


def test_node_deleted_in_coord_by_an_admin_shows_as_gone_in_status(
    k8s, operator, control_plane, meshnode_name
):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {})
    data = wait_secret(k8s, operator, meshnode_name)
    result = login(control_plane.url, meshnode_name, data["authkey"])
    eventually(
        lambda: (k8s.get("meshnodes", meshnode_name) or {}).get("status", {}).get("nodeId") == result.node_id,
        "node registered in status",
        operator,
    )
    control_plane.admin("DELETE", f"/nodes/{result.node_id}")  # `wiremesh admin nodes delete`

    def gone() -> Any:
        status = (k8s.get("meshnodes", meshnode_name) or {}).get("status", {})
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        registered = conditions.get("Registered", {})
        return status.get("nodeId") is None and registered.get("reason") == "NodeGone" and status

    status = eventually(gone, "status says the node is gone", operator)
    assert status["online"] is False and status["path"] == "not registered"


def registered(k8s, operator, name: str, node_id: int) -> None:
    eventually(
        lambda: (k8s.get("meshnodes", name) or {}).get("status", {}).get("nodeId") == node_id,
        "node registered in status",
        operator,
    )


def registered_reason(k8s, name: str) -> str | None:
    status = (k8s.get("meshnodes", name) or {}).get("status", {})
    found = [c["reason"] for c in status.get("conditions", []) if c["type"] == "Registered"]
    return found[0] if found else None


def test_route_dropped_from_approved_routes_is_withdrawn_in_coord(
    k8s, operator, control_plane, meshnode_name
):
    routes = ["10.48.0.0/24", "10.49.0.0/24"]
    k8s.create("meshnodes", "MeshNode", meshnode_name, {"advertiseRoutes": routes, "approvedRoutes": routes})
    data = wait_secret(k8s, operator, meshnode_name)
    result = login(control_plane.url, meshnode_name, data["authkey"], tuple(routes))
    eventually(
        lambda: (coord_node(control_plane, result.node_id) or {}).get("approved_routes") == routes,
        "both routes approved in coord",
        operator,
    )
    k8s.patch_spec("meshnodes", meshnode_name, {"approvedRoutes": ["10.48.0.0/24"]})
    node = eventually(
        lambda: (
            (n := coord_node(control_plane, result.node_id) or {}).get("approved_routes") == ["10.48.0.0/24"]
            and n
        ),
        "10.49.0.0/24 withdrawn in coord",
        operator,
    )
    assert node["advertised_routes"] == routes  # still offered, no longer approved


def test_route_approved_by_hand_in_coord_is_withdrawn_when_the_spec_does_not_list_it(
    k8s, operator, control_plane, meshnode_name
):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {"advertiseRoutes": ["10.50.0.0/24"]})
    data = wait_secret(k8s, operator, meshnode_name)
    result = login(control_plane.url, meshnode_name, data["authkey"], ("10.50.0.0/24",))
    registered(k8s, operator, meshnode_name, result.node_id)
    control_plane.admin("POST", f"/nodes/{result.node_id}/routes/approve", {"prefixes": ["10.50.0.0/24"]})
    eventually(
        lambda: (coord_node(control_plane, result.node_id) or {}).get("approved_routes") == [],
        "hand-made approval withdrawn",
        operator,
    )


def test_node_deleted_in_coord_gets_a_new_one_off_key_that_rejoins(
    k8s, operator, control_plane, meshnode_name
):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {})
    first = wait_secret(k8s, operator, meshnode_name)
    result = login(control_plane.url, meshnode_name, first["authkey"])
    registered(k8s, operator, meshnode_name, result.node_id)
    control_plane.admin("DELETE", f"/nodes/{result.node_id}")

    def reissued() -> Any:
        data = secret_data(k8s, operator.namespace, f"meshnode-{meshnode_name}-authkey") or {}
        return data.get("authkey") not in (None, first["authkey"]) and data

    second = eventually(reissued, "a new key in the Secret", operator)
    eventually(lambda: registered_reason(k8s, meshnode_name) == "NodeGone", "status shows it gone", operator)
    again = login(control_plane.url, meshnode_name, second["authkey"])  # what a restarted agent does
    eventually(
        lambda: (
            registered_reason(k8s, meshnode_name) == "NodeRegistered"
            and k8s.get("meshnodes", meshnode_name)["status"]["nodeId"] == again.node_id
        ),
        "registered again",
        operator,
    )


def test_node_deleted_in_coord_says_how_to_rejoin_in_its_condition_and_event(
    k8s, operator, control_plane, meshnode_name
):
    k8s.create("meshnodes", "MeshNode", meshnode_name, {})
    data = wait_secret(k8s, operator, meshnode_name)
    result = login(control_plane.url, meshnode_name, data["authkey"])
    registered(k8s, operator, meshnode_name, result.node_id)
    control_plane.admin("DELETE", f"/nodes/{result.node_id}")

    def gone_condition() -> Any:
        status = (k8s.get("meshnodes", meshnode_name) or {}).get("status", {})
        found = [c for c in status.get("conditions", []) if c["type"] == "Registered"]
        return found and found[0]["reason"] == "NodeGone" and found[0]

    condition = eventually(gone_condition, "NodeGone condition", operator)
    assert condition["status"] == "False"
    assert f"meshnode-{meshnode_name}-authkey" in condition["message"] and "rejoin" in condition["message"]
    eventually(
        lambda: any(e.reason == "NodeGone" and e.type == "Warning" for e in k8s.events_for(meshnode_name)),
        "a NodeGone Warning event",
        operator,
    )


# ---- cluster Nodes -> MeshNodes ----


def test_cluster_node_is_mirrored_as_a_meshnode_advertising_its_pod_cidr(k8s, operator):
    name = "worker-" + secrets.token_hex(3)
    k8s.core.create_node({"metadata": {"name": name}, "spec": {"podCIDR": "10.244.7.0/24"}})
    try:
        mirrored = eventually(lambda: k8s.get("meshnodes", name), "mirrored MeshNode", operator)
        assert mirrored["spec"]["advertiseRoutes"] == ["10.244.7.0/24"]
        assert mirrored["spec"]["approvedRoutes"] == ["10.244.7.0/24"]
        assert mirrored["metadata"]["ownerReferences"][0]["kind"] == "Node"
    finally:
        k8s.core.delete_node(name)
    eventually(lambda: k8s.get("meshnodes", name) is None, "mirror removed with the Node", operator)


def test_mirrored_node_gets_its_one_off_key_in_the_node_keys_namespace_and_joins_with_it(
    k8s, operator, control_plane
):
    name = "worker-" + secrets.token_hex(3)
    k8s.core.create_node({"metadata": {"name": name}, "spec": {"podCIDR": "10.244.9.0/24"}})
    try:
        secret = f"meshnode-{name}-authkey"
        data = eventually(
            lambda: secret_data(k8s, operator.node_keys_namespace, secret), "node key Secret", operator
        )
        assert secret_data(k8s, operator.namespace, secret) is None  # not beside the operator's own
        assert (data["hostname"], data["advertise-routes"]) == (name, "10.244.9.0/24")
        result = login(control_plane.url, data["hostname"], data["authkey"], ("10.244.9.0/24",))
        registered(k8s, operator, name, result.node_id)
        status = k8s.get("meshnodes", name)["status"]
        assert status["authKeySecret"] == f"{operator.node_keys_namespace}/{secret}"
        eventually(
            lambda: (
                (coord_node(control_plane, result.node_id) or {}).get("approved_routes") == ["10.244.9.0/24"]
            ),
            "pod CIDR approved",
            operator,
        )
    finally:
        k8s.core.delete_node(name)
    eventually(lambda: k8s.get("meshnodes", name) is None, "mirror removed with the Node", operator)
    assert secret_data(k8s, operator.node_keys_namespace, f"meshnode-{name}-authkey") is None


def test_policy_changed_behind_the_operators_back_is_put_back(k8s, operator, control_plane, acl):
    k8s.create("acls", "ACL", acl, {"policy": POLICY})
    eventually(lambda: coord_policy(control_plane)["policy"] == POLICY, "policy applied", operator)
    control_plane.admin("DELETE", "/policy")  # an admin clears it with the CLI
    eventually(lambda: coord_policy(control_plane)["policy"] == POLICY, "policy put back", operator)


# ---- binding: a MeshNode is the node that registered with its own pre-auth key ----


async def test_a_node_renamed_to_a_workers_hostname_gets_neither_its_tag_nor_its_routes(
    k8s, operator, control_plane, meshnode_name
):
    """The MeshNode declares a worker (tag, approved route). Another node of the same user, with
    a pre-auth key of its own, registers advertising the same route and renames itself to the
    worker's hostname before the worker joins. Bound by hostname, it got the worker's tag and
    route; bound by the MeshNode's own pre-auth key, only the worker does."""
    name, route = meshnode_name, "10.77.0.0/24"
    spec = {"tags": ["tag:k8s-node"], "advertiseRoutes": [route], "approvedRoutes": [route]}
    k8s.create("meshnodes", "MeshNode", name, spec)
    data = await asyncio.to_thread(wait_secret, k8s, operator, name)

    impostor_key = control_plane.admin("POST", "/authkeys", {"user": "default"})["key"]
    impostor = ControlClient(control_plane.url, crypto.generate_private_key(), timeout=10)
    impostor_node_key = new_key()
    found = await impostor.login(
        impostor_node_key, new_key(), "laptop", auth_key=impostor_key, advertised_routes=(route,)
    )
    await impostor.update(impostor_node_key, hostname=data["hostname"])
    assert (coord_node(control_plane, found.node_id) or {})["hostname"] == data["hostname"]

    # Two polls of this MeshNode that began after the rename, neither of which bound a node.
    unbound = f"meshnode_unbound name={name} "

    def polls() -> int:
        return operator.log.read_text(errors="replace").count(unbound)

    seen = polls()
    await asyncio.to_thread(eventually, lambda: polls() >= seen + 2, "two polls after the rename", operator)
    assert (k8s.get("meshnodes", name) or {}).get("status", {}).get("nodeId") is None

    worker = await asyncio.to_thread(login, control_plane.url, data["hostname"], data["authkey"], (route,))

    def worker_configured() -> bool:
        node = coord_node(control_plane, worker.node_id) or {}
        return node.get("tags") == ["tag:k8s-node"] and node.get("approved_routes") == [route]

    await asyncio.to_thread(
        eventually, worker_configured, "the worker tagged and its route approved", operator
    )
    status = (k8s.get("meshnodes", name) or {}).get("status", {})
    assert status["nodeId"] == worker.node_id and status["nodeAuthKeyId"] == status["authKeyId"]
    impostor_node = coord_node(control_plane, found.node_id) or {}
    assert impostor_node["tags"] == [] and impostor_node["approved_routes"] == []
    await impostor.aclose()
