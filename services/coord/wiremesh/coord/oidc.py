"""coord as an OpenID Connect relying party: the authorization-code flow with PKCE.

Pure parts (no network): `pkce_pair`, `authorization_url`, `verify_id_token` (signature from the
provider's JWKS, issuer, audience, expiry, nonce; joserfc does the JOSE work), `identity_from`
(claims -> Identity, groups qualified and folded), and `admission` (allowed users, domains and
groups). `Provider` does the network part over httpx: discovery, JWKS (re-fetched when a token
names a key it has not seen, at most once per JWKS_REFRESH seconds), the token exchange and
userinfo.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

import httpx
from joserfc import jwt
from joserfc.errors import ExpiredTokenError, JoseError, MissingClaimError
from joserfc.jwk import KeySet

from wiremesh.core.policy.model import fold_group_name

log = logging.getLogger("wiremesh.coord.oidc")

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWKS_REFRESH = 30.0
MAX_DOCUMENT = 256 * 1024  # discovery, JWKS, token and userinfo replies
MAX_GROUPS = 256
MAX_GROUP_NAME = 128


class OidcError(Exception):
    """A login that cannot complete; the message is meant for the user (and the logs)."""


@dataclasses.dataclass(frozen=True, slots=True)
class OidcConfig:
    issuer: str
    client_id: str
    client_secret: str
    redirect_uri: str  # coord's /oidc/callback as browsers reach it
    scopes: tuple[str, ...] = ("openid", "email", "profile")
    groups_claim: str = "groups"  # "" = ignore groups
    groups_domain: str = ""  # qualifies bare group names; default: the user's email domain
    allowed_domains: tuple[str, ...] = ()  # email domains admitted; () = any
    allowed_users: tuple[str, ...] = ()  # emails admitted; () = any
    allowed_groups: tuple[str, ...] = ()  # IdP groups one of which is needed; () = none needed
    allow_unverified_email: bool = False
    leeway: float = 60.0  # seconds of clock disagreement tolerated on exp/iat
    timeout: float = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    issuer: str
    subject: str
    email: str
    name: str
    groups: tuple[str, ...]  # qualified (name@domain) and folded


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of a PKCE code verifier (RFC 7636 4.2)."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636."""
    verifier = secrets.token_urlsafe(48)
    return verifier, pkce_challenge(verifier)


def authorization_url(
    endpoint: str, config: OidcConfig, state: str, nonce: str, code_challenge: str, prompt: str = ""
) -> str:
    query = {
        "response_type": "code",
        "client_id": config.client_id,
        "redirect_uri": config.redirect_uri,
        "scope": " ".join(config.scopes),
        "state": state,
        "nonce": nonce,
        "code_challenge": code_challenge,
        "code_challenge_method": "S256",
    }
    if prompt:
        query["prompt"] = prompt
    separator = "&" if urllib.parse.urlparse(endpoint).query else "?"
    return endpoint + separator + urllib.parse.urlencode(query)


def verify_id_token(
    id_token: str,
    keys: KeySet,
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    now: float,
    leeway: float = 60.0,
) -> dict[str, Any]:
    """The ID token's claims if it is signed by one of `keys` with an asymmetric algorithm, was
    issued by `issuer` for `client_id` (and, with several audiences, to it: azp), has not
    expired, and carries `nonce`; OidcError saying which check failed otherwise."""
    try:
        token = jwt.decode(id_token, keys, algorithms=list(ALGORITHMS))
    except JoseError as exc:
        raise OidcError(f"ID token refused: {exc.description or exc.error}") from None
    claims = dict(token.claims)
    registry = jwt.JWTClaimsRegistry(
        now=int(now),
        leeway=int(leeway),
        iss={"essential": True, "value": issuer},
        aud={"essential": True, "value": client_id},
        sub={"essential": True},
        exp={"essential": True},
        iat={"essential": True},
        nonce={"essential": True, "value": nonce},
    )
    try:
        registry.validate(claims)
    except ExpiredTokenError:
        raise OidcError("ID token refused: it has expired") from None
    except MissingClaimError as exc:
        raise OidcError(f"ID token refused: {exc.description}") from None
    except JoseError as exc:
        claim = str(exc.description or exc.error)
        if "'aud'" in claim:
            raise OidcError(
                f"ID token refused: it was issued for another audience, not {client_id!r}"
            ) from None
        if "'iss'" in claim:
            raise OidcError(
                f"ID token refused: it was issued by {claims.get('iss')!r}, not {issuer!r}"
            ) from None
        if "'nonce'" in claim:
            raise OidcError("ID token refused: its nonce does not match this login") from None
        raise OidcError(f"ID token refused: {claim}") from None
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if len(audiences) > 1 and claims.get("azp") != client_id:
        raise OidcError("ID token refused: several audiences and it was not issued to this client (azp)")
    if not isinstance(claims["sub"], str) or not claims["sub"] or len(claims["sub"]) > 255:
        raise OidcError("ID token refused: bad subject")
    return claims


