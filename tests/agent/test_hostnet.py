"""Which of this host's addresses the agent offers peers as endpoints."""

from __future__ import annotations

import os
import subprocess

import pytest
from agent_netns import call_in, namespace, unique

from wiremesh.agent import hostnet, tun

pytestmark = pytest.mark.netns


def test_addresses_on_other_tunnels_are_not_offered_as_endpoints() -> None:
    """A peer could reach us at a tunnel's address only through that tunnel (another VPN, a
    static wiremeshd), which may be gone when it tries: only real links' addresses are offered."""
    with namespace("wmhn") as ns:
        for argv in (
            ["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            ["addr", "add", "192.0.2.10/24", "dev", "v0"],
            ["link", "set", "v0", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *argv], check=True)
        name = unique("wmhnt")
        fd = call_in(ns, lambda: tun.open_tun(name))
        try:
            subprocess.run(["ip", "-n", ns, "addr", "add", "10.99.0.1/24", "dev", name], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", name, "up"], check=True)
            assert call_in(ns, lambda: hostnet.local_endpoints(41641)) == ("192.0.2.10:41641",)
        finally:
            os.close(fd)
