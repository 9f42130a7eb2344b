"""The mesh MTU: what fits one datagram on the host's default-route link after WireGuard's
overhead (as wg-quick and wireguard-go choose), never below IPv6's 1280."""

from __future__ import annotations

import pytest

from wiremesh.agent import hostnet
from wiremesh.agent.mesh.cli import resolve_mtu


def test_a_1500_byte_link_gives_1420() -> None:
    assert hostnet.mesh_mtu(1500) == 1420


def test_a_jumbo_link_gives_a_jumbo_tunnel() -> None:
    assert hostnet.mesh_mtu(9000) == 8920


def test_small_links_and_unknown_links_never_go_below_1280() -> None:
    assert hostnet.mesh_mtu(1300) == 1280
    assert hostnet.mesh_mtu(None) == 1420  # no default route: assume an ordinary 1500-byte link


def test_an_explicit_mtu_is_kept_and_checked() -> None:
    assert resolve_mtu("1380") == 1380
    for bad in ("1279", "70000", "big", "-1"):
        with pytest.raises(ValueError, match="--mtu"):
            resolve_mtu(bad)
