"""Interactive logins: `wiremesh up` without an auth key, signed in at an OpenID provider.

1. An agent logs in without an auth key (a new machine, an expired node, or `--force-reauth`).
   coord stores a pending login for that machine key (random id, state, nonce, PKCE verifier;
   one per machine, LOGIN_TTL seconds) and answers with `auth_url` = SERVER/login/ID.
2. The user opens it: coord redirects to the provider with state, nonce and the S256 challenge.
3. The provider sends the browser to SERVER/oidc/callback: coord exchanges the code, verifies
   the ID token (oidc.py), maps the subject to a user, checks the allowed users, domains and
   groups, stores the user's groups (the policy's `group:NAME@DOMAIN`; the user's nodes get new
   filters at once) and marks the login done or refused.
4. The agent asks again with `followup` = ID (its Noise handshake proves the machine key): a
   done login is consumed once and registers or re-authenticates the node, with a key expiry,
   exactly as an auth key would; a refused one answers 403 with the reason.

Every replica can serve every step: the state lives in the shared database.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import logging
import os
import pathlib
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import Boolean, Float, ForeignKey, String, delete, func, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from wiremesh.coord import store
from wiremesh.coord.oidc import (
    Identity,
    OidcConfig,
    OidcError,
    Provider,
    admission,
    parse_list,
    pkce_challenge,
    pkce_pair,
)
from wiremesh.core import bus
from wiremesh.core.control.channel import ControlError

log = logging.getLogger("wiremesh.coord.oidc")

LOGIN_TTL = 600.0
MAX_PENDING = 10_000
PENDING, DONE, REFUSED, USED = "pending", "done", "refused", "used"


class PendingLoginRow(store.Base):
    __tablename__ = "coord_pending_logins"
    login_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(64), unique=True)
    machine_key: Mapped[str] = mapped_column(String(64), unique=True)
    node_key: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(64))
    code_verifier: Mapped[str] = mapped_column(String(128))
    force_reauth: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float, index=True)
    status: Mapped[str] = mapped_column(String(16))
    user: Mapped[str | None] = mapped_column(String(128), nullable=True)
    error: Mapped[str] = mapped_column(String(256))


class OidcIdentityRow(store.Base):
    """Which user an identity provider's subject is: the same subject is always the same user."""

    __tablename__ = "coord_oidc_identities"
    issuer: Mapped[str] = mapped_column(String(255), primary_key=True)
    subject: Mapped[str] = mapped_column(String(255), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("coord_users.id"))
    email: Mapped[str] = mapped_column(String(128))
    last_login: Mapped[float] = mapped_column(Float)


@dataclasses.dataclass(frozen=True, slots=True)
class PendingLogin:
    login_id: str
    state: str
    machine_key: str
    node_key: str
    nonce: str
    code_verifier: str
    force_reauth: bool
    expires_at: float
    status: str
    user: str | None
    error: str


class LoginPending(Exception):
    """The agent must send its user to `auth_url`, then ask again with `login_id`."""

    def __init__(self, auth_url: str, login_id: str) -> None:
        super().__init__(auth_url)
        self.auth_url = auth_url
        self.login_id = login_id


def _pending(row: PendingLoginRow) -> PendingLogin:
    return PendingLogin(
        login_id=row.login_id,
        state=row.state,
        machine_key=row.machine_key,
        node_key=row.node_key,
        nonce=row.nonce,
        code_verifier=row.code_verifier,
        force_reauth=row.force_reauth,
        expires_at=row.expires_at,
        status=row.status,
        user=row.user,
        error=row.error,
    )


# ---- storage ----


def start_login(
    session: Session, machine_key: str, node_key: str, force_reauth: bool, now: float
) -> PendingLogin:
    """The machine's waiting login (asked again, the same URL) or a new one."""
    session.execute(delete(PendingLoginRow).where(PendingLoginRow.expires_at < now))
    row = session.scalars(
        select(PendingLoginRow).where(PendingLoginRow.machine_key == machine_key)
    ).one_or_none()
    if (
        row is not None
        and row.status == PENDING
        and row.node_key == node_key
        and row.force_reauth == force_reauth
    ):
        return _pending(row)
    if row is not None:
        session.delete(row)
        session.flush()
    elif (session.scalar(select(func.count()).select_from(PendingLoginRow)) or 0) >= MAX_PENDING:
        raise store.StoreError("too many logins waiting for their users; try again later", 503)
    verifier, _challenge = pkce_pair()
    row = PendingLoginRow(
        login_id=secrets.token_urlsafe(24),
        state=secrets.token_urlsafe(24),
        machine_key=machine_key,
        node_key=node_key,
        nonce=secrets.token_urlsafe(24),
        code_verifier=verifier,
        force_reauth=force_reauth,
        created_at=now,
        expires_at=now + LOGIN_TTL,
        status=PENDING,
        user=None,
        error="",
    )
    session.add(row)
    session.flush()
    return _pending(row)


