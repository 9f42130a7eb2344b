"""The in-memory mesh: a change touches exactly the nodes that see the changed node."""

from __future__ import annotations

import dataclasses
import json

from fixtures_services import node_record as record

from wiremesh.coord.mesh import Mesh


def test_new_node_affects_every_node_in_allow_all_mode():
    mesh = Mesh("all")
    for i in range(1, 5):
        mesh.upsert(record(i))
    assert mesh.upsert(record(5)) == {1, 2, 3, 4}


def test_member_change_affects_only_its_user_and_tagged_nodes():
    mesh = Mesh("user")
    for i in range(1, 4):
        mesh.upsert(record(i, "alice"))
    for i in range(4, 7):
        mesh.upsert(record(i, "bob"))
    mesh.upsert(record(9, "ops", tags=("tag:hub",)))
    affected = mesh.upsert(dataclasses.replace(mesh.get(2), endpoints=("192.0.2.2:1",)))
    assert affected == {1, 3, 9}


def test_tagged_node_change_affects_everyone():
    mesh = Mesh("user")
    for i in range(1, 4):
        mesh.upsert(record(i, f"u{i}"))
    mesh.upsert(record(9, "ops", tags=("tag:hub",)))
    assert mesh.upsert(dataclasses.replace(mesh.get(9), name="hub2")) == {1, 2, 3}


def test_expired_node_is_hidden_and_its_former_viewers_are_told():
    mesh = Mesh("all")
    for i in range(1, 4):
        mesh.upsert(record(i))
    affected = mesh.upsert(dataclasses.replace(mesh.get(3), expired=True))
    assert {1, 2} <= affected
    assert mesh.peers_of(1) == [2]


def test_removed_node_reports_its_viewers():
    mesh = Mesh("all")
    for i in range(1, 4):
        mesh.upsert(record(i))
    assert mesh.remove(2) == {1, 3}
    assert mesh.peers_of(1) == [3]


def test_peer_entry_is_serialised_once_with_routes_in_allowed_ips():
    mesh = Mesh("all")
    mesh.upsert(record(1, approved_routes=("10.1.0.0/24",), advertised_routes=("10.1.0.0/24",)))
    entry = json.loads(mesh.entries[1])
    assert entry["allowed_ips"] == ["100.64.0.1/32", "fd7a:115c:a1e0::1/128", "10.1.0.0/24"]
