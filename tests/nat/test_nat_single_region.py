"""With one relay region (the README's by-hand setup) an agent has a single STUN server to ask,
so it cannot see that its NAT maps per destination. A pair of a symmetric-NAT device and an
endpoint-independent one must still go direct: birthday probing starts when plain punching
fails and the mapping is unknown.
"""

from __future__ import annotations

import pytest
from natlab import NatWorld, wait_for

from wiremesh.lab import Lab, NatKind

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def test_symmetric_nat_goes_direct_with_a_single_relay_region():
    with Lab() as lab:
        world = NatWorld(lab, regions=1)
        edm = world.agent("edm", lab.device("edm", NatKind.EDM))
        eim = world.agent("eim", lab.device("eim", NatKind.EIM_APDF))
        world.start()
        assert world.ping_until(edm, eim, timeout=30)
        assert world.status(edm)["magicsock"]["netcheck"]["mapping_varies_by_destination"] is None

        def direct() -> bool:
            world.ping(edm, eim, timeout=1)  # traffic keeps discovery running
            return world.path(edm, eim) == "direct" and world.path(eim, edm) == "direct"

        assert wait_for(direct, 60.0, interval=0.3), (world.peer(edm, eim), world.peer(eim, edm))
