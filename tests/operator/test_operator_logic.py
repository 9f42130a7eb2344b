"""The operator's pure side: policy text and errors for ACLs, node matching and changes for
MeshNodes. No API server here (tests/operator/test_operator_kube.py runs against a real one)."""

from __future__ import annotations

import pathlib

import yaml

from wiremesh.operator import acl, meshnode

ROOT = pathlib.Path(__file__).resolve().parents[2]

GOOD = """{
  // web servers may be reached by everyone on 443
  "tagOwners": {"tag:web": ["alice@example.com"]},
  "acls": [
    {"action": "accept", "src": ["*"], "dst": ["tag:web:443"]},
  ],
  "tests": [{"src": "alice@example.com", "accept": ["tag:web:443"], "deny": ["tag:web:22"]}],
}
"""


def test_valid_text_policy_is_sent_verbatim_with_rule_and_test_counts():
    checked = acl.check_spec({"policy": GOOD})
    assert checked.valid
    assert checked.text == GOOD
    assert (checked.rules, checked.tests) == (1, 1)


def test_invalid_text_policy_reports_line_and_column():
    text = '{\n  "acls": [\n    {"action": "accept", "src": ["bogus"], "dst": ["*:*"]},\n  ],\n}\n'
    checked = acl.check_spec({"policy": text})
    assert not checked.valid
    first = checked.problems[0]
    assert (first.line, first.col) == (3, 34)  # the "bogus" string
    assert "bogus" in first.message


def test_failing_policy_test_is_a_problem_with_its_position():
    text = GOOD.replace('"deny": ["tag:web:22"]', '"deny": ["tag:web:443"]')
    checked = acl.check_spec({"policy": text})
    assert not checked.valid
    assert checked.problems[0].message.startswith("test failed")
    assert checked.problems[0].line is not None