def find_login(
    session: Session, login_id: str = "", state: str = "", machine_key: str = ""
) -> PendingLogin | None:
    """The login with this id, state or machine key (give one)."""
    if login_id:
        where = PendingLoginRow.login_id == login_id
    elif state:
        where = PendingLoginRow.state == state
    else:
        where = PendingLoginRow.machine_key == machine_key
    row = session.scalars(select(PendingLoginRow).where(where)).one_or_none()
    return None if row is None else _pending(row)


def finish_login(session: Session, state: str, status: str, user: str | None, error: str, now: float) -> bool:
    """pending -> done/refused, once; False if it was not pending (or expired) any more."""
    result: Any = session.execute(
        update(PendingLoginRow)
        .where(
            PendingLoginRow.state == state,
            PendingLoginRow.status == PENDING,
            PendingLoginRow.expires_at >= now,
        )
        .values(status=status, user=user, error=error[:256])
    )
    return int(result.rowcount) == 1


def consume_login(session: Session, login_id: str, machine_key: str) -> bool:
    """done -> used, exactly once, for the machine that started it."""
    result: Any = session.execute(
        update(PendingLoginRow)
        .where(
            PendingLoginRow.login_id == login_id,
            PendingLoginRow.machine_key == machine_key,
            PendingLoginRow.status == DONE,
        )
        .values(status=USED)
    )
    return int(result.rowcount) == 1


def user_for(session: Session, identity: Identity, now: float) -> str:
    """The user this identity signs in as: the one its subject signed in as before, or (first
    time) the user named by its email, unless another subject of this provider already holds
    that user (an email address reassigned at the provider is not the same person)."""
    found = session.get(OidcIdentityRow, (identity.issuer, identity.subject))
    if found is not None:
        found.email, found.last_login = identity.email, now
        user = session.get(store.User, found.user_id)
        assert user is not None
        return user.name
    existing = session.scalars(select(store.User).where(store.User.name == identity.email)).one_or_none()
    if existing is not None:
        other = session.scalars(
            select(OidcIdentityRow).where(
                OidcIdentityRow.user_id == existing.id, OidcIdentityRow.issuer == identity.issuer
            )
        ).first()
        if other is not None:
            raise OidcError(f"user {identity.email} belongs to another account at the identity provider")
    user_id = existing.id if existing is not None else store.ensure_user(session, identity.email, now)
    session.add(
        OidcIdentityRow(
            issuer=identity.issuer,
            subject=identity.subject,
            user_id=user_id,
            email=identity.email,
            last_login=now,
        )
    )
    session.flush()
    return identity.email


# ---- the service ----

Db = Callable[[Callable[[Session], Any]], Awaitable[Any]]


