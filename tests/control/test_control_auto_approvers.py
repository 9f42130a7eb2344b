"""coord applies the policy's autoApprovers: a node's advertised routes and exit routes are
approved at once, with no admin, when the policy names the node (real NATS, keys and coord)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from control_helpers import SimAgent, make_agent

EXIT = ("0.0.0.0/0", "::/0")
POLICY = """{
  // alice's routers may offer 10.20.0.0/16 and anything inside it; tag:exit may be an exit node.
  "tagOwners": {"tag:exit": ["alice@"], "tag:lab": ["alice@"]},
  "autoApprovers": {
    "routes": {"10.20.0.0/16": ["alice@"], "10.30.0.0/16": ["tag:lab"]},
    "exitNode": ["tag:exit"],
  },
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}"""


@pytest.fixture
async def agents(control_plane) -> AsyncIterator[list[SimAgent]]:
    made: list[SimAgent] = []
    yield made
    for agent in made:
        await agent.close()
    control_plane.admin("DELETE", "/policy")


def put_policy(control_plane, text: str) -> None:
    import urllib.request

    request = urllib.request.Request(
        f"{control_plane.url}/api/v1/policy",
        data=text.encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {control_plane.admin_key}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def agent(control_plane, agents: list[SimAgent], name: str) -> SimAgent:
    made = make_agent(control_plane.url, f"{name}-{secrets.token_hex(3)}")
    agents.append(made)
    return made


def node(control_plane, agent: SimAgent) -> dict:
    assert agent.login_result is not None
    return control_plane.admin("GET", f"/nodes/{agent.login_result.node_id}")


async def test_a_route_the_policy_auto_approves_is_in_peers_allowed_ips_at_once(control_plane, agents):
    put_policy(control_plane, POLICY)
    key = control_plane.auth_key(reusable=True)
    router, viewer = agent(control_plane, agents, "router"), agent(control_plane, agents, "viewer")
    await router.login(key, routes=("10.20.1.0/24", "10.99.0.0/24"))
    await viewer.login(key)
    assert node(control_plane, router)["approved_routes"] == ["10.20.1.0/24"]
    viewer.watch(keepalive=1)
    rid = router.login_result.node_id
    netmap = await viewer.watcher.wait_for(lambda nm: nm.peer(rid) is not None, timeout=10)
    assert "10.20.1.0/24" in netmap.peer(rid).allowed_ips
    assert "10.99.0.0/24" not in netmap.peer(rid).allowed_ips


async def test_without_auto_approvers_a_route_waits_for_an_admin(control_plane, agents):
    put_policy(control_plane, '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')
    router = agent(control_plane, agents, "router")
    await router.login(control_plane.auth_key(), routes=("10.20.2.0/24",))
    assert node(control_plane, router)["approved_routes"] == []


async def test_an_exit_node_advertisement_is_approved_for_the_named_tag_only(control_plane, agents):
    put_policy(control_plane, POLICY)
    tagged, plain = agent(control_plane, agents, "exit"), agent(control_plane, agents, "plain")
    await tagged.login(control_plane.auth_key(tags=["tag:exit"]), routes=EXIT)
    await plain.login(control_plane.auth_key(), routes=EXIT)
    assert node(control_plane, tagged)["approved_routes"] == list(EXIT)
    assert node(control_plane, plain)["approved_routes"] == []


async def test_routes_advertised_later_through_update_are_approved(control_plane, agents):
    put_policy(control_plane, POLICY)
    router = agent(control_plane, agents, "router")
    await router.login(control_plane.auth_key())
    await router.client.update(router.node_key, advertised_routes=("10.20.3.0/24", "10.21.0.0/24"))
    assert node(control_plane, router)["approved_routes"] == ["10.20.3.0/24"]


async def test_setting_a_policy_approves_advertisements_that_were_waiting(control_plane, agents):
    router = agent(control_plane, agents, "router")
    await router.login(control_plane.auth_key(), routes=("10.20.4.0/24",))
    assert node(control_plane, router)["approved_routes"] == []
    put_policy(control_plane, POLICY)
    assert node(control_plane, router)["approved_routes"] == ["10.20.4.0/24"]


async def test_tagging_a_node_applies_the_tags_auto_approvals(control_plane, agents):
    put_policy(control_plane, POLICY)
    router = agent(control_plane, agents, "router")
    await router.login(control_plane.auth_key(), routes=("10.30.0.0/24",))
    assert node(control_plane, router)["approved_routes"] == []
    updated = control_plane.admin("POST", f"/nodes/{router.login_result.node_id}/tags", {"tags": ["tag:lab"]})
    assert updated["approved_routes"] == ["10.30.0.0/24"]


async def test_an_admin_approval_outside_the_auto_approvers_is_kept(control_plane, agents):
    put_policy(control_plane, POLICY)
    router = agent(control_plane, agents, "router")
    await router.login(control_plane.auth_key(), routes=("10.77.0.0/24",))
    rid = router.login_result.node_id
    control_plane.admin("POST", f"/nodes/{rid}/routes/approve", {"prefixes": ["10.77.0.0/24"]})
    await router.client.update(router.node_key, advertised_routes=("10.77.0.0/24", "10.20.5.0/24"))
    assert node(control_plane, router)["approved_routes"] == ["10.77.0.0/24", "10.20.5.0/24"]
