"""High-availability subnet routers: which node is primary for a prefix several nodes route.

When two or more nodes have the same subnet prefix approved, only one of them, the primary,
carries it in its allowed IPs in every peer's netmap (as Tailscale's control does), so every
peer sends that subnet's traffic to the same router and WireGuard's cryptokey routing never
sees one prefix on two peers. The others stand by.

The election is sticky: a primary stays primary while it is online, whoever else comes and
goes. When it goes offline, the online candidate with the lowest node id takes over; when it
comes back it stands by, so a router that bounces does not move the prefix twice (no flapping).
With no candidate online the last primary keeps the prefix (nothing better to offer). Exit routes
(0.0.0.0/0, ::/0) are not elected: each exit node is chosen by its users.

Pure and in memory: each coord replica elects from the same stream of node changes, so replicas
agree; a replica that starts (or restarts) elects from the nodes online at that moment, lowest
id first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from wiremesh.core.policy.model import is_exit_route


class Router(Protocol):
    """What the election reads of a node record."""

    @property
    def id(self) -> int: ...
    @property
    def online(self) -> bool: ...
    @property
    def expired(self) -> bool: ...
    @property
    def approved_routes(self) -> tuple[str, ...]: ...


class RouteElection:
    def __init__(self) -> None:
        self._primary: dict[str, int] = {}  # prefix -> its primary node id (prefixes with a router)
        self._routers: dict[str, set[int]] = {}  # prefix -> nodes it is approved on

    def primary(self, prefix: str) -> int | None:
        return self._primary.get(prefix)

    def is_primary(self, node_id: int, prefix: str) -> bool:
        """Does `node_id` carry `prefix` in its allowed IPs? (Exit routes: always.)"""
        return is_exit_route(prefix) or self._primary.get(prefix) == node_id

    def routers(self, prefix: str) -> frozenset[int]:
        return frozenset(self._routers.get(prefix, ()))

    def update(self, records: Mapping[int, Router], node_id: int, old_routes: Iterable[str] = ()) -> set[int]:
        """Re-elect every prefix node `node_id` routes or routed (`old_routes`) after it changed
        (or was removed from `records`); returns the nodes whose primary prefixes changed."""
        record = records.get(node_id)
        new_routes = () if record is None else record.approved_routes
        prefixes = {p for p in (*old_routes, *new_routes) if not is_exit_route(p)}
        changed: set[int] = set()
        for prefix in prefixes:
            routers = self._routers.setdefault(prefix, set())
            if record is not None and prefix in record.approved_routes:
                routers.add(node_id)
            else:
                routers.discard(node_id)
            before = self._primary.get(prefix)
            after = self._elect(prefix, records)
            if before != after:
                changed.update(n for n in (before, after) if n is not None)
        return changed

    def _elect(self, prefix: str, records: Mapping[int, Router]) -> int | None:
        routers = self._routers.get(prefix, set())
        candidates = sorted(n for n in routers if (r := records.get(n)) is not None and not r.expired)
        if not candidates:
            self._routers.pop(prefix, None)
            self._primary.pop(prefix, None)
            return None
        current = self._primary.get(prefix)
        online = [n for n in candidates if records[n].online]
        if current in candidates and (records[current].online or not online):
            return current  # sticky: a primary stays while it is online, or while nobody else is
        chosen = online[0] if online else candidates[0]
        self._primary[prefix] = chosen
        return chosen