def test_structured_policy_becomes_json_text_and_errors_carry_a_path():
    spec = {"acls": [{"action": "accept", "src": ["*"], "dst": ["nonsense"]}]}
    checked = acl.check_spec(spec)
    assert not checked.valid
    assert checked.problems[0].path.startswith("acls[0]")
    ok = acl.check_spec({"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]})
    assert ok.valid and '"acls"' in ok.text


def test_coord_rejection_lines_parse_into_line_column_and_path():
    problems = acl.parse_coord_errors(
        [
            "policy:3:32: error: unknown src 'bogus': not a user",
            "policy:9:5: test failed: alice may not reach tag:web:443",
            "policy: acls[0].dst: error: bad port",
            "something else entirely",
        ]
    )
    assert (problems[0].line, problems[0].col, problems[0].message) == (
        3,
        32,
        "unknown src 'bogus': not a user",
    )
    assert problems[1].message.startswith("test failed: ") and problems[1].line == 9
    assert (problems[2].path, problems[2].line) == ("acls[0].dst", None)
    assert problems[3].message == "something else entirely"


def test_condition_keeps_its_transition_time_while_status_is_unchanged():
    old = [acl.condition("Applied", True, "PolicyApplied", "v1", "2026-01-01T00:00:00Z")]
    same = acl.merge_conditions(
        old, acl.condition("Applied", True, "PolicyApplied", "v2", "2026-02-01T00:00:00Z")
    )
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and same[0]["message"] == "v2"
    flipped = acl.merge_conditions(
        old, acl.condition("Applied", False, "PolicyInvalid", "x", "2026-02-01T00:00:00Z")
    )
    assert flipped == [acl.condition("Applied", False, "PolicyInvalid", "x", "2026-02-01T00:00:00Z")]


def node(**fields):
    base = {
        "id": 1, "hostname": "web-1", "user": "default", "tags": [], "expired": False,
        "advertised_routes": [], "approved_routes": [], "online": True, "endpoints": [],
    }  # fmt: skip
    return {**base, **fields}


def test_meshnode_spec_defaults_hostname_to_its_name_and_normalises_lists():
    desired = meshnode.Desired.from_resource("web-1", {"tags": ["tag:b", "tag:a", "tag:b"]})
    assert desired.hostname == "web-1" and desired.user == "default"
    assert desired.tags == ("tag:a", "tag:b")


def test_node_is_found_by_the_meshnodes_own_pre_auth_key_never_by_hostname():
    nodes = [
        node(id=1, auth_key_id=7),
        node(id=2, auth_key_id=8, hostname="web-1"),  # took the name; registered with another key
        node(id=3, auth_key_id=7, hostname="renamed"),
        node(id=4, auth_key_id=None),
    ]
    assert meshnode.find_node(nodes, None, {7}, set())["id"] == 3  # newest with the key
    assert meshnode.find_node(nodes, None, {7}, {3})["id"] == 1  # claimed by another MeshNode
    assert meshnode.find_node(nodes, None, {9}, set()) is None  # the key was never used
    assert meshnode.find_node(nodes, None, set(), set()) is None  # no key issued yet


def test_the_recorded_node_stays_bound_only_while_it_carries_a_key_of_the_meshnode():
    nodes = [node(id=1, auth_key_id=7), node(id=2, auth_key_id=8), node(id=5, auth_key_id=7)]
    assert meshnode.find_node(nodes, 1, {7}, set())["id"] == 1  # a recorded id wins
    # Re-registered with a key this MeshNode did not issue: no longer its node.
    assert meshnode.find_node(nodes, 2, {7}, set())["id"] == 5
    assert meshnode.find_node([node(id=2, auth_key_id=8)], 2, {7}, set()) is None
    assert meshnode.find_node(nodes, 9, {6}, set()) is None  # recorded node gone


def test_the_keys_that_vouch_for_a_meshnode_come_from_its_status():
    assert meshnode.key_ids({"authKeyId": 4, "nodeAuthKeyId": 3}) == {3, 4}
    assert meshnode.key_ids({"authKeyId": None, "nodeAuthKeyId": True}) == set()
    assert meshnode.key_ids({}) == set()


def test_changes_approve_only_advertised_routes_and_retag_on_difference():
    desired = meshnode.Desired.from_resource(
        "web-1", {"tags": ["tag:web"], "approvedRoutes": ["10.1.0.0/24", "10.2.0.0/24"]}
    )
    wanted = meshnode.changes(desired, node(advertised_routes=["10.1.0.0/24"]))
    assert wanted.tags == ("tag:web",)
    assert wanted.approve == ("10.1.0.0/24",)
    assert wanted.waiting_routes == ("10.2.0.0/24",)
    settled = meshnode.changes(
        desired, node(tags=["tag:web"], advertised_routes=["10.1.0.0/24"], approved_routes=["10.1.0.0/24"])
    )
    assert settled.empty


def test_changes_withdraw_approvals_the_spec_no_longer_lists():
    desired = meshnode.Desired.from_resource(
        "web-1", {"advertiseRoutes": ["10.1.0.0/24", "10.2.0.0/24"], "approvedRoutes": ["10.1.0.0/24"]}
    )
    current = node(
        advertised_routes=["10.1.0.0/24", "10.2.0.0/24"], approved_routes=["10.1.0.0/24", "10.2.0.0/24"]
    )
    wanted = meshnode.changes(desired, current)
    assert (wanted.approve, wanted.unapprove) == ((), ("10.2.0.0/24",))
    assert not wanted.empty


def test_node_status_carries_addresses_key_and_a_path_summary():
    status = meshnode.node_status(
        node(ipv4="100.64.0.1", ipv6="fd7a:115c:a1e0::1", node_key="nk", home_relay=2,
             endpoints=["1.2.3.4:41641"], last_seen=0.0)
    )  # fmt: skip
    assert status["addresses"] == {"ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1"}
    assert status["nodeKey"] == "nk" and status["online"] is True
    assert status["path"] == "relay 2, 1 endpoint"
    assert status["lastSeen"] == "1970-01-01T00:00:00Z"
    assert meshnode.path_summary(node(online=False)) == "offline"


def test_crd_files_declare_cluster_scoped_v1alpha1_with_status_subresource():
    for name, kind in (("meshnodes", "MeshNode"), ("acls", "ACL")):
        crd = yaml.safe_load((ROOT / f"charts/wiremesh/crds/{name}.wiremesh.dev.yaml").read_text())
        assert crd["spec"]["names"]["kind"] == kind
        assert crd["spec"]["scope"] == "Cluster"
        version = crd["spec"]["versions"][0]
        assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
        assert version["additionalPrinterColumns"]


def test_cluster_node_mirror_advertises_and_approves_its_pod_cidrs():
    spec = meshnode.mirror_spec("Worker.eu-1", {"podCIDRs": ["10.244.1.0/24", "fd00:1::/64"]}, ("tag:k8s",))
    assert spec["hostname"] == "worker-eu-1"
    assert spec["advertiseRoutes"] == spec["approvedRoutes"] == ["10.244.1.0/24", "fd00:1::/64"]


def test_cluster_node_mirror_leaves_approval_to_an_admin_when_asked():
    spec = meshnode.mirror_spec("w", {"podCIDR": "10.244.1.0/24"}, ("tag:k8s",), approve_routes=False)
    assert spec["advertiseRoutes"] == ["10.244.1.0/24"] and "approvedRoutes" not in spec
    assert meshnode.pod_cidrs({"podCIDR": "10.0.0.0/24"}) == ("10.0.0.0/24",)
    assert meshnode.pod_cidrs({}) == ()
