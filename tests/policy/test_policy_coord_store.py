"""Coord's policy module: a Mesh whose visibility is the compiled policy, validation that
refuses broken policies or failing tests, and storage in coord's settings table (SQLite)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
from fixtures_services import node_record as record
from policy_packets import TCP, packet
from sqlalchemy.orm import Session

from wiremesh.coord import policy_store
from wiremesh.coord.store import Base
from wiremesh.core.packetfilter import Filter
from wiremesh.core.policy import parse_policy
from wiremesh.shell import service

SSH_ONLY = """
{
  // A may reach B on TCP 22 only; C is granted nothing.
  "acls": [{"action": "accept", "src": ["a@example.com"], "dst": ["b@example.com:22"]}],
  "tests": [{"src": "a@example.com", "accept": ["b@example.com:22"], "deny": ["b@example.com:80"]}],
}
"""


A, B, C = record(1, "a@example.com"), record(2, "b@example.com"), record(3, "c@example.com")


def mesh_with_policy() -> policy_store.PolicyMesh:
    mesh = policy_store.PolicyMesh(policy=parse_policy(SSH_ONLY))
    for r in (A, B, C):
        mesh.upsert(r)
    return mesh


def test_without_a_policy_everyone_sees_everyone() -> None:
    mesh = policy_store.PolicyMesh()
    for r in (A, B, C):
        mesh.upsert(r)
    assert mesh.peers_of(C.id) == [A.id, B.id]


def test_node_granted_nothing_sees_nobody_and_is_seen_by_nobody() -> None:
    mesh = mesh_with_policy()
    assert mesh.peers_of(C.id) == []
    assert C.id not in mesh.peers_of(A.id)
    assert mesh.viewers(C) == []


def test_source_and_destination_see_each_other() -> None:
    mesh = mesh_with_policy()
    assert mesh.peers_of(A.id) == [B.id]
    assert mesh.peers_of(B.id) == [A.id]


def test_destination_filter_allows_only_the_granted_port() -> None:
    mesh = mesh_with_policy()
    f = Filter.from_netmap(json.loads(mesh.packet_filter_json(B.id)))
    assert f.check_inbound(packet(A.ipv4, B.ipv4, TCP, 40000, 22), 0.0)
    assert not f.check_inbound(packet(A.ipv4, B.ipv4, TCP, 40000, 80), 0.0)


def test_source_filter_refuses_connections_from_the_destination() -> None:
    mesh = mesh_with_policy()
    f = Filter.from_netmap(mesh.packet_filter(A.id))
    assert not f.check_inbound(packet(B.ipv4, A.ipv4, TCP, 40000, 22), 0.0)


def test_policy_change_reports_nodes_to_update() -> None:
    mesh = mesh_with_policy()
    mesh.take_filter_changed()
    opened = parse_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}')
    assert mesh.set_policy(opened) == {A.id, B.id, C.id}
    assert mesh.take_filter_changed() == {A.id, B.id, C.id}
    assert mesh.peers_of(C.id) == [A.id, B.id]


def test_joining_node_marks_the_filters_it_changes() -> None:
    mesh = mesh_with_policy()
    mesh.take_filter_changed()
    a2 = record(4, "a@example.com")
    affected = mesh.upsert(a2)
    assert B.id in affected  # B now sees A's second device
    assert mesh.take_filter_changed() == {a2.id, B.id}


def test_retagged_node_gets_a_full_netmap() -> None:
    mesh = mesh_with_policy()
    tagged = record(2, "b@example.com", tags=("tag:x",))
    policy = parse_policy(
        '{"tagOwners": {"tag:x": []}, "acls": [{"action": "accept", "src": ["*"], "dst": ["tag:x:*"]}]}'
    )
    mesh.set_policy(policy)
    assert B.id in mesh.upsert(tagged)


def test_removed_node_disappears_from_its_peers() -> None:
    mesh = mesh_with_policy()
    assert A.id in mesh.remove(B.id)
    assert mesh.peers_of(A.id) == []


def test_validate_refuses_an_invalid_policy_with_line_numbers() -> None:
    with pytest.raises(policy_store.PolicyRejected) as info:
        policy_store.validate('{\n "acls": [{"action": "accept", "src": ["group:x"], "dst": ["*:*"]}]}')
    assert info.value.errors[0].startswith("policy:2:")


def test_validate_refuses_a_policy_whose_tests_fail() -> None:
    with pytest.raises(policy_store.PolicyRejected, match="expected accept"):
        policy_store.validate(
            SSH_ONLY.replace('"accept": ["b@example.com:22"]', '"accept": ["b@example.com:23"]')
        )


def test_validate_returns_warnings_for_unsupported_harmless_sections() -> None:
    _, warnings = policy_store.validate('{"ssh": [], "acls": []}')
    assert any("ssh" in w for w in warnings)


def test_policy_is_stored_and_versioned_in_the_settings_table(tmp_path: pathlib.Path) -> None:
    engine = service.make_engine(f"sqlite:///{tmp_path}/coord.db")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        assert policy_store.load(session) == (None, 0)
        assert policy_store.save(session, SSH_ONLY) == 1
        assert policy_store.save(session, "{}") == 2
    with Session(engine) as session:
        assert policy_store.load(session) == ("{}", 2)
    engine.dispose()


class _StubCoord:
    """What PolicyService needs from the Coordinator, with a real SQLite database."""

    def __init__(self, db: service.Database) -> None:
        self.db = db
        self.mesh = policy_store.PolicyMesh()
        self.streams: dict[int, set[object]] = {}
        self.nc = None

    async def apply_auto_approvals(self) -> int:
        return 0


@pytest.fixture
def stub_coord(tmp_path: pathlib.Path):
    engine = service.make_engine(f"sqlite:///{tmp_path}/coord.db")
    Base.metadata.create_all(engine)
    coord = _StubCoord(service.Database(engine))
    for r in (A, B, C):
        coord.mesh.upsert(r)
    yield coord
    coord.db.close()


async def test_stored_policy_is_applied_at_start(stub_coord) -> None:
    stub_coord.db.call(lambda s: policy_store.save(s, SSH_ONLY))
    svc = policy_store.PolicyService(stub_coord)
    await svc.load()
    assert svc.version == 1
    assert stub_coord.mesh.peers_of(C.id) == []


async def test_unreadable_stored_policy_fails_closed_not_open(stub_coord) -> None:
    stub_coord.db.call(lambda s: policy_store.save(s, '{"acls": [{"action": "allow"}]}'))
    await policy_store.PolicyService(stub_coord).load()
    assert stub_coord.mesh.peers_of(A.id) == []
    assert Filter.from_netmap(stub_coord.mesh.packet_filter(B.id)).allow_all is False


async def test_set_policy_refuses_and_keeps_the_one_in_force(stub_coord) -> None:
    svc = policy_store.PolicyService(stub_coord)
    await svc.set_policy(SSH_ONLY)
    with pytest.raises(policy_store.PolicyRejected):
        await svc.set_policy('{"acls": [{"action": "accept", "src": ["*"], "dst": ["nowhere:*"]}]}')
    assert svc.version == 1
    assert stub_coord.db.call(policy_store.load) == (SSH_ONLY, 1)
    assert stub_coord.mesh.peers_of(C.id) == []


def test_expired_node_is_nobodys_peer_or_source() -> None:
    mesh = mesh_with_policy()
    mesh.upsert(dataclasses.replace(A, expired=True))
    assert mesh.peers_of(B.id) == []
    f = Filter.from_netmap(mesh.packet_filter(B.id))
    assert not f.check_inbound(packet(A.ipv4, B.ipv4, TCP, 40000, 22), 0.0)


def test_node_change_does_not_mark_nodes_that_never_saw_it() -> None:
    mesh = mesh_with_policy()
    assert C.id not in mesh.upsert(dataclasses.replace(A, endpoints=("192.0.2.1:41641",)))
