"""Two agents behind lab NATs with real relays and STUN: relay at once, then direct."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from natlab import NatWorld

from wiremesh.lab import Lab, NatKind

pytestmark = [pytest.mark.netns]


@pytest.fixture
def world() -> Iterator[NatWorld]:
    with Lab() as lab:
        yield NatWorld(lab)


def test_two_agents_behind_port_restricted_nats_go_direct(world):
    lab = world.lab
    a = world.agent("a", lab.device("a", NatKind.EIM_APDF))
    b = world.agent("b", lab.device("b", NatKind.EIM_APDF))
    world.start()
    assert world.ping_until(a, b, timeout=20), world.log(a)[-3000:]
    assert world.wait_direct(a, b, timeout=20), (world.status(a), world.log(a)[-3000:])
    assert world.ping(a, b)
