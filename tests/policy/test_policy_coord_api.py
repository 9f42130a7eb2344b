"""The policy through coord, for real: NATS, keys and coord processes, agents speaking the real
control protocol. Policies are set through the admin API (and the admin CLI); netmaps show who
sees whom and carry each node's packet filter; changes reach open streams."""

from __future__ import annotations

import contextlib
import json
import pathlib
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from policy_packets import TCP, packet

from wiremesh.agent.cli import main as cli_main
from wiremesh.agent.control import ControlClient, NetmapWatcher
from wiremesh.core import crypto
from wiremesh.core.netmap import NetworkMap
from wiremesh.core.packetfilter import Filter

SSH_ONLY = """{
  // A may reach B on TCP 22 only; C is granted nothing.
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["bob@:22"]},
  ],
  "tests": [
    {"src": "alice@", "accept": ["bob@:22"], "deny": ["bob@:80", "carol@:22"]},
  ],
}
"""

SSH_AND_CAROL_HTTPS = """{
  "acls": [
    {"action": "accept", "src": ["alice@"], "dst": ["bob@:22"]},
    {"action": "accept", "src": ["carol@"], "dst": ["bob@:443"]},
  ],
}
"""


class Agent:
    def __init__(self, url: str, hostname: str) -> None:
        self.client = ControlClient(url, crypto.generate_private_key(), timeout=10)
        self.node_key_private = crypto.generate_private_key()
        self.hostname = hostname
        self.node_id = 0
        self.ipv4 = ""
        self.watcher: NetmapWatcher | None = None

    async def login(self, auth_key: str) -> None:
        node_key = crypto.encode_key(crypto.public_key(self.node_key_private))
        disco = crypto.encode_key(crypto.public_key(crypto.generate_private_key()))
        result = await self.client.login(node_key, disco, self.hostname, auth_key=auth_key)
        self.node_id = result.node_id
        self.ipv4 = result.addresses[0].split("/")[0]
        self.watcher = NetmapWatcher(self.client, node_key, keepalive=1).start()

    async def netmap(self, predicate: Any, timeout: float = 10.0) -> NetworkMap:
        assert self.watcher is not None
        return await self.watcher.wait_for(predicate, timeout=timeout)

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.stop()
        await self.client.aclose()


