"""wiremeshd pins coord's key: a server posing as coord at the login URL is refused, and plain
http:// with nothing to check coord's key against is refused unless a lab says otherwise.

Real NATS, keys and coord in a namespace, a real wiremeshd in another; the impostor is a real
coord process with its own key (its own database), started at the same address.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mesh_kit import COORD_PORT, MeshLab, mesh_lab

from wiremesh.core import crypto
from wiremesh.core.control import coordkey
from wiremesh.lab.support import wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]


def replace_coord_with_impostor(mesh: MeshLab) -> None:
    """Another coord (fresh database, so a fresh key) on the same address and port."""
    mesh.stop_process(mesh.coord)
    mesh.coord = mesh._service(
        "wiremesh.coord.app",
        "impostor",
        f"{mesh.ctl.address}:{COORD_PORT}",
        ["--replica-id", "impostor"],
        role="coord",
    )
    mesh.wait_services()


def test_an_impostor_coord_at_the_login_url_is_refused_by_an_agent_that_pinned_the_real_one():
    with mesh_lab() as mesh:
        host = mesh.lab.host("a")
        agent = mesh.agent("a", host, mesh.auth_key())
        real_key = mesh.coord_key()
        mesh.stop_agent(agent)
        state = json.loads((agent.state_dir / "state.json").read_text())

        replace_coord_with_impostor(mesh)
        assert mesh.coord_key() != real_key
        # The impostor even hands out a valid auth key of its own: the pin must still win.
        mesh.agent("a", host, mesh.auth_key(), wait=False)

        def refused() -> str | None:
            status = agent.try_status()
            error = (status or {}).get("error") or ""
            return error if "coord's key changed" in error else None

        error = wait_until(refused, 30, "agent refuses the impostor")
        assert real_key in error
        assert mesh.admin_cli("nodes", "list") == []  # it never logged in to the impostor
        assert agent.status()["backend_state"] != "Running"
        assert state["coord_key"] == real_key  # what it pinned at its first login


def test_plain_http_without_a_pinned_coord_key_is_refused_unless_a_lab_allows_it(tmp_path):
    with mesh_lab() as mesh:
        host = mesh.lab.host("b")
        created = mesh.admin_cli("authkeys", "create", "--user", "alice", "--reusable")
        old_form, fingerprint = coordkey.split_auth_key(created["key"])
        assert fingerprint is not None and coordkey.matches(crypto.decode_key(mesh.coord_key()), fingerprint)
        argv = [
            sys.executable, "-m", "wiremesh.agent.daemon", "--login-server", mesh.login_server,
            "--state-dir", str(tmp_path / "state-b"), "--tun", "wmpinb0", "--socket", str(tmp_path / "b.sock"),
            "--auth-key", old_form,
        ]  # fmt: skip
        result = mesh.lab.run(host, argv, check=False)
        assert result.returncode == 2
        assert "coord's key is not pinned" in result.stderr and "--coord-key" in result.stderr
        assert not (tmp_path / "state-b" / "state.json").exists()

        # The same old-form key joins with the key pinned by hand, or in a lab that says so.
        for extra, name in (
            ([f"--coord-key={mesh.coord_key()}"], "c"),
            (["--insecure-learn-coord-key"], "d"),
        ):
            log = tmp_path / f"{name}.log"
            with log.open("ab") as out:
                proc = mesh.lab.popen(
                    mesh.lab.host(name),
                    [*argv[:6], str(tmp_path / f"state-{name}"), "--tun", f"wmpin{name}0",
                     "--socket", str(tmp_path / f"{name}.sock"), "--hostname", name, "--auth-key", old_form, *extra],
                    stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            try:
                wait_until(
                    lambda name=name: any(n["name"] == name for n in mesh.admin_cli("nodes", "list")),
                    30,
                    f"{name} joins",
                )
            finally:
                mesh.lab.stop(proc)