class InteractiveLogins:
    """The OIDC login flow for one coord replica.

    `db` runs a function on a database Session; `changed(record, id, change)` is coord's way
    to apply a node change here and announce it to the other replicas: a login that changes a
    user's IdP groups passes each of the user's nodes through it (their filters follow).
    """

    def __init__(
        self,
        config: OidcConfig,
        server_url: str,
        db: Db,
        clock: Callable[[], float],
        changed: Callable[[store.NodeRecord | None, int, str], Awaitable[None]],
        provider: Provider | None = None,
    ) -> None:
        self.config = config
        self.server_url = server_url.rstrip("/")
        self.provider = provider or Provider(config, clock=clock)
        self._db = db
        self._clock = clock
        self._changed = changed

    async def aclose(self) -> None:
        await self.provider.aclose()

    def auth_url(self, login: PendingLogin) -> str:
        return f"{self.server_url}/login/{login.login_id}"

    async def grant(
        self, machine_key: str, node_key: str, followup: str, force_reauth: bool
    ) -> tuple[bus.AuthKeyGrant, tuple[str, ...]]:
        """The user a finished login signed in as (as an auth key grant) and their IdP groups;
        LoginPending while the user has not signed in; ControlError when it was refused."""
        now = self._clock()
        if len(followup) > 64:
            raise ControlError("malformed login id")
        # Asked without the id (an agent restarted mid-login), the machine's own login answers.
        login = await self._db(lambda s: find_login(s, login_id=followup, machine_key=machine_key))
        if login is not None and login.machine_key == machine_key and login.expires_at >= now:
            if login.status == PENDING and (followup or login.node_key == node_key):
                raise LoginPending(self.auth_url(login), login.login_id)
            if login.status == REFUSED and followup:
                raise ControlError(f"login refused: {login.error}", 403)
            if login.status == DONE and login.node_key != node_key:
                raise ControlError("the node key changed during the login: log in again", 409)
            if login.status == DONE and await self._db(
                lambda s: consume_login(s, login.login_id, machine_key)
            ):
                assert login.user is not None
                groups = await self._db(lambda s: _groups_of(s, login.user or ""))
                return bus.AuthKeyGrant(user=login.user), groups
        # None yet, or expired, used, refused (asked again afresh) or another machine's: a new one.
        login = await self._db(lambda s: start_login(s, machine_key, node_key, force_reauth, now))
        log.info("interactive login started", extra={"login_id": login.login_id[:8]})
        raise LoginPending(self.auth_url(login), login.login_id)

    async def browser_start(self, login_id: str) -> Response:
        login = await self._db(lambda s: find_login(s, login_id=login_id))
        if login is None or login.status != PENDING or login.expires_at < self._clock():
            return _page(
                404, "This login link is unknown or has expired", "Run `wiremesh up` again for a new one."
            )
        try:
            url = await self.provider.begin(
                login.state,
                login.nonce,
                pkce_challenge(login.code_verifier),
                "login" if login.force_reauth else "",
            )
        except OidcError as exc:
            log.warning("identity provider unusable", extra={"error": str(exc)})
            return _page(502, "The identity provider cannot be reached", str(exc))
        return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})

    async def callback(self, request: Request) -> Response:
        params = request.query_params
        state = params.get("state", "")[:64]
        login = await self._db(lambda s: find_login(s, state=state)) if state else None
        now = self._clock()
        if login is None or login.status != PENDING or login.expires_at < now:
            return _page(400, "This login is unknown, finished or expired", "Run `wiremesh up` again.")
        error = params.get("error")
        if error:
            why = f"the identity provider said {error[:64]}: {params.get('error_description', '')[:160]}"
            await self._db(lambda s: finish_login(s, state, REFUSED, None, why, now))
            return _page(403, "Login refused", why)
        try:
            identity = await self.provider.complete(
                params.get("code", "")[:2048], login.code_verifier, login.nonce
            )
            refusal = admission(identity, self.config)
            if refusal is not None:
                raise OidcError(refusal)
            user = await self._db(lambda s: user_for(s, identity, now))
            changed = await self._db(lambda s: store.set_user_groups(s, user, identity.groups, now))
        except OidcError as exc:
            why = str(exc)
            log.info("interactive login refused", extra={"reason": why})
            await self._db(lambda s: finish_login(s, state, REFUSED, None, why, now))
            return _page(403, "Login refused", why)
        if not await self._db(lambda s: finish_login(s, state, DONE, user, "", now)):
            return _page(400, "This login finished already", "Run `wiremesh up` again if the node is not up.")
        for node_id in changed:
            record = await self._db(functools.partial(store.load_node, node_id=node_id))
            await self._changed(record, node_id, "updated")
        log.info("interactive login done", extra={"user": user, "groups": list(identity.groups)})
        return _page(
            200, "Logged in", f"Signed in as {user}. You can close this window; the node is joining."
        )


def _groups_of(session: Session, name: str) -> tuple[str, ...]:
    user = session.scalars(select(store.User).where(store.User.name == name)).one_or_none()
    return tuple(user.groups or ()) if user is not None else ()


def _page(status: int, title: str, text: str) -> HTMLResponse:
    body = f"<!doctype html><title>{html.escape(title)}</title><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p>"
    return HTMLResponse(body, status_code=status, headers={"Cache-Control": "no-store"})


