"""The WireGuard endpoint magicsock gives each peer (PeerConfig.endpoint): an object, not an
address, so the Device never sees raw addresses and path selection can change the path alone."""

from __future__ import annotations

import time

from wiremesh.core.magicsock import PeerPath


class PeerEndpoint:
    """Hashable by identity; shows the live path."""

    __slots__ = ("__weakref__", "node_key", "path")

    def __init__(self, node_key: bytes, path: PeerPath) -> None:
        self.node_key = node_key
        self.path = path

    def __str__(self) -> str:
        direct = self.path.trusted(time.monotonic())
        if direct is not None:
            return str(direct)
        region = self.path.derp_route or self.path.home_region
        return f"relay:{region}" if region is not None else "relay"

    __repr__ = __str__
