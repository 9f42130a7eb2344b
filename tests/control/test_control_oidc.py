"""OIDC login against a real OpenID provider (Ory Hydra, built from its Go module, with a login
form driven over HTTP) and real coord, keys and NATS processes: agents are the real control
client. The namespace test in tests/mesh runs wiremeshd itself.

The first run on a machine builds Hydra (cached under ~/.cache/wiremesh/hydra), hence the long
timeout then.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import pathlib
import secrets
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from control_helpers import SimAgent, make_agent
from fixtures_services import FAST_COORD_ARGS, ControlPlane, _planes
from joserfc.jwk import KeySet

from wiremesh.agent.control import ControlRefused, LoginRequired, LoginResult
from wiremesh.coord.oidc import OidcError, verify_id_token
from wiremesh.lab import idp as idp_lab
from wiremesh.lab.idp import IdentityProvider, Page, User, browser_login
from wiremesh.lab.support import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300 if idp_lab.is_built() else idp_lab.BUILD_TIMEOUT + 300),
]

SECRET = "wiremesh-client-secret-" + secrets.token_hex(8)
USERS = {
    "alice@example.com": User("alice-pw", ("engineering",)),
    "carol@example.com": User("carol-pw", ("ops",)),
    "mallory@evil.example": User("mallory-pw", ("engineering",)),
}
SERVER_POLICY = json.dumps(
    {
        "tagOwners": {"tag:server": []},
        "acls": [{"action": "accept", "src": ["group:engineering@example.com"], "dst": ["tag:server:22"]}],
    }
)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(tmp_path_factory.mktemp("idp"), USERS) as provider:
        yield provider


def oidc_args(idp: IdentityProvider, workdir: pathlib.Path, client_id: str) -> list[str]:
    secret_file = workdir / "oidc-secret"
    secret_file.write_text(SECRET)
    return [
        *FAST_COORD_ARGS,
        "--oidc-issuer", idp.issuer,
        "--oidc-client-id", client_id,
        "--oidc-client-secret-file", str(secret_file),
        "--oidc-scopes", "openid,email,profile,groups",
        "--oidc-allowed-domains", "example.com",
        "--node-key-expiry", "86400",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def plane(idp: IdentityProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    workdir = tmp_path_factory.mktemp("plane")
    with _planes(workdir) as make:
        plane = make(coord_args=oidc_args(idp, workdir, "wiremesh"))
        idp.add_client("wiremesh", SECRET, [f"{plane.url}/oidc/callback"])
        yield plane


async def sign_in(
    agent: SimAgent, email: str, password: str, **login: Any
) -> tuple[LoginResult | BaseException, Page]:
    """Log the agent in without an auth key; sign in at the login URL as `email` meanwhile."""
    urls: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        agent.client.login(
            agent.node_key,
            agent.disco_key,
            agent.hostname,
            on_auth_url=urls.put_nowait,
            poll_interval=0.2,
            **login,
        )
    )
    try:
        url = await asyncio.wait_for(urls.get(), 30)
    except TimeoutError:
        task.cancel()
        raise
    page = await asyncio.to_thread(browser_login, url, email, password)
    try:
        return await asyncio.wait_for(task, 30), page
    except (ControlRefused, TimeoutError) as exc:
        return exc, page


def admin_node(plane: ControlPlane, node_id: int) -> dict[str, Any]:
    return dict(plane.admin("GET", f"/nodes/{node_id}"))


async def test_login_through_the_provider_registers_the_node_with_an_expiry(plane: ControlPlane) -> None:
    agent = make_agent(plane.url, "alice-laptop")
    try:
        before = time.time()
        result, page = await sign_in(agent, "alice@example.com", "alice-pw")
        assert page.status == 200 and "Signed in as alice@example.com" in page.text
        assert isinstance(result, LoginResult), result
        assert result.user == "alice@example.com" and result.node_id > 0
        assert (
            result.key_expiry is not None
            and before + 86400 - 60 < result.key_expiry < time.time() + 86400 + 60
        )
        node = admin_node(plane, result.node_id)
        assert node["user"] == "alice@example.com"
        assert node["user_groups"] == ["engineering@example.com"]
        # The agent logs in again later without any interaction: the node is known.
        again = await agent.client.login(agent.node_key, agent.disco_key, agent.hostname)
        assert again.node_id == result.node_id
    finally:
        await agent.close()


async def test_user_outside_the_allowed_domains_is_refused_and_nothing_is_registered(
    plane: ControlPlane,
) -> None:
    agent = make_agent(plane.url, "mallory-box")
    nodes_before = len(plane.admin("GET", "/nodes"))
    try:
        result, page = await sign_in(agent, "mallory@evil.example", "mallory-pw")
        assert page.status == 403 and "not allowed to log in" in page.text
        assert isinstance(result, ControlRefused), result
        assert result.status == 403 and "login refused" in str(result)
        assert len(plane.admin("GET", "/nodes")) == nodes_before
    finally:
        await agent.close()


async def test_wrong_password_never_reaches_coord(plane: ControlPlane) -> None:
    agent = make_agent(plane.url, "guess")
    urls: asyncio.Queue[str] = asyncio.Queue()
    task = asyncio.create_task(
        agent.client.login(
            agent.node_key, agent.disco_key, "guess", on_auth_url=urls.put_nowait, poll_interval=0.2
        )
    )
    try:
        url = await asyncio.wait_for(urls.get(), 30)
        page = await asyncio.to_thread(browser_login, url, "alice@example.com", "wrong")
        assert "Wrong email or password" in page.text
        assert not task.done()  # still waiting for a real sign-in
    finally:
        task.cancel()
        await agent.close()


async def test_idp_groups_drive_the_policy_and_are_refreshed_at_each_login(
    plane: ControlPlane, idp: IdentityProvider
) -> None:
    server = make_agent(plane.url, "server")
    alice = make_agent(plane.url, "alice-dev")
    carol = make_agent(plane.url, "carol-dev")
    try:
        status = await asyncio.to_thread(_put_policy, plane, SERVER_POLICY)
        assert status == 200
        await server.login(plane.auth_key(tags=["tag:server"]))
        watcher = server.watch()
        alice_login, _ = await sign_in(alice, "alice@example.com", "alice-pw")
        carol_login, _ = await sign_in(carol, "carol@example.com", "carol-pw")
        assert isinstance(alice_login, LoginResult) and isinstance(carol_login, LoginResult)
        alice_ip, carol_ip = alice_login.addresses[0], carol_login.addresses[0]

        def allowed(netmap: Any, address: str) -> bool:
            ip = ipaddress.ip_address(address.split("/")[0])
            return any(
                ip in ipaddress.ip_network(src)
                for rule in netmap.packet_filter
                for src in rule.get("src", ())
            )

        netmap = await watcher.wait_for(lambda nm: allowed(nm, alice_ip), timeout=15)
        assert not allowed(netmap, carol_ip)
        # carol joins engineering at the provider; her next login brings the group to coord.
        idp.set_user("carol@example.com", User("carol-pw", ("ops", "Engineering")))
        relogin, page = await sign_in(carol, "carol@example.com", "carol-pw", force_reauth=True)
        assert isinstance(relogin, LoginResult) and page.status == 200
        await watcher.wait_for(lambda nm: allowed(nm, carol_ip), timeout=15)  # allowed now
        assert admin_node(plane, carol_login.node_id)["user_groups"] == [
            "engineering@example.com",
            "ops@example.com",
        ]
        # ...and leaving the group at the provider takes the access away at the next login.
        idp.set_user("carol@example.com", User("carol-pw", ("ops",)))
        await sign_in(carol, "carol@example.com", "carol-pw", force_reauth=True)
        await watcher.wait_for(lambda nm: not allowed(nm, carol_ip), timeout=15)  # cut off again
    finally:
        idp.set_user("carol@example.com", User("carol-pw", ("ops",)))
        _put_policy(plane, None)
        for agent in (server, alice, carol):
            await agent.close()


def _put_policy(plane: ControlPlane, text: str | None) -> int:
    response = httpx.request(
        "DELETE" if text is None else "PUT",
        f"{plane.url}/api/v1/policy",
        content=None if text is None else text.encode(),
        headers={"Authorization": f"Bearer {plane.admin_key}"},
        timeout=10,
    )
    return response.status_code


async def test_force_reauth_renews_the_expiry_of_a_live_node(plane: ControlPlane) -> None:
    agent = make_agent(plane.url, "renew")
    try:
        first, _ = await sign_in(agent, "alice@example.com", "alice-pw")
        assert isinstance(first, LoginResult) and first.key_expiry is not None
        second, page = await sign_in(agent, "alice@example.com", "alice-pw", force_reauth=True)
        assert isinstance(second, LoginResult) and page.status == 200
        assert second.node_id == first.node_id and second.key_expiry is not None
        assert second.key_expiry > first.key_expiry
    finally:
        await agent.close()


async def test_login_link_cannot_be_replayed_after_use(plane: ControlPlane) -> None:
    agent = make_agent(plane.url, "once")
    urls: asyncio.Queue[str] = asyncio.Queue()
    try:
        task = asyncio.create_task(
            agent.client.login(
                agent.node_key, agent.disco_key, "once", on_auth_url=urls.put_nowait, poll_interval=0.2
            )
        )
        url = await asyncio.wait_for(urls.get(), 30)
        await asyncio.to_thread(browser_login, url, "alice@example.com", "alice-pw")
        assert isinstance(await asyncio.wait_for(task, 30), LoginResult)
        page = await asyncio.to_thread(browser_login, url, "carol@example.com", "carol-pw")
        assert page.status == 404 and "unknown or has expired" in page.text
    finally:
        await agent.close()


async def test_login_finished_through_one_replica_registers_through_another(
    idp: IdentityProvider, tmp_path: pathlib.Path
) -> None:
    with _planes(tmp_path) as make:
        plane = make(coord_args=oidc_args(idp, tmp_path, "wiremesh-replicas"), replicas=2)
        idp.add_client("wiremesh-replicas", SECRET, [f"{c.url}/oidc/callback" for c in plane.coords])
        first = make_agent(plane.coords[0].url, "roamer")
        second = make_agent(plane.coords[1].url, "roamer", machine_key=first.client.machine_private_key)
        second.node_key_private, second.disco_key_private = first.node_key_private, first.disco_key_private
        try:
            # The agent starts on replica 0 and the user signs in there...
            with pytest.raises(LoginRequired, match="sign in at") as pending:
                await first.client.login(first.node_key, first.disco_key, "roamer")
            url = str(pending.value).split("sign in at ", 1)[1].split(" ", 1)[0]
            page = await asyncio.to_thread(browser_login, url, "alice@example.com", "alice-pw")
            assert page.status == 200
            # ...and its next request lands on replica 1, which finds the finished login.
            result = await second.client.login(second.node_key, second.disco_key, "roamer")
            assert result.user == "alice@example.com" and result.node_id > 0
        finally:
            await first.close()
            await second.close()


# ---- the ID token checks, with real tokens from the provider ----

REDIRECT = "http://127.0.0.1:9/callback"  # never served: the browser stops at it


def real_id_token(idp: IdentityProvider, client_id: str, nonce: str) -> str:
    """An ID token the provider issues to `client_id` for alice, by the code flow with PKCE."""
    meta = httpx.get(f"{idp.issuer}.well-known/openid-configuration", timeout=10).json()
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    query = urllib.parse.urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "scope": "openid email",
            "state": secrets.token_urlsafe(16),
            "nonce": nonce,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    page = browser_login(
        f"{meta['authorization_endpoint']}?{query}", "alice@example.com", "alice-pw", stop_at=REDIRECT
    )
    code = urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query)["code"][0]
    tokens = httpx.post(
        meta["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
        auth=(client_id, SECRET),
        timeout=10,
    ).json()
    assert "id_token" in tokens, tokens
    return str(tokens["id_token"])


@pytest.fixture(scope="module")
def provider_keys(idp: IdentityProvider) -> KeySet:
    for client_id, lifespan in (("verifier", None), ("other-app", None), ("short-lived", "1s")):
        idp.add_client(client_id, SECRET, [REDIRECT], id_token_lifespan=lifespan)
    meta = httpx.get(f"{idp.issuer}.well-known/openid-configuration", timeout=10).json()
    return KeySet.import_key_set(httpx.get(meta["jwks_uri"], timeout=10).json())


def verify(idp: IdentityProvider, keys: KeySet, token: str, **overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "issuer": idp.issuer,
        "client_id": "verifier",
        "nonce": "nonce-one-1",
        "now": time.time(),
    }
    options.update(overrides)
    return verify_id_token(token, keys, **options)


def test_a_real_token_for_this_client_verifies(idp: IdentityProvider, provider_keys: KeySet) -> None:
    claims = verify(idp, provider_keys, real_id_token(idp, "verifier", "nonce-one-1"))
    assert claims["email"] == "alice@example.com" and claims["sub"].startswith("u-")


def test_token_issued_for_another_client_is_refused(idp: IdentityProvider, provider_keys: KeySet) -> None:
    token = real_id_token(idp, "other-app", "nonce-one-1")
    with pytest.raises(OidcError, match="issued for another audience"):
        verify(idp, provider_keys, token)


def test_expired_token_is_refused(idp: IdentityProvider, provider_keys: KeySet) -> None:
    token = real_id_token(idp, "short-lived", "nonce-one-1")
    exp = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))["exp"]
    wait_until(lambda: time.time() > exp + 1, 30, "the token's expiry to pass")
    with pytest.raises(OidcError, match="expired"):
        verify(idp, provider_keys, token, client_id="short-lived", leeway=0)


def test_token_with_another_nonce_is_refused(idp: IdentityProvider, provider_keys: KeySet) -> None:
    with pytest.raises(OidcError, match="nonce"):
        verify(idp, provider_keys, real_id_token(idp, "verifier", "nonce-one-1"), nonce="nonce-two-2")


def test_token_from_another_issuer_is_refused(idp: IdentityProvider, provider_keys: KeySet) -> None:
    with pytest.raises(OidcError, match="issued by"):
        verify(
            idp,
            provider_keys,
            real_id_token(idp, "verifier", "nonce-one-1"),
            issuer="https://accounts.example.com/",
        )


def test_token_with_a_forged_signature_is_refused(idp: IdentityProvider, provider_keys: KeySet) -> None:
    header, payload, signature = real_id_token(idp, "verifier", "nonce-one-1").split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["email"] = "admin@example.com"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(OidcError, match="ID token refused"):
        verify(idp, provider_keys, f"{header}.{forged}.{signature}")


def test_token_signed_with_a_key_not_in_the_providers_set_is_refused(
    idp: IdentityProvider, provider_keys: KeySet
) -> None:
    from joserfc import jwt
    from joserfc.jwk import RSAKey

    stranger = RSAKey.generate_key(2048, parameters={"kid": "stranger"})
    now = int(time.time())
    token = jwt.encode(
        {"alg": "RS256", "kid": "stranger"},
        {
            "iss": idp.issuer,
            "aud": "verifier",
            "sub": "x",
            "iat": now,
            "exp": now + 60,
            "nonce": "nonce-one-1",
        },
        stranger,
    )
    with pytest.raises(OidcError, match="ID token refused"):
        verify(idp, provider_keys, token)