def add_routes(app: Any, logins: InteractiveLogins) -> None:
    """GET /login/{id} (to the provider) and GET /oidc/callback (back from it), for browsers."""

    @app.get("/login/{login_id}", include_in_schema=False)
    async def login_page(login_id: str) -> Response:
        return await logins.browser_start(login_id[:64])

    @app.get("/oidc/callback", include_in_schema=False)
    async def oidc_callback(request: Request) -> Response:
        return await logins.callback(request)


# ---- command line ----


def add_arguments(parser: Any) -> None:
    """coord's --oidc-* flags (each with a WIREMESH_OIDC_* twin) and --server-url."""
    env = os.environ.get
    group = parser.add_argument_group("interactive login (OpenID Connect)")
    group.add_argument(
        "--server-url",
        default=env("WIREMESH_SERVER_URL", ""),
        help="coord's URL as browsers and agents reach it (login links, the OIDC redirect URI "
        "SERVER/oidc/callback); default http://LISTEN",
    )
    group.add_argument("--oidc-issuer", default=env("WIREMESH_OIDC_ISSUER", ""), help="turns OIDC login on")
    group.add_argument("--oidc-client-id", default=env("WIREMESH_OIDC_CLIENT_ID", ""))
    group.add_argument(
        "--oidc-client-secret-file",
        default=env("WIREMESH_OIDC_CLIENT_SECRET_FILE", ""),
        help="default: $WIREMESH_OIDC_CLIENT_SECRET",
    )
    group.add_argument("--oidc-scopes", default=env("WIREMESH_OIDC_SCOPES", "openid,email,profile"))
    group.add_argument(
        "--oidc-groups-claim",
        default=env("WIREMESH_OIDC_GROUPS_CLAIM", "groups"),
        help="ID token (or userinfo) claim listing the user's groups; '' ignores groups",
    )
    group.add_argument(
        "--oidc-groups-domain",
        default=env("WIREMESH_OIDC_GROUPS_DOMAIN", ""),
        help="domain for bare group names (policy group:NAME@DOMAIN); default the user's email domain",
    )
    group.add_argument("--oidc-allowed-domains", default=env("WIREMESH_OIDC_ALLOWED_DOMAINS", ""))
    group.add_argument("--oidc-allowed-users", default=env("WIREMESH_OIDC_ALLOWED_USERS", ""))
    group.add_argument(
        "--oidc-allowed-groups",
        default=env("WIREMESH_OIDC_ALLOWED_GROUPS", ""),
        help="only members of one of these IdP groups (NAME@DOMAIN) may log in",
    )
    group.add_argument("--oidc-allow-unverified-email", action="store_true")


def config_from_args(args: Any, listen: str) -> tuple[OidcConfig | None, str]:
    """(the OIDC configuration or None, coord's server URL); ValueError with the reason."""
    server_url = (args.server_url or f"http://{listen}").rstrip("/")
    if not args.oidc_issuer:
        return None, server_url
    if not args.oidc_client_id:
        raise ValueError("--oidc-issuer needs --oidc-client-id")
    secret = os.environ.get("WIREMESH_OIDC_CLIENT_SECRET", "")
    if args.oidc_client_secret_file:
        try:
            secret = pathlib.Path(args.oidc_client_secret_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --oidc-client-secret-file: {exc.strerror}") from None
    if not secret:
        raise ValueError("--oidc-issuer needs the client secret (--oidc-client-secret-file)")
    if not server_url.startswith(("http://", "https://")) or server_url.split("://", 1)[1].startswith(
        "0.0.0.0"
    ):
        raise ValueError("--server-url must be coord's reachable http(s) URL (needed for OIDC login)")
    scopes = parse_list(args.oidc_scopes)
    if "openid" not in scopes:
        scopes = ("openid", *scopes)
    config = OidcConfig(
        issuer=args.oidc_issuer,
        client_id=args.oidc_client_id,
        client_secret=secret,
        redirect_uri=f"{server_url}/oidc/callback",
        scopes=scopes,
        groups_claim=args.oidc_groups_claim,
        groups_domain=args.oidc_groups_domain,
        allowed_domains=parse_list(args.oidc_allowed_domains),
        allowed_users=parse_list(args.oidc_allowed_users),
        allowed_groups=parse_list(args.oidc_allowed_groups),
        allow_unverified_email=bool(args.oidc_allow_unverified_email),
    )
    return config, server_url
