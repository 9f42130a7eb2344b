"""The relay map: DERP regions, each with a relay address and a STUN address (pure parsing).

The netmap's `derp_map` (and coord's `--derp-map FILE`) look like:

    {"regions": {"1": {"name": "east", "relay": "198.18.0.10:3340", "stun": "198.18.0.10:3478"},
                 "2": {"name": "west", "relay": "198.18.0.11:3340", "stun": "198.18.0.11:3478"}}}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

MAX_REGIONS = 64


class DerpMapError(ValueError):
    """A relay map that cannot be used."""


@dataclasses.dataclass(frozen=True, slots=True)
class Region:
    id: int
    name: str
    relay: tuple[str, int]
    stun: tuple[str, int] | None = None


def parse_host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DerpMapError(f"{what}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_derp_map(data: Mapping[str, Any] | None) -> dict[int, Region]:
    """Regions by id; an empty or missing map gives {}. Raises DerpMapError on bad entries."""
    if not data:
        return {}
    regions = data.get("regions")
    if not isinstance(regions, Mapping):
        raise DerpMapError("derp map needs a 'regions' object")
    if len(regions) > MAX_REGIONS:
        raise DerpMapError(f"at most {MAX_REGIONS} regions")
    out: dict[int, Region] = {}
    for key, value in regions.items():
        try:
            region_id = int(key)
        except (TypeError, ValueError):
            raise DerpMapError(f"region id must be an integer, got {key!r}") from None
        if not isinstance(value, Mapping) or "relay" not in value:
            raise DerpMapError(f"region {region_id}: needs a 'relay' HOST:PORT")
        stun = value.get("stun")
        out[region_id] = Region(
            id=region_id,
            name=str(value.get("name") or region_id),
            relay=parse_host_port(value["relay"], f"region {region_id} relay"),
            stun=None if not stun else parse_host_port(stun, f"region {region_id} stun"),
        )
    return out


def derp_map_json(regions: Mapping[int, Region]) -> dict[str, Any]:
    """The inverse of parse_derp_map (what coord serves inside the netmap)."""
    return {
        "regions": {
            str(r.id): {
                "name": r.name,
                "relay": f"{r.relay[0]}:{r.relay[1]}",
                **({"stun": f"{r.stun[0]}:{r.stun[1]}"} if r.stun else {}),
            }
            for r in regions.values()
        }
    }
