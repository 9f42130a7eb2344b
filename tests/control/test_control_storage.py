"""Key registry and coord storage, against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import dataclasses

import pytest

from wiremesh.coord import core as coord_core
from wiremesh.coord import store as cstore
from wiremesh.core import bus
from wiremesh.keys import app as keys_app
from wiremesh.keys import store as kstore
from wiremesh.shell import service


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'test.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = service.make_engine(url)
    service.run_migrations(engine, keys_app.MIGRATIONS, keys_app.VERSION_TABLE)
    service.run_migrations(engine, coord_core.MIGRATIONS, coord_core.VERSION_TABLE)
    db = service.Database(engine)
    try:
        yield db
    finally:
        db.close()


def test_migrations_are_idempotent(database):
    service.run_migrations(database.engine, keys_app.MIGRATIONS, keys_app.VERSION_TABLE)
    service.run_migrations(database.engine, coord_core.MIGRATIONS, coord_core.VERSION_TABLE)
    assert database.call(cstore.counts) == {"nodes": 0, "users": 0}


def test_one_off_auth_key_is_consumed_once(database):
    _info, secret = database.call(lambda s: kstore.create_auth_key(s, bus.AuthKeyCreate(user="alice"), 100.0))
    row = database.call(lambda s: kstore.consume_auth_key(s, secret, 101.0))
    assert row.used_count == 1
    with pytest.raises(kstore.RegistryError, match="already used"):
        database.call(lambda s: kstore.consume_auth_key(s, secret, 102.0))


def test_reusable_auth_key_counts_uses(database):
    req = bus.AuthKeyCreate(user="alice", reusable=True)
    _info, secret = database.call(lambda s: kstore.create_auth_key(s, req, 100.0))
    for _ in range(3):
        database.call(lambda s: kstore.consume_auth_key(s, secret, 101.0))
    (info,) = database.call(lambda s: kstore.list_auth_keys(s, 101.0))
    assert info.used_count == 3 and not info.expired


@pytest.mark.parametrize("tag", ["tag:caf\u00e9", "tag:\u0661\u0662", "web", "tag:"])
def test_auth_key_with_a_tag_coord_would_refuse_is_not_created(database, tag):
    # Same rule as coord's (ASCII letters and digits, - and _): a key the registry accepted
    # must not carry a tag that coord then refuses at every login.
    req = bus.AuthKeyCreate(user="alice", tags=(tag,))
    with pytest.raises(kstore.RegistryError, match="invalid tag"):
        database.call(lambda s: kstore.create_auth_key(s, req, 100.0))
    assert len(database.call(lambda s: kstore.list_auth_keys(s, 100.0))) == 0


def test_auth_key_past_expiry_is_refused(database):
    req = bus.AuthKeyCreate(user="alice", expires_in=10)
    _info, secret = database.call(lambda s: kstore.create_auth_key(s, req, 100.0))
    with pytest.raises(kstore.RegistryError, match="expired"):
        database.call(lambda s: kstore.consume_auth_key(s, secret, 111.0))


def test_wrong_secret_with_known_prefix_is_unknown(database):
    _info, secret = database.call(lambda s: kstore.create_auth_key(s, bus.AuthKeyCreate(user="a"), 100.0))
    forged = secret[:-4] + ("0000" if not secret.endswith("0000") else "1111")
    with pytest.raises(kstore.RegistryError, match="unknown"):
        database.call(lambda s: kstore.consume_auth_key(s, forged, 101.0))


def test_auth_key_secret_is_not_stored(database):
    _info, secret = database.call(lambda s: kstore.create_auth_key(s, bus.AuthKeyCreate(user="a"), 100.0))
    stored = database.call(lambda s: [r.secret_hash for r in s.query(kstore.AuthKey).all()])
    assert secret not in stored and secret.split("-")[2] not in stored[0]


def register(db, node_id: int, node_key: str, expires_at: float | None = None) -> kstore.NodeKeyChanges:
    req = bus.NodeKeyRegister(
        node_id=node_id, machine_key="m" * 44, node_key=node_key, disco_key="d" * 44, expires_at=expires_at
    )
    return db.call(lambda s: kstore.register_node_key(s, req, 100.0))


def test_node_key_rotation_removes_the_old_key(database):
    register(database, 1, "k1")
    changes = register(database, 1, "k2")
    assert [e.node_key for e in changes.removed] == ["k1"] and changes.removed[0].reason == "rotated"
    assert [k.node_key for k in database.call(lambda s: kstore.valid_node_keys(s, 100.0))] == ["k2"]


def test_rotated_away_node_key_cannot_come_back(database):
    register(database, 1, "k1")
    register(database, 1, "k2")
    with pytest.raises(kstore.RegistryError, match="already used"):
        register(database, 1, "k1")


def test_due_node_keys_expire_and_are_reported_once(database):
    register(database, 1, "k1", expires_at=150.0)
    first = database.call(lambda s: kstore.expire_due_node_keys(s, 151.0))
    second = database.call(lambda s: kstore.expire_due_node_keys(s, 152.0))
    assert [e.reason for e in first.removed] == ["expired"] and second.removed == ()
    assert database.call(lambda s: kstore.valid_node_keys(s, 152.0)) == ()


def test_revoking_a_node_removes_its_keys(database):
    register(database, 7, "k7")
    changes = database.call(lambda s: kstore.revoke_node_keys(s, 7, "deleted", 120.0))
    assert [(e.node_key, e.reason) for e in changes.removed] == [("k7", "deleted")]


def new_node(machine_key: str, hostname: str = "host", user: str = "alice") -> cstore.NewNode:
    return cstore.NewNode(
        machine_key=machine_key,
        node_key="nk-" + machine_key,
        disco_key="dk",
        hostname=hostname,
        user=user,
        tags=(),
        ephemeral=False,
        auth_key_id=1,
        key_expiry=None,
        endpoints=(),
        advertised_routes=(),
    )


def test_nodes_get_distinct_addresses_in_tailnet_ranges(database):
    a = database.call(lambda s: cstore.create_node(s, new_node("m1"), 100.0))
    b = database.call(lambda s: cstore.create_node(s, new_node("m2"), 100.0))
    assert a.ipv4 != b.ipv4 and a.ipv6 != b.ipv6
    assert a.ipv4.startswith("100.") and a.ipv6.startswith("fd7a:115c:a1e0:")


def test_addresses_survive_reload_and_are_not_reused_after_a_delete(database):
    a = database.call(lambda s: cstore.create_node(s, new_node("m1"), 100.0))
    b = database.call(lambda s: cstore.create_node(s, new_node("m2"), 100.0))
    database.call(lambda s: cstore.delete_node(s, a.id))
    c = database.call(lambda s: cstore.create_node(s, new_node("m3"), 100.0))
    reloaded = database.call(lambda s: cstore.load_node(s, b.id))
    assert reloaded.ipv4 == b.ipv4 and reloaded.ipv6 == b.ipv6
    assert c.ipv4 not in (b.ipv4,)


def test_a_deleted_nodes_id_is_not_given_to_the_next_node(database):
    # The operator keeps a MeshNode's node id; a reused id would point it at another device.
    database.call(lambda s: cstore.create_node(s, new_node("m1"), 100.0))
    newest = database.call(lambda s: cstore.create_node(s, new_node("m2"), 100.0))
    database.call(lambda s: cstore.delete_node(s, newest.id))
    after = database.call(lambda s: cstore.create_node(s, new_node("m3"), 100.0))
    assert after.id > newest.id


def test_addresses_run_on_through_dot_255_and_dot_0(database):
    # Unbroken runs keep a rule naming many nodes a few CIDR prefixes.
    nodes = database.call(lambda s: [cstore.create_node(s, new_node(f"m{i}"), 100.0) for i in range(257)])
    assert [n.ipv4 for n in nodes[253:]] == ["100.64.0.254", "100.64.0.255", "100.64.1.0", "100.64.1.1"]


def test_same_machine_cannot_register_twice(database):
    database.call(lambda s: cstore.create_node(s, new_node("m1"), 100.0))
    with pytest.raises(cstore.StoreError, match="already registered"):
        database.call(lambda s: cstore.create_node(s, new_node("m1"), 100.0))


def test_hostname_clash_gets_suffixed_name(database):
    a = database.call(lambda s: cstore.create_node(s, new_node("m1", "web"), 100.0))
    b = database.call(lambda s: cstore.create_node(s, new_node("m2", "web"), 100.0))
    assert (a.name, b.name) == ("web", "web-1")


def test_rename_to_a_taken_name_is_refused(database):
    database.call(lambda s: cstore.create_node(s, new_node("m1", "one"), 100.0))
    b = database.call(lambda s: cstore.create_node(s, new_node("m2", "two"), 100.0))
    with pytest.raises(cstore.StoreError, match="taken"):
        database.call(lambda s: cstore.update_node(s, b.id, name="one"))


def test_offline_ephemeral_nodes_past_grace_are_found(database):
    node = new_node("m1")
    a = database.call(lambda s: cstore.create_node(s, dataclasses.replace(node, ephemeral=True), 100.0))
    database.call(lambda s: cstore.create_node(s, new_node("m2"), 100.0))
    assert database.call(lambda s: cstore.ephemeral_gone(s, 150.0)) == [a.id]
    database.call(lambda s: cstore.set_presence(s, [a.id], True, 160.0))
    assert database.call(lambda s: cstore.ephemeral_gone(s, 170.0)) == []


def test_control_key_setting_is_set_once(database):
    first = database.call(lambda s: cstore.set_setting_once(s, "control_private_key", "a"))
    second = database.call(lambda s: cstore.set_setting_once(s, "control_private_key", "b"))
    assert (first, second) == ("a", "a")
