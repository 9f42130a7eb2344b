"""The relay map coord serves inside the netmap: parsing and clear errors."""

from __future__ import annotations

import pytest

from wiremesh.core.magicsock.derpmap import DerpMapError, Region, derp_map_json, parse_derp_map

GOOD = {
    "regions": {
        "1": {"name": "east", "relay": "198.18.0.10:3340", "stun": "198.18.0.10:3478"},
        "2": {"relay": "[2001:db8::1]:443"},
    }
}


def test_regions_parse_with_relay_and_stun_addresses():
    regions = parse_derp_map(GOOD)
    assert regions[1] == Region(1, "east", ("198.18.0.10", 3340), ("198.18.0.10", 3478))
    assert regions[2] == Region(2, "2", ("2001:db8::1", 443), None)


def test_empty_map_means_no_relays():
    assert parse_derp_map(None) == {} and parse_derp_map({}) == {}


def test_map_round_trips_through_its_json_form():
    assert parse_derp_map(derp_map_json(parse_derp_map(GOOD))) == parse_derp_map(GOOD)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"regions": []}, "regions"),
        ({"regions": {"x": {"relay": "1.2.3.4:1"}}}, "integer"),
        ({"regions": {"1": {}}}, "relay"),
        ({"regions": {"1": {"relay": "1.2.3.4"}}}, "HOST:PORT"),
        ({"regions": {"1": {"relay": "1.2.3.4:99999"}}}, "HOST:PORT"),
        ({"regions": {str(i): {"relay": "1.2.3.4:1"} for i in range(100)}}, "at most"),
    ],
)
def test_bad_maps_get_a_clear_error(bad, message):
    with pytest.raises(DerpMapError, match=message):
        parse_derp_map(bad)


def test_agent_keeps_its_relays_when_coord_sends_a_broken_map():
    from wiremesh.agent.engine import Engine
    from wiremesh.agent.magicsock import MagicSock

    ms = MagicSock(Engine(bytes(32), "wmdmtest0"), bytes(32), GOOD)  # an Engine not started
    ms.set_derp_map({"regions": {"1": {}}})
    assert set(ms.regions) == {1, 2}
    assert ms.drops["bad_derp_map"] == 1
