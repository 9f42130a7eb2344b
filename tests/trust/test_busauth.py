"""The bus permission table and credentials (wiremesh.core.busauth), without a running service."""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest

from wiremesh.core import bus, busauth
from wiremesh.lab.support import nats_server_binary

CHART_PERMISSIONS = pathlib.Path(__file__).parents[2] / "charts/wiremesh/files/nats-permissions.json"


def subjects_in_bus_module() -> set[str]:
    return {
        value
        for name, value in vars(bus).items()
        if name.isupper() and isinstance(value, str) and value.startswith("wiremesh.")
    }


def covered(subject: str, patterns: tuple[str, ...]) -> bool:
    concrete = subject.replace("{", "").replace("}", "")
    return any(p == subject or (p.endswith(".>") and concrete.startswith(p[:-1])) for p in patterns)


def test_every_subject_has_a_publisher_role_and_a_subscriber_role() -> None:
    roles = busauth.ROLES.values()
    for subject in subjects_in_bus_module() - {bus.DERP_SUBJECTS}:
        assert any(covered(subject, r.publish) for r in roles), f"nobody may publish {subject}"
        if subject != bus.AUTH_KEY_CHANGED:  # an audit event nothing consumes yet
            assert any(covered(subject, r.subscribe) for r in roles), f"nobody may subscribe {subject}"


@pytest.mark.parametrize(
    ("subject", "role"),
    [
        (bus.AUTH_KEY_CREATE, "coord"),
        (bus.AUTH_KEY_CONSUME, "coord"),
        (bus.NODE_KEY_EXPIRE, "coord"),
        (bus.NODE_KEY_REVOKE, "coord"),
        (bus.NODE_KEY_ADDED, "keys"),
        (bus.NODE_KEY_REMOVED, "keys"),
        (bus.DERP_FORWARD.format(region="r", replica="a"), "derp"),
        (bus.DERP_LEASE.format(region="r", kind="delta"), "derp"),
        (bus.HANDSHAKE_SEEN, "coord"),
    ],
)
def test_each_sensitive_subject_has_exactly_one_publisher_role(subject: str, role: str) -> None:
    publishers = [r.name for r in busauth.ROLES.values() if covered(subject, r.publish)]
    assert publishers == [role]


def test_only_keys_answers_requests_and_each_role_reads_only_its_own_inbox() -> None:
    assert [r.name for r in busauth.ROLES.values() if r.answers_requests] == ["keys"]
    for r in busauth.ROLES.values():
        inboxes = [s for s in r.permissions()["subscribe"]["allow"] if s.startswith("_INBOX")]
        assert inboxes == [f"_INBOX_{r.name}.>"]


def test_the_chart_renders_the_same_permission_table() -> None:
    """charts/wiremesh/files/nats-permissions.json is a copy: regenerate it with
    `python -m wiremesh.core.busauth chart-permissions > charts/wiremesh/files/nats-permissions.json`."""
    assert json.loads(CHART_PERMISSIONS.read_text()) == busauth.chart_permissions()


def test_nats_server_accepts_the_generated_configuration(tmp_path: pathlib.Path) -> None:
    files = busauth.write_bus(tmp_path, listen="127.0.0.1:0")
    password_user = busauth.BusUser(role="derp", user="derp", password="$2a$10$" + "x" * 53)
    (tmp_path / "mixed.conf").write_text(busauth.server_config([password_user], listen="127.0.0.1:0"))
    for config in (files.config, tmp_path / "mixed.conf"):
        check = subprocess.run(
            [nats_server_binary(), "-c", str(config), "-t"], capture_output=True, text=True
        )
        assert check.returncode == 0, check.stderr + check.stdout


def test_credential_files_are_private_and_hold_nkey_seeds(tmp_path: pathlib.Path) -> None:
    files = busauth.write_bus(tmp_path)
    assert set(files.credentials) == {"coord", "keys", "derp"}
    for path in [files.config, *files.credentials.values()]:
        assert path.stat().st_mode & 0o777 == 0o600
    credential = busauth.read_credential(files.credentials["coord"])
    assert credential.nkey_seed.startswith("SU") and "nkeys_seed_str" in credential.connect_options()
    assert "SU" not in repr(credential)  # never logged by accident


def test_user_and_password_credential() -> None:
    credential = busauth.parse_credential("derp:s3cret:with:colons\n")
    assert credential.connect_options() == {"user": "derp", "password": "s3cret:with:colons"}
    assert "s3cret" not in repr(credential)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("derp", "USER:PASSWORD"),
        (":pw", "USER:PASSWORD"),
        ("derp:", "USER:PASSWORD"),
        ("SUNOTASEED", "malformed NKey"),
        ("a:b\nc:d", "one line"),
    ],
)
def test_malformed_credentials_are_refused_without_echoing_them(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as refused:
        busauth.parse_credential(text)
    assert "SUNOTASEED" not in str(refused.value)


def test_a_missing_or_oversized_credential_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        busauth.read_credential(tmp_path / "absent")
    big = tmp_path / "big"
    big.write_text("u:" + "p" * busauth.MAX_CREDENTIAL_BYTES)
    with pytest.raises(ValueError, match="too large"):
        busauth.read_credential(big)


def test_services_refuse_to_start_with_an_unreadable_credential(tmp_path: pathlib.Path) -> None:
    from wiremesh.derp.server import main as derp_main

    assert derp_main(["--nats", "nats://127.0.0.1:1", "--nats-credentials", str(tmp_path / "none")]) == 2
    from wiremesh.keys.app import main as keys_main

    with pytest.raises(SystemExit, match="cannot read the NATS credential file"):
        keys_main(["--nats-credentials", str(tmp_path / "none"), "--state-dir", str(tmp_path)])


def test_replies_go_only_to_a_role_inbox() -> None:
    assert busauth.is_reply_inbox("_INBOX_coord.abc.1")
    assert not busauth.is_reply_inbox(bus.NODE_KEY_REMOVED)
    assert not busauth.is_reply_inbox("_INBOX.abc")
    assert not busauth.is_reply_inbox("_INBOX_coordx.abc")