def qualify_group(name: str, domain: str) -> str | None:
    """A group claim value as the policy names it (`eng@example.com`), or None if unusable."""
    name = name.strip().lstrip("/")  # Keycloak-style group paths start with "/"
    if not name or len(name) > MAX_GROUP_NAME or any(c.isspace() or c == ":" for c in name):
        return None
    if "@" not in name:
        if not domain:
            return None
        name = f"{name}@{domain}"
    local, _, dom = name.partition("@")
    if not local or not dom or "@" in dom:
        return None
    return fold_group_name(name)


def identity_from(
    claims: Mapping[str, Any], config: OidcConfig, extra: Mapping[str, Any] | None = None
) -> Identity:
    """Who logged in, from verified ID token claims (and userinfo's, `extra`, whose subject the
    caller has matched). OidcError if the email is missing or unverified (unless allowed)."""
    merged = {**(extra or {}), **claims}
    email = merged.get("email")
    if not isinstance(email, str) or "@" not in email or len(email) > 128:
        raise OidcError("the identity provider sent no usable email address for this user")
    verified = merged.get("email_verified")
    verified = verified is True or (isinstance(verified, str) and verified.lower() == "true")
    if not verified and not config.allow_unverified_email:
        raise OidcError(f"the identity provider has not verified {email}")
    email = email.strip()
    raw_groups: Any = []
    if config.groups_claim:
        raw_groups = claims.get(config.groups_claim, (extra or {}).get(config.groups_claim, []))
    if isinstance(raw_groups, str):
        raw_groups = [raw_groups]
    if not isinstance(raw_groups, list):
        raw_groups = []
    domain = config.groups_domain or email.rpartition("@")[2]
    groups: list[str] = []
    for value in raw_groups[:MAX_GROUPS]:
        if isinstance(value, str):
            qualified = qualify_group(value, domain)
            if qualified is not None and qualified not in groups:
                groups.append(qualified)
    name = merged.get("name")
    return Identity(
        issuer=str(claims["iss"]),
        subject=str(claims["sub"]),
        email=email,
        name=name if isinstance(name, str) else "",
        groups=tuple(sorted(groups)),
    )


def admission(identity: Identity, config: OidcConfig) -> str | None:
    """Why this identity may not log in, or None when it may."""
    email = identity.email.lower()
    users = {u.lower() for u in config.allowed_users}
    domains = {d.lower().lstrip("@") for d in config.allowed_domains}
    admitted = email in users or email.rpartition("@")[2] in domains
    if (users or domains) and not admitted:
        return f"{identity.email} is not allowed to log in to this mesh"
    if config.allowed_groups:
        wanted = {fold_group_name(g.removeprefix("group:")) for g in config.allowed_groups}
        if not wanted & set(identity.groups):
            return f"{identity.email} is in none of the groups allowed to log in"
    return None


def _json(response: httpx.Response, what: str) -> dict[str, Any]:
    if len(response.content) > MAX_DOCUMENT:
        raise OidcError(f"identity provider's {what} is too large")
    try:
        data = response.json()
    except ValueError:
        raise OidcError(f"identity provider's {what} is not JSON (HTTP {response.status_code})") from None
    if not isinstance(data, dict):
        raise OidcError(f"identity provider's {what} is not a JSON object")
    return data


