"""The agent's state directory: private keys created once, 0600, stable across restarts."""

from __future__ import annotations

import pytest

from wiremesh.agent.mesh.cli import read_auth_key
from wiremesh.agent.state import Persisted, StateDir, StateError


def test_first_run_creates_three_distinct_keys_in_private_files(tmp_path):
    state = StateDir(tmp_path / "s")
    keys = state.load_or_create_keys()
    assert len({keys.machine, keys.node, keys.disco}) == 3
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    for name in ("machine.key", "node.key", "disco.key"):
        assert (tmp_path / "s" / name).stat().st_mode & 0o777 == 0o600


def test_second_run_loads_the_same_keys(tmp_path):
    first = StateDir(tmp_path).load_or_create_keys()
    assert StateDir(tmp_path).load_or_create_keys() == first


def test_loosened_key_file_permissions_are_tightened(tmp_path):
    StateDir(tmp_path).load_or_create_keys()
    (tmp_path / "node.key").chmod(0o644)
    StateDir(tmp_path).load_or_create_keys()
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600


def test_corrupt_key_file_is_a_clear_error(tmp_path):
    StateDir(tmp_path).load_or_create_keys()
    (tmp_path / "disco.key").write_text("not base64 at all")
    with pytest.raises(StateError, match=r"disco\.key does not hold a valid key"):
        StateDir(tmp_path).load_or_create_keys()


def test_persisted_state_round_trips_and_corruption_is_reported(tmp_path):
    state = StateDir(tmp_path)
    saved = Persisted(login_server="http://c:8080", node_id=7, name="a", addresses=("100.64.0.7/32",))
    state.save(saved)
    assert state.load() == saved
    (tmp_path / "state.json").write_text("{")
    with pytest.raises(StateError, match="corrupt"):
        state.load()


def test_remove_forgets_keys_and_state(tmp_path):
    state = StateDir(tmp_path)
    state.load_or_create_keys()
    state.save(Persisted(node_id=1))
    state.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_auth_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "key"
    path.write_text("wmauth-secret\n")
    assert read_auth_key(f"file:{path}") == "wmauth-secret"
    monkeypatch.setenv("WIREMESH_AUTH_KEY", "from-env")
    assert read_auth_key(None) == "from-env"
    with pytest.raises(ValueError, match="cannot read the auth key"):
        read_auth_key(f"file:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="longer than"):
        read_auth_key("x" * 1000)


def test_coord_pin_prefers_the_flag_then_state_then_the_auth_keys_fingerprint():
    import dataclasses

    from wiremesh.agent.mesh.config import MeshConfig, coord_pin
    from wiremesh.core import crypto
    from wiremesh.core.control import coordkey

    flag, kept = (crypto.public_key(crypto.generate_private_key()) for _ in range(2))
    key_with_fp = coordkey.with_fingerprint("wmauth-abc-def", flag)
    http = MeshConfig(login_server="http://coord:8080", state_dir="/s", tun="wm0", auth_key=key_with_fp)
    pinned = Persisted(coord_key=crypto.encode_key(kept))
    assert coord_pin(dataclasses.replace(http, coord_key=crypto.encode_key(flag)), pinned).key == flag
    assert coord_pin(http, pinned).key == kept
    assert coord_pin(http, Persisted()).fingerprint == coordkey.fingerprint(flag)


def test_learning_coords_key_is_refused_over_plain_http_unless_https_or_a_lab_says_so():
    import dataclasses

    from wiremesh.agent.mesh.config import MeshConfig, coord_pin

    http = MeshConfig(login_server="http://coord:8080", state_dir="/s", tun="wm0", auth_key="wmauth-abc-def")
    with pytest.raises(ValueError, match="coord's key is not pinned"):
        coord_pin(http, Persisted())
    assert coord_pin(dataclasses.replace(http, login_server="https://coord"), Persisted()).key is None
    assert (
        coord_pin(dataclasses.replace(http, insecure_learn_coord_key=True), Persisted()).fingerprint is None
    )
