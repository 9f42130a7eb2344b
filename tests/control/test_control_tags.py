"""Tags against the policy's tagOwners, through a real coord: what an admin may apply, what a
node may ask for itself (and hears back when refused), and what a policy change leaves alone."""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from control_helpers import SimAgent, make_agent

OWNERS = {
    "groups": {"group:ops": ["bob@"]},
    "tagOwners": {"tag:web": ["alice@"], "tag:ops": ["group:ops"], "tag:db": []},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}


def set_policy(plane: Any, policy: dict[str, Any] | None) -> None:
    if policy is None:
        plane.admin("DELETE", "/policy")
        return
    request = urllib.request.Request(
        f"{plane.url}/api/v1/policy",
        data=json.dumps(policy).encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {plane.admin_key}"},
    )
    with urllib.request.urlopen(request, timeout=10):
        pass


def refused(plane: Any, method: str, path: str, body: Any) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as info:
        plane.admin(method, path, body)
    return info.value.code, json.loads(info.value.read())["detail"]


@pytest.fixture(autouse=True)
def _no_policy_left_behind(control_plane: Any) -> Iterator[None]:
    yield
    with contextlib.suppress(Exception):
        set_policy(control_plane, None)


@contextlib.asynccontextmanager
async def node_of(plane: Any, user: str, tags: tuple[str, ...] = ()) -> AsyncIterator[SimAgent]:
    agent = make_agent(plane.url, f"{user}-host")
    try:
        await agent.login(plane.auth_key(user=user), tags=tags)
        yield agent
    finally:
        await agent.close()


def stored_tags(plane: Any, node_id: int) -> list[str]:
    return list(plane.admin("GET", f"/nodes/{node_id}")["tags"])


# ---- the admin API


async def test_admin_tag_not_in_tag_owners_is_refused_naming_it_and_nothing_changes(control_plane):
    async with node_of(control_plane, "alice") as agent:
        node_id = agent.login_result.node_id
        control_plane.admin("POST", f"/nodes/{node_id}/tags", {"tags": ["tag:before"]})
        set_policy(control_plane, OWNERS)
        code, detail = refused(
            control_plane, "POST", f"/nodes/{node_id}/tags", {"tags": ["tag:web", "tag:nope"]}
        )
        assert code == 400
        assert "tag:nope" in detail and "tagOwners" in detail and "tag:web" not in detail
        assert stored_tags(control_plane, node_id) == ["tag:before"]


async def test_admin_may_apply_any_tag_the_policy_defines(control_plane):
    set_policy(control_plane, OWNERS)
    async with node_of(control_plane, "carol") as agent:
        node_id = agent.login_result.node_id
        # carol owns none of them: the admin's say-so is enough for a defined tag.
        control_plane.admin("POST", f"/nodes/{node_id}/tags", {"tags": ["tag:db", "tag:web"]})
        assert stored_tags(control_plane, node_id) == ["tag:db", "tag:web"]


async def test_admin_may_apply_any_tag_when_no_policy_is_set(control_plane):
    async with node_of(control_plane, "alice") as agent:
        node_id = agent.login_result.node_id
        control_plane.admin("POST", f"/nodes/{node_id}/tags", {"tags": ["tag:anything"]})
        assert stored_tags(control_plane, node_id) == ["tag:anything"]


def test_auth_key_with_a_tag_not_in_tag_owners_is_refused_and_none_is_created(control_plane):
    set_policy(control_plane, OWNERS)
    before = len(control_plane.admin("GET", "/authkeys"))
    code, detail = refused(control_plane, "POST", "/authkeys", {"user": "alice", "tags": ["tag:nope"]})
    assert code == 400 and "tag:nope" in detail
    assert len(control_plane.admin("GET", "/authkeys")) == before


def test_auth_key_with_a_defined_tag_is_created(control_plane):
    set_policy(control_plane, OWNERS)
    created = control_plane.admin("POST", "/authkeys", {"user": "alice", "tags": ["tag:db"]})
    assert created["tags"] == ["tag:db"]


# ---- tags a node asks for (wiremeshd --advertise-tags)


async def test_node_is_granted_a_requested_tag_its_user_owns(control_plane):
    set_policy(control_plane, OWNERS)
    async with node_of(control_plane, "alice", tags=("tag:web",)) as agent:
        assert agent.login_result.tags == ("tag:web",)
        assert agent.login_result.refused_tags == ()
        assert stored_tags(control_plane, agent.login_result.node_id) == ["tag:web"]


async def test_node_is_granted_a_tag_owned_by_a_group_of_its_user(control_plane):
    set_policy(control_plane, OWNERS)
    async with node_of(control_plane, "bob", tags=("tag:ops",)) as agent:
        assert agent.login_result.tags == ("tag:ops",)


async def test_requested_tags_the_user_does_not_own_are_refused_and_reported(control_plane):
    set_policy(control_plane, OWNERS)
    async with node_of(control_plane, "alice", tags=("tag:web", "tag:ops", "tag:nope")) as agent:
        result = agent.login_result
        assert result.tags == ("tag:web",)
        assert result.refused_tags == ("tag:ops", "tag:nope")
        assert "tag:ops: user alice does not own it" in result.tags_error
        assert "tag:nope: not defined" in result.tags_error


async def test_requested_tags_are_refused_when_no_policy_is_set(control_plane):
    async with node_of(control_plane, "alice", tags=("tag:web",)) as agent:
        assert agent.login_result.tags == ()
        assert agent.login_result.refused_tags == ("tag:web",)
        assert "no policy" in agent.login_result.tags_error


async def test_logged_in_node_gains_a_tag_by_logging_in_again_with_it(control_plane):
    set_policy(control_plane, OWNERS)
    async with node_of(control_plane, "alice") as agent:
        assert agent.login_result.tags == ()
        assert agent.login_result.key_expiry is not None
        again = await agent.login(tags=("tag:web",))  # same node key: no auth key needed
        assert again.tags == ("tag:web",)
        assert again.key_expiry is None  # tagged nodes' keys do not expire
        assert stored_tags(control_plane, again.node_id) == ["tag:web"]


async def test_malformed_requested_tag_refuses_the_login_clearly(control_plane):
    agent = make_agent(control_plane.url, "badtag")
    try:
        with pytest.raises(Exception, match="invalid tag"):
            await agent.login(control_plane.auth_key(user="alice"), tags=("web server",))
    finally:
        await agent.close()


# ---- policy changes


async def test_policy_change_removing_the_owner_keeps_the_applied_tag(control_plane):
    set_policy(control_plane, OWNERS)
    async with node_of(control_plane, "alice", tags=("tag:web",)) as agent:
        set_policy(control_plane, {**OWNERS, "tagOwners": {**OWNERS["tagOwners"], "tag:web": []}})
        assert stored_tags(control_plane, agent.login_result.node_id) == ["tag:web"]
        again = await agent.login(tags=("tag:web",))
        assert again.tags == ("tag:web",) and again.refused_tags == ()
