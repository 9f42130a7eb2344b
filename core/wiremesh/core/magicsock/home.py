"""Choosing the home relay region from measured latencies (pure)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

# Stay with the current home unless another region is clearly closer: flapping between two
# similar relays would make peers chase us from one to the other.
SWITCH_IF_FASTER_BY = 0.66


def choose_home_region(
    latencies: Mapping[int, float], current: int | None, unavailable: Collection[int] = ()
) -> int | None:
    """The region to use as home: the lowest latency among reachable ones, with hysteresis.

    `latencies` holds a round-trip time (seconds) per region that answered; `unavailable`
    lists regions whose relay we cannot reach right now (they never win).
    """
    usable = {r: lat for r, lat in latencies.items() if r not in unavailable and lat >= 0}
    if not usable:
        return current if current is not None and current not in unavailable and not latencies else None
    best = min(usable, key=lambda r: (usable[r], r))
    if current is not None and current in usable and usable[best] > usable[current] * SWITCH_IF_FASTER_BY:
        return current
    return best