class Provider:
    """The network side of one OpenID provider, for coord's requests."""

    def __init__(
        self,
        config: OidcConfig,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock
        self._client = client or httpx.AsyncClient(timeout=config.timeout)
        self._metadata: dict[str, Any] | None = None
        self._keys: KeySet | None = None
        self._keys_fetched = 0.0

    async def aclose(self) -> None:
        await self._client.aclose()

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            url = self.config.issuer.rstrip("/") + "/.well-known/openid-configuration"
            data = _json(await self._get(url, "discovery document"), "discovery document")
            # The issuer must name itself exactly as configured (OpenID Connect Discovery 4.3).
            if data.get("issuer") != self.config.issuer:
                raise OidcError(
                    f"identity provider calls itself {data.get('issuer')!r}, not {self.config.issuer!r}"
                )
            for field in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
                if not isinstance(data.get(field), str):
                    raise OidcError(f"identity provider's discovery document has no {field}")
            self._metadata = data
        return self._metadata

    async def keys(self, kid: str | None = None) -> KeySet:
        """The provider's JWKS; fetched again when `kid` is unknown (key rotation)."""
        known = self._keys is not None and (kid is None or any(k.kid == kid for k in self._keys.keys))
        stale = self.clock() - self._keys_fetched >= JWKS_REFRESH
        if self._keys is None or (not known and stale):
            meta = await self.metadata()
            data = _json(await self._get(meta["jwks_uri"], "key set"), "key set")
            try:
                self._keys = KeySet.import_key_set(data)  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError, KeyError) as exc:
                raise OidcError(f"identity provider's key set is unusable: {exc}") from None
            self._keys_fetched = self.clock()
        assert self._keys is not None
        return self._keys

    async def begin(self, state: str, nonce: str, code_challenge: str, prompt: str = "") -> str:
        meta = await self.metadata()
        return authorization_url(
            meta["authorization_endpoint"], self.config, state, nonce, code_challenge, prompt
        )

    async def complete(self, code: str, code_verifier: str, nonce: str) -> Identity:
        """Exchange the code, verify the ID token, read userinfo if groups are not in it."""
        meta = await self.metadata()
        try:
            response = await self._client.post(
                meta["token_endpoint"],
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.config.redirect_uri,
                    "code_verifier": code_verifier,
                },
                auth=(
                    urllib.parse.quote(self.config.client_id, safe=""),
                    urllib.parse.quote(self.config.client_secret, safe=""),
                ),
                headers={"Accept": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise OidcError(f"identity provider unreachable: {exc}") from None
        body = _json(response, "token response")
        if response.status_code != 200:
            raise OidcError(
                f"identity provider refused the code: {body.get('error_description') or body.get('error')}"
            )
        id_token = body.get("id_token")
        if not isinstance(id_token, str):
            raise OidcError("identity provider sent no ID token")
        kid = _kid(id_token)
        claims = verify_id_token(
            id_token,
            await self.keys(kid),
            issuer=self.config.issuer,
            client_id=self.config.client_id,
            nonce=nonce,
            now=self.clock(),
            leeway=self.config.leeway,
        )
        extra: dict[str, Any] = {}
        access_token = body.get("access_token")
        wants_userinfo = self.config.groups_claim and self.config.groups_claim not in claims
        if (
            wants_userinfo
            and isinstance(access_token, str)
            and isinstance(meta.get("userinfo_endpoint"), str)
        ):
            extra = await self._userinfo(meta["userinfo_endpoint"], access_token, str(claims["sub"]))
        return identity_from(claims, self.config, extra)

    async def _userinfo(self, url: str, access_token: str, subject: str) -> dict[str, Any]:
        try:
            response = await self._client.get(url, headers={"Authorization": f"Bearer {access_token}"})
        except httpx.HTTPError as exc:
            raise OidcError(f"identity provider unreachable: {exc}") from None
        if response.status_code != 200:
            return {}  # groups stay empty: fails closed
        data = _json(response, "userinfo")
        if data.get("sub") != subject:  # OpenID Connect Core 5.3.2: must match, else ignore it
            log.warning("userinfo subject differs from the ID token's; ignored")
            return {}
        return data

    async def _get(self, url: str, what: str) -> httpx.Response:
        try:
            response = await self._client.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            raise OidcError(f"identity provider unreachable ({what}): {exc}") from None
        if response.status_code != 200:
            raise OidcError(f"identity provider's {what} answered HTTP {response.status_code}")
        return response


def _kid(token: str) -> str | None:
    """The `kid` a compact JWS names in its header (None if absent or unreadable): which key to
    look for before verifying, so a rotated key triggers a JWKS refresh."""
    raw = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except ValueError:
        return None
    kid = header.get("kid") if isinstance(header, dict) else None
    return kid if isinstance(kid, str) else None


def parse_list(text: str) -> tuple[str, ...]:
    """A comma-separated flag value."""
    return tuple(item.strip() for item in text.split(",") if item.strip())
