"""What the agent does and says when applying a netmap to the Engine goes wrong.

No interface: an Engine stand-in whose netlink steps fail on demand (a real netlink failure cannot
be had on cue); the packet filter and the controller are the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from wiremesh.agent.mesh.config import MeshConfig
from wiremesh.agent.mesh.controller import MeshAgent, Plan
from wiremesh.agent.state import StateDir
from wiremesh.core.policy.model import FilterRule

ADDRESSES = ("100.64.0.1/32",)
ROUTES = ("100.64.0.0/10",)
SSH = FilterRule(src=("100.64.0.2/32",), dst=("100.64.0.1/32",), protos=(6,), ports=((22, 22),)).to_dict()


class FlakyEngine:
    """Records each step; a step named in `failing` raises OSError (as a refused netlink call)."""

    listen_port = 0
    route_table = 52
    packet_filter: Any = None

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.steps: list[str] = []

    def _step(self, name: str) -> None:
        self.steps.append(name)
        if name in self.failing:
            raise OSError(f"{name} refused")

    def set_peers(self, peers: object) -> None:
        self._step("peers")

    def set_addresses(self, addresses: object, never_source: object = ()) -> None:
        self._step("addresses")

    def set_routes(self, prefixes: object) -> None:
        self._step("routes")

    def set_filter_rules(self, rules: Any, allow_all: bool) -> None:
        self._step("filter")
        self.packet_filter.set_rules(rules, allow_all=allow_all)

    def status(self) -> dict[str, Any]:
        return {"listen_port": 0, "peers": {}, "drops": {}}


@pytest.fixture
def engine() -> FlakyEngine:
    return FlakyEngine()


@pytest.fixture
def agent(tmp_path: Any, engine: FlakyEngine) -> Iterator[MeshAgent]:
    state = StateDir(str(tmp_path))
    config = MeshConfig(
        login_server="http://127.0.0.1:9",
        state_dir=str(tmp_path),
        tun="wmtest",
        insecure_learn_coord_key=True,
    )
    agent = MeshAgent(config, state, state.load_or_create_keys(), engine)
    yield agent
    agent._executor.shutdown(wait=True)


def test_a_failed_step_is_the_status_error_and_the_next_try_redoes_every_step(agent, engine):
    agent._apply_plan(Plan(addresses=ADDRESSES, packet_filter=(SSH,)))
    wanted = Plan(addresses=ADDRESSES, routes=ROUTES, packet_filter=(SSH,))
    engine.failing = {"routes"}
    agent._apply_plan(wanted)
    assert agent.status()["error"] == "applying the netmap failed: routes refused"
    engine.failing, engine.steps = set(), []
    agent._apply_plan(wanted)
    assert engine.steps == ["filter", "addresses", "routes"]  # not only the step that failed
    engine.steps = []
    agent._apply_plan(wanted)
    assert engine.steps == []  # applied in full: nothing left to change


def test_addresses_that_cannot_be_set_are_the_status_error_and_the_rest_still_applies(agent, engine):
    engine.failing = {"addresses"}
    agent._apply_plan(Plan(addresses=ADDRESSES, routes=ROUTES))
    assert agent.status()["error"] == "setting addresses failed: addresses refused"
    assert engine.steps == ["addresses", "routes"]


def test_a_policy_the_agent_cannot_read_admits_no_new_inbound_flows_and_is_counted(agent, engine):
    agent._apply_plan(Plan(packet_filter=({"src": "not a list of prefixes", "protos": "x"},)))
    shown = agent.status()["packet_filter"]
    assert (shown["errors"], shown["rules"], shown["allow_all"]) == (1, 0, False)
    assert agent.status()["error"] == ""
