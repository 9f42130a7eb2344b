"""A node asks for tags from the agent side: `wiremeshd --advertise-tags`, `wiremesh up
--advertise-tags`, and `wiremesh status` naming what coord refused."""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import pytest

from wiremesh.agent.cli.local import format_status
from wiremesh.agent.mesh import cli as mesh

# The namespace lab with coord and real wiremeshd agents lives beside the mesh tests.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "mesh"))
from mesh_kit import VENV_BIN, mesh_lab, wait_until

POLICY = {
    "groups": {"group:ops": ["bob@"]},
    "tagOwners": {"tag:web": ["alice@"], "tag:ops": ["group:ops"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
}


def mesh_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tun", default="wm0")
    parser.add_argument("--metrics-listen", default=None)
    mesh.add_arguments(parser)
    return parser.parse_args(["--login-server", "http://coord:8080", *extra])


def test_wiremeshd_advertise_tags_flag_becomes_the_login_request(monkeypatch) -> None:
    monkeypatch.delenv("WIREMESH_AUTH_KEY", raising=False)
    config = mesh.config_from_args(mesh_args("--advertise-tags", "tag:web, tag:ops,tag:web"))
    assert config.advertise_tags == ("tag:web", "tag:ops")


def test_wiremeshd_refuses_a_malformed_advertised_tag(monkeypatch) -> None:
    monkeypatch.delenv("WIREMESH_AUTH_KEY", raising=False)
    with pytest.raises(ValueError, match="--advertise-tags: invalid tag 'web'"):
        mesh.config_from_args(mesh_args("--advertise-tags", "web"))


def test_status_names_the_refused_tags_and_why() -> None:
    status = {
        "backend_state": "Running",
        "self": {"refused_tags": ["tag:ops"], "tags_error": "tag:ops: user alice does not own it"},
    }
    assert format_status(status).splitlines()[0] == (
        "# tags refused: tag:ops (tag:ops: user alice does not own it)"
    )


@pytest.mark.netns
def test_wiremesh_up_advertise_tags_grants_owned_tags_and_reports_the_rest() -> None:
    with mesh_lab() as m:
        m.set_policy(json.dumps(POLICY))
        agent = m.agent("tagged", m.lab.host("tagged"), m.auth_key())  # user alice
        up = subprocess.run(
            [
                str(VENV_BIN / "wiremesh"),
                "up",
                "--advertise-tags",
                "tag:web,tag:ops",
                "--socket",
                agent.socket_path,
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert up.returncode == 1, up.stdout + up.stderr
        assert "tags refused: tag:ops (tag:ops: user alice does not own it" in up.stderr
        # The granted tag reaches the node's own netmap through its stream.
        wait_until(lambda: agent.status()["self"]["tags"] == ["tag:web"], 15, "tag:web in the netmap")
        assert agent.status()["self"]["refused_tags"] == ["tag:ops"]
        shown = subprocess.run(
            [str(VENV_BIN / "wiremesh"), "status", "--socket", agent.socket_path],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "# tags refused: tag:ops" in shown.stdout
