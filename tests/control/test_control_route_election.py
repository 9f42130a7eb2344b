"""HA subnet routers: of the nodes with one prefix approved, one is primary and carries it in its
allowed IPs; the election moves it when the primary goes offline and never moves it back when
the old primary returns (coord's RouteElection, and through real coord and netmap streams)."""

from __future__ import annotations

import dataclasses
import secrets

from control_helpers import make_agent
from fixtures_services import node_record

from wiremesh.coord.mesh import Mesh
from wiremesh.coord.routes import RouteElection

PREFIX = "10.50.0.0/24"


@dataclasses.dataclass(frozen=True)
class R:
    id: int
    online: bool = True
    expired: bool = False
    approved_routes: tuple[str, ...] = (PREFIX,)


def elect(election: RouteElection, records: dict[int, R], *changed: R) -> set[int]:
    moved: set[int] = set()
    for r in changed:
        old = records.get(r.id)
        records[r.id] = r
        moved |= election.update(records, r.id, old.approved_routes if old else ())
    return moved


def test_a_single_router_is_primary_for_its_prefix() -> None:
    election, records = RouteElection(), {}
    elect(election, records, R(1))
    assert election.primary(PREFIX) == 1 and election.is_primary(1, PREFIX)


def test_the_lowest_online_id_is_elected_first_and_the_primary_stays_while_online() -> None:
    election, records = RouteElection(), {}
    elect(election, records, R(2), R(1))
    assert election.primary(PREFIX) == 2  # first come; 1 joining later does not take it away
    fresh, records2 = RouteElection(), {}
    elect(fresh, records2, R(2, online=False), R(1), R(3))
    assert fresh.primary(PREFIX) == 1


def test_the_prefix_moves_when_the_primary_goes_offline_and_does_not_come_back() -> None:
    election, records = RouteElection(), {}
    elect(election, records, R(1), R(2))
    assert elect(election, records, R(1, online=False)) == {1, 2}
    assert election.primary(PREFIX) == 2
    assert elect(election, records, R(1, online=True)) == set()  # no flapping
    assert election.primary(PREFIX) == 2


def test_with_nobody_online_the_last_primary_keeps_the_prefix() -> None:
    election, records = RouteElection(), {}
    elect(election, records, R(1), R(2))
    elect(election, records, R(1, online=False), R(2, online=False))
    assert election.primary(PREFIX) == 2
    elect(election, records, R(1, online=True))
    assert election.primary(PREFIX) == 1  # an online router beats an offline primary


def test_withdrawing_the_primarys_approval_or_expiring_it_moves_the_prefix() -> None:
    election, records = RouteElection(), {}
    elect(election, records, R(1), R(2), R(3))
    assert elect(election, records, R(1, approved_routes=())) == {1, 2}
    assert elect(election, records, R(2, expired=True)) == {2, 3}
    assert election.primary(PREFIX) == 3


def test_exit_routes_are_never_elected() -> None:
    election, records = RouteElection(), {}
    exit_routes = ("0.0.0.0/0", "::/0")
    elect(election, records, R(1, approved_routes=exit_routes), R(2, approved_routes=exit_routes))
    assert election.is_primary(1, "0.0.0.0/0") and election.is_primary(2, "0.0.0.0/0")


def test_only_the_primarys_peer_entry_carries_the_prefix_and_a_move_rebuilds_both() -> None:
    mesh = Mesh("all")
    a = node_record(1, approved_routes=(PREFIX,), advertised_routes=(PREFIX,), online=True)
    b = node_record(2, approved_routes=(PREFIX,), advertised_routes=(PREFIX,), online=True)
    mesh.upsert(a)
    mesh.upsert(b)
    assert PREFIX in mesh.entries[1].decode() and PREFIX not in _allowed(mesh, 2)
    mesh.take_entries_changed()
    mesh.upsert(dataclasses.replace(a, online=False))
    assert mesh.take_entries_changed() == {2}
    assert PREFIX in _allowed(mesh, 2) and PREFIX not in _allowed(mesh, 1)
    assert mesh.primary_routes(2) == (PREFIX,)


def _allowed(mesh: Mesh, node_id: int) -> list[str]:
    import json

    return list(json.loads(mesh.entries[node_id])["allowed_ips"])


async def test_peers_follow_the_primary_through_coord_when_it_goes_offline(control_plane):
    key = control_plane.auth_key(reusable=True)
    suffix = secrets.token_hex(3)
    r1, r2, viewer = (make_agent(control_plane.url, f"{n}-{suffix}") for n in ("ha1", "ha2", "client"))
    try:
        await r1.login(key, routes=(PREFIX,))
        await r2.login(key, routes=(PREFIX,))
        await viewer.login(key)
        ids = r1.login_result.node_id, r2.login_result.node_id
        for rid in ids:
            control_plane.admin("POST", f"/nodes/{rid}/routes/approve", {"prefixes": [PREFIX]})
        for agent in (r1, r2, viewer):
            agent.watch(keepalive=1)  # a streaming node is online

        def carriers(nm) -> list[int]:
            return [rid for rid in ids if (p := nm.peer(rid)) is not None and PREFIX in p.allowed_ips]

        netmap = await viewer.watcher.wait_for(lambda nm: len(carriers(nm)) == 1, timeout=10)
        [primary] = carriers(netmap)
        standby = ids[1] if primary == ids[0] else ids[0]
        primary_agent = r1 if primary == ids[0] else r2
        routes = control_plane.admin("GET", "/routes")
        assert {(r["node_id"], r["primary"]) for r in routes if r["prefix"] == PREFIX} == {
            (primary, True),
            (standby, False),
        }
        await primary_agent.watcher.stop()  # its stream ends: coord takes it offline
        await viewer.watcher.wait_for(lambda nm: carriers(nm) == [standby], timeout=10)
        primary_agent.watch(keepalive=1)  # back online: it stands by
        await viewer.watcher.wait_for(lambda nm: nm.peer(primary).online, timeout=10)
        assert carriers(viewer.watcher.netmap) == [standby]
    finally:
        for agent in (r1, r2, viewer):
            await agent.close()
