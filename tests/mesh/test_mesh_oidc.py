"""wiremeshd without an auth key joins through an OpenID provider, in network namespaces.

NATS, keys, coord and the provider (Ory Hydra with its login-and-consent app, on the ctl
namespace's loopback) all run in `ctl`; agents run in their own namespaces and reach coord at
ctl's lab address. The "browser" is `python -m wiremesh.lab.idp browser` run inside ctl: it opens
the login URL the agent shows and fills in the provider's login form over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from mesh_kit import COORD_ARGS, COORD_PORT, VENV_BIN, Agent, MeshLab, pings, wait_until

from wiremesh.agent.cli.local import format_status
from wiremesh.lab import Lab
from wiremesh.lab import idp as idp_lab
from wiremesh.lab.idp import IdentityProvider, Page, User

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.timeout(420 if idp_lab.is_built() else idp_lab.BUILD_TIMEOUT + 420),
]

HYDRA_PORTS = (4444, 4445, 4446)  # public, admin, login app: on ctl's own loopback
SECRET = "wiremesh-namespace-test-secret"
USERS = {
    "alice@example.com": User("alice-pw", ("engineering",)),
    "carol@example.com": User("carol-pw", ("ops",)),
    "mallory@evil.example": User("mallory-pw", ("engineering",)),
}
POLICY = json.dumps(
    {
        "tagOwners": {"tag:server": []},
        "acls": [{"action": "accept", "src": ["group:engineering@example.com"], "dst": ["tag:server:*"]}],
    }
)


def pinned(mesh: MeshLab) -> tuple[str, ...]:
    """An agent without an auth key has no fingerprint of coord's key to check: it is given the key,
    as a user would be (coord here is plain http://)."""
    return ("--coord-key", mesh.coord_key())


class OidcMeshLab(MeshLab):
    """A MeshLab whose coord logs users in through Hydra running inside ctl."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(lab)
        self.idp = IdentityProvider(
            self.dir / "idp", USERS, ports=HYDRA_PORTS, spawn=self._spawn_in_ctl, http=self._http_in_ctl
        )

    def _spawn_in_ctl(self, argv: list[str], log: Any, env: Any) -> subprocess.Popen[Any]:
        return self.lab.popen(self.ctl, argv, stdout=log, stderr=subprocess.STDOUT, env=dict(env))

    def _http_in_ctl(self, method: str, url: str, body: Any) -> Any:
        parts = urllib.parse.urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        status, answer = self.http(parts.hostname or "", parts.port or 80, method, path, body)
        if status >= 400:
            raise OSError(f"{method} {url}: HTTP {status} {answer}")
        return answer

    def start_coord(self) -> None:
        secret = self.dir / "oidc-secret"
        secret.write_text(SECRET)
        self.coord = self._service(
            "wiremesh.coord.app",
            "coord",
            f"{self.ctl.address}:{COORD_PORT}",
            [
                "--replica-id", "coord-0", *COORD_ARGS,
                "--server-url", self.login_server,
                "--oidc-issuer", self.idp.issuer,
                "--oidc-client-id", "wiremesh",
                "--oidc-client-secret-file", str(secret),
                "--oidc-allowed-domains", "example.com",
                "--node-key-expiry", "3600",
            ],
        )  # fmt: skip

    def start_services(self) -> None:
        self.start_nats()
        self.start_keys()
        self.idp.start()
        self.idp.add_client("wiremesh", SECRET, [f"{self.login_server}/oidc/callback"])
        self.start_coord()
        self.wait_services()

    def browser(self, url: str, email: str, password: str) -> Page:
        """Sign in at `url` from inside ctl, as a user at a browser would."""
        argv = [sys.executable, "-m", "wiremesh.lab.idp", "browser", url, email, password]
        out = self.lab.run(self.ctl, argv, timeout=60).stdout
        return Page(**json.loads(out))

    def login_url(self, agent: Agent, timeout: float = 30) -> str:
        def shown() -> str:
            status = agent.try_status()
            return str(status.get("auth_url") or "") if status else ""

        return str(wait_until(shown, timeout, f"{agent.name}'s login URL", interval=0.1))

    def sign_in(self, agent: Agent, email: str, password: str) -> Page:
        return self.browser(self.login_url(agent), email, password)


@pytest.fixture(scope="module")
def mesh() -> Iterator[OidcMeshLab]:
    with Lab() as lab:
        m = OidcMeshLab(lab)
        try:
            m.start_services()
            yield m
        except BaseException:
            sys.stderr.write(m.logs()[-20000:] + m.idp.logs())
            raise
        finally:
            m.idp.stop()


def test_agents_sign_in_and_an_idp_group_decides_who_reaches_the_server(mesh: OidcMeshLab) -> None:
    code, answer = mesh.http(mesh.ctl.address, COORD_PORT, "PUT", "/api/v1/policy", POLICY)
    assert code == 200, answer
    server = mesh.agent("srv", mesh.lab.host("srv"), mesh.auth_key("--tags", "tag:server"))
    alice = mesh.agent("alice", mesh.lab.host("alice"), None, wait=False, flags=pinned(mesh))
    carol = mesh.agent("carol", mesh.lab.host("carol"), None, wait=False, flags=pinned(mesh))
    url = mesh.login_url(alice)
    assert url.startswith(f"{mesh.login_server}/login/")
    assert alice.status()["backend_state"] == "NeedsLogin"
    assert f"login_url url={url}" in alice.log_text()  # what wiremeshd prints for its user
    page = mesh.browser(url, "alice@example.com", "alice-pw")
    assert page.status == 200 and "Signed in as alice@example.com" in page.text, page
    assert mesh.sign_in(carol, "carol@example.com", "carol-pw").status == 200
    for agent in (alice, carol):
        status = mesh.wait_running(agent)
        assert status["auth_url"] == ""
    me = alice.status()["self"]
    assert me["user"] == "alice@example.com"
    assert me["key_expiry"] is not None and me["key_expiry"] > time.time() + 3000
    # group:engineering@example.com (alice, from her ID token) may reach the server; carol may not.
    assert pings(mesh.lab, alice.node, server.address(), timeout=20)
    assert not pings(mesh.lab, carol.node, server.address(), timeout=3)


def test_user_the_mesh_does_not_admit_is_refused_and_stays_out(mesh: OidcMeshLab) -> None:
    mallory = mesh.agent("mallory", mesh.lab.host("mallory"), None, wait=False, flags=pinned(mesh))
    page = mesh.sign_in(mallory, "mallory@evil.example", "mallory-pw")
    assert page.status == 403 and "not allowed to log in" in page.text

    def refused() -> dict[str, Any] | None:
        status = mallory.try_status()
        return status if status and "login refused" in status.get("error", "") else None

    status = wait_until(refused, 30, "the agent to report the refusal")
    assert status["backend_state"] == "NeedsLogin" and not status["self"]["addresses"]
    nodes = mesh.admin_cli("nodes", "list")
    assert "mallory" not in {n["hostname"] for n in nodes}


def test_status_warns_before_expiry_and_up_force_reauth_signs_in_again(mesh: OidcMeshLab) -> None:
    alice = mesh.agents["alice"]
    before = alice.status()
    assert "node key expires in" in format_status(before) and "--force-reauth" in format_status(before)
    cli = subprocess.Popen(
        [str(VENV_BIN / "wiremesh"), "up", "--force-reauth", "--socket", alice.socket_path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None
        lines = []
        for line in cli.stdout:
            lines.append(line)
            if "/login/" in line:
                break
        url = lines[-1].strip()
        assert any("To authenticate, visit:" in line for line in lines), lines
        # The node keeps working while the user signs in again.
        assert alice.status()["backend_state"] == "Running"
        assert mesh.browser(url, "alice@example.com", "alice-pw").status == 200
        out, err = cli.communicate(timeout=60)
        assert cli.returncode == 0, err
        assert "up: Running" in out
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    after = wait_until(
        lambda: (s := alice.status())["self"]["key_expiry"] > before["self"]["key_expiry"] and s,
        30,
        "the renewed key expiry in the netmap",
    )
    assert after["self"]["user"] == "alice@example.com"