def put_policy(plane: Any, text: str, coord: int = 0) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"{plane.coords[coord].url}/api/v1/policy",
        data=text.encode(),
        method="PUT",
        headers={"Authorization": f"Bearer {plane.admin_key}", "Content-Type": "text/plain"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@contextlib.asynccontextmanager
async def three_agents(plane: Any, coord: int = 0) -> AsyncIterator[tuple[Agent, Agent, Agent]]:
    agents = [Agent(plane.coords[coord].url, name) for name in ("a", "b", "c")]
    try:
        for agent, user in zip(agents, ("alice", "bob", "carol"), strict=True):
            await agent.login(plane.auth_key(user=user))
        yield agents[0], agents[1], agents[2]
    finally:
        for agent in agents:
            await agent.close()


def peer_ids(nm: NetworkMap) -> set[int]:
    return {p.id for p in nm.peers}


async def test_invalid_policy_is_refused_with_its_line_and_nothing_changes(control_plane):
    status, body = put_policy(
        control_plane, '{\n  "acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]\n}'
    )
    assert status == 400
    assert any(e.startswith("policy:2:") and "group:x" in e for e in body["errors"])
    assert control_plane.admin("GET", "/policy")["policy"] is None


async def test_policy_whose_tests_fail_is_refused(control_plane):
    failing = SSH_ONLY.replace('"accept": ["bob@:22"]', '"accept": ["bob@:23"]')
    status, body = put_policy(control_plane, failing)
    assert status == 400
    assert any("expected accept, but it is denied" in e for e in body["errors"])


async def test_policy_limits_visibility_and_filters_per_node(control_plane_factory):
    plane = control_plane_factory()
    async with three_agents(plane) as (a, b, c):
        assert put_policy(plane, SSH_ONLY)[0] == 200
        nm_c = await c.netmap(lambda nm: not nm.peers, timeout=5)
        assert nm_c.peers == ()
        await a.netmap(lambda nm: peer_ids(nm) == {b.node_id}, timeout=5)
        nm_b = await b.netmap(lambda nm: peer_ids(nm) == {a.node_id}, timeout=5)
        f = Filter.from_netmap(nm_b.packet_filter)
        assert f.check_inbound(packet(a.ipv4, b.ipv4, TCP, 40000, 22), 0.0)
        assert not f.check_inbound(packet(a.ipv4, b.ipv4, TCP, 40000, 80), 0.0)
        assert not f.check_inbound(packet(c.ipv4, b.ipv4, TCP, 40000, 22), 0.0)


async def test_policy_change_reaches_open_streams_within_two_seconds(control_plane_factory):
    plane = control_plane_factory()
    async with three_agents(plane) as (a, b, c):
        assert put_policy(plane, SSH_ONLY)[0] == 200
        await c.netmap(lambda nm: not nm.peers, timeout=5)
        assert put_policy(plane, SSH_AND_CAROL_HTTPS)[0] == 200
        await c.netmap(lambda nm: peer_ids(nm) == {b.node_id}, timeout=2)
        nm_b = await b.netmap(lambda nm: peer_ids(nm) == {a.node_id, c.node_id}, timeout=2)
        assert Filter.from_netmap(nm_b.packet_filter).check_inbound(packet(c.ipv4, b.ipv4, TCP, 1, 443), 0.0)


async def test_joining_node_updates_the_filters_it_changes(control_plane_factory):
    plane = control_plane_factory()
    async with three_agents(plane) as (a, b, _c):
        assert put_policy(plane, SSH_ONLY)[0] == 200
        await b.netmap(lambda nm: peer_ids(nm) == {a.node_id}, timeout=5)
        a2 = Agent(plane.url, "a2")
        try:
            await a2.login(plane.auth_key(user="alice"))
            nm_b = await b.netmap(lambda nm: peer_ids(nm) == {a.node_id, a2.node_id}, timeout=5)
            f = Filter.from_netmap(nm_b.packet_filter)
            assert f.check_inbound(packet(a2.ipv4, b.ipv4, TCP, 1, 22), 0.0)
        finally:
            await a2.close()


async def test_policy_set_on_one_replica_reaches_streams_on_another(control_plane_factory):
    plane = control_plane_factory(replicas=2)
    async with three_agents(plane, coord=1) as (_a, b, c):
        await c.netmap(lambda nm: b.node_id in peer_ids(nm), timeout=5)  # no policy: allow all
        assert put_policy(plane, SSH_ONLY, coord=0)[0] == 200
        await c.netmap(lambda nm: not nm.peers, timeout=5)


def test_admin_cli_sets_gets_and_refuses_policies(control_plane, tmp_path: pathlib.Path, capsys) -> None:
    base = ["admin", "--server", control_plane.url, "--admin-key", control_plane.admin_key, "policy"]
    good = tmp_path / "good.hujson"
    good.write_text(SSH_ONLY)
    assert cli_main([*base, "set", str(good)]) == 0
    assert "in force" in capsys.readouterr().out
    bad = tmp_path / "bad.hujson"
    bad.write_text('{"acls": [{"action": "drop", "src": ["*"], "dst": ["*:*"]}]}')
    assert cli_main([*base, "set", str(bad)]) == 1
    assert "unsupported action 'drop'" in capsys.readouterr().err
    assert cli_main([*base, "get"]) == 0
    assert "// A may reach B on TCP 22 only" in capsys.readouterr().out
    assert cli_main([*base, "clear"]) == 0
    assert control_plane.admin("GET", "/policy")["policy"] is None


@pytest.fixture(autouse=True)
def _no_policy_left_behind(request):
    yield
    if "control_plane" in request.fixturenames:
        plane = request.getfixturevalue("control_plane")
        with contextlib.suppress(Exception):
            plane.admin("DELETE", "/policy")


def test_policy_version_rules_and_rejections_are_exported_as_metrics(control_plane_factory) -> None:
    plane = control_plane_factory()
    assert put_policy(plane, SSH_ONLY)[0] == 200
    assert put_policy(plane, "{ not json")[0] == 400
    with urllib.request.urlopen(f"{plane.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert "wiremesh_coord_policy_version 1.0" in text
    assert "wiremesh_coord_policy_rules 1.0" in text
    assert 'wiremesh_coord_policy_updates_total{outcome="rejected"} 1.0' in text
