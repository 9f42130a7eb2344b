"""Who may call which part of coord's admin API: the bootstrap key and scoped admin keys.

A request's `Authorization: Bearer KEY` is one of
- the bootstrap key (`--admin-key`, `WIREMESH_ADMIN_KEY`): every scope; never stored;
- a scoped key `wmadm-ID-SECRET`, made with `POST /api/v1/adminkeys` (or provisioned at start
  with `--provision-admin-key SCOPES=FILE`). The database keeps ID, the scopes, the expiry and a
  keyed BLAKE2b hash of SECRET (the secret is 192+ random bits, so a fast hash is enough; the
  hash key lives in coord's settings); the secret is shown once.

Scopes: `read` (every GET), `nodes` (nodes and routes), `authkeys` (pre-auth keys), `policy`
(the ACL policy), `all` (everything, including admin keys). A key may hold several. Which scope a
route needs is the table ROUTE_SCOPES; a route missing from it needs `all` (fails closed).

Every request reads its key's row from the shared database (an indexed lookup, no write), so a
key revoked or expired on one replica is refused by every replica at its next request: nothing
is cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Callable, Iterable
from typing import Annotated, Any

from fastapi import HTTPException, Path, Request
from pydantic import BaseModel, Field
from sqlalchemy import JSON, Float, Integer, String, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from wiremesh.coord import store

log = logging.getLogger("wiremesh.coord.admin")

READ, NODES, AUTHKEYS, POLICY, ALL = "read", "nodes", "authkeys", "policy", "all"
SCOPES = (READ, NODES, AUTHKEYS, POLICY, ALL)
# (method, path under the API prefix) -> the scope it needs; GET is also allowed with `read`.
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("GET", "/nodes"): NODES,
    ("GET", "/nodes/{node_id}"): NODES,
    ("DELETE", "/nodes/{node_id}"): NODES,
    ("POST", "/nodes/{node_id}/expire"): NODES,
    ("POST", "/nodes/{node_id}/rename"): NODES,
    ("POST", "/nodes/{node_id}/tags"): NODES,
    ("POST", "/nodes/{node_id}/routes/approve"): NODES,
    ("POST", "/nodes/{node_id}/routes/unapprove"): NODES,
    ("GET", "/routes"): NODES,
    ("GET", "/authkeys"): AUTHKEYS,
    ("POST", "/authkeys"): AUTHKEYS,
    ("POST", "/authkeys/{auth_key_id}/expire"): AUTHKEYS,
    # coord's public key (`wiremesh admin coord-key`): whoever hands out auth keys pins agents to it.
    ("GET", "/key"): AUTHKEYS,
    ("GET", "/policy"): POLICY,
    ("PUT", "/policy"): POLICY,
    ("DELETE", "/policy"): POLICY,
    ("GET", "/adminkeys"): ALL,
    ("POST", "/adminkeys"): ALL,
    ("POST", "/adminkeys/{admin_key_id}/revoke"): ALL,
}
# Ids are database integers: anything past 64 bits is a 422 at the API, not an overflow (500) below.
RowId = Annotated[int, Path(ge=0, le=2**63 - 1)]
KEY_PREFIX = "wmadm-"
_KEY = re.compile(r"^wmadm-([a-z0-9]{12})-([A-Za-z0-9]{32,128})$")
MAX_ACTIVE_KEYS = 1000  # bounds the table an `all` key can grow
_HASH_SETTING = "admin_key_hash_key"


class AdminKeyRow(store.Base):
    __tablename__ = "coord_admin_keys"
    __table_args__ = {"sqlite_autoincrement": True}  # ids are never reused (migration c0004)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[float] = mapped_column(Float)
    created_by: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


@dataclasses.dataclass(frozen=True, slots=True)
class AdminKey:
    id: int
    key_id: str
    secret_hash: str
    scopes: tuple[str, ...]
    description: str
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "prefix": f"{KEY_PREFIX}{self.key_id}",
            "scopes": list(self.scopes),
            "description": self.description,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "active": self.refusal(now) is None,
        }

    def refusal(self, now: float) -> str | None:
        """Why this key is refused now, or None."""
        if self.revoked_at is not None:
            return "admin key revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "admin key expired"
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: `bootstrap` or `admin key N`, and what it may do."""

    name: str
    scopes: frozenset[str]


def scope_needed(method: str, path: str) -> str:
    return ROUTE_SCOPES.get((method, path), ALL)


def permits(scopes: Iterable[str], method: str, path: str) -> bool:
    held = frozenset(scopes)
    needed = scope_needed(method, path)
    return ALL in held or needed in held or (method == "GET" and READ in held and needed != ALL)


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(s.strip() for s in scopes if s.strip()))
    unknown = [s for s in out if s not in SCOPES]
    if unknown or not out:
        raise ValueError(
            f"unknown scope {', '.join(unknown)!s}: use {', '.join(SCOPES)}"
            if unknown
            else f"an admin key needs at least one scope ({', '.join(SCOPES)})"
        )
    return out


def hash_secret(hash_key: bytes, secret: str) -> str:
    return hashlib.blake2b(secret.encode(), key=hash_key, digest_size=32, person=b"wm-admin-key").hexdigest()


def split_key(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a scoped key, or None if `token` is not shaped like one."""
    match = _KEY.match(token)
    return None if match is None else (match.group(1), match.group(2))


# ---- storage (one Session per call, like store.py) ----


def _key(row: AdminKeyRow) -> AdminKey:
    return AdminKey(
        id=row.id,
        key_id=row.key_id,
        secret_hash=row.secret_hash,
        scopes=tuple(row.scopes),
        description=row.description,
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
    )


def find_key(session: Session, key_id: str) -> AdminKey | None:
    row = session.scalars(select(AdminKeyRow).where(AdminKeyRow.key_id == key_id)).one_or_none()
    return None if row is None else _key(row)


def list_keys(session: Session) -> list[AdminKey]:
    return [_key(r) for r in session.scalars(select(AdminKeyRow).order_by(AdminKeyRow.id)).all()]


def add_key(
    session: Session,
    key_id: str,
    secret_hash: str,
    scopes: tuple[str, ...],
    description: str,
    created_by: str,
    now: float,
    expires_at: float | None,
) -> AdminKey | None:
    """Store a key; None if that key id exists already (a provisioned key seen before)."""
    active = session.scalar(
        select(func.count(AdminKeyRow.id)).where(
            AdminKeyRow.revoked_at.is_(None),
            (AdminKeyRow.expires_at.is_(None)) | (AdminKeyRow.expires_at > now),
        )
    )
    if (active or 0) >= MAX_ACTIVE_KEYS:
        raise store.StoreError(f"too many active admin keys ({MAX_ACTIVE_KEYS}): revoke some first", 409)
    row = AdminKeyRow(
        key_id=key_id,
        secret_hash=secret_hash,
        scopes=list(scopes),
        description=description,
        created_at=now,
        created_by=created_by,
        expires_at=expires_at,
        revoked_at=None,
    )
    try:
        with session.begin_nested():
            session.add(row)
            session.flush()
    except IntegrityError:
        return None
    return _key(row)


def revoke_key(session: Session, admin_key_id: int, now: float) -> AdminKey:
    row = session.get(AdminKeyRow, admin_key_id)
    if row is None:
        raise store.StoreError(f"no admin key with id {admin_key_id}", 404)
    if row.revoked_at is None:
        row.revoked_at = now
        session.flush()
    return _key(row)


# ---- the service object app.py uses ----


class CreateBody(BaseModel):
    scopes: list[str] = Field(min_length=1, max_length=len(SCOPES))
    expiration: str | float | None = "90d"  # "90s", "1h", "7d", seconds, or null for never
    description: str = Field(default="", max_length=128)


class AdminKeys:
    """Authorises admin requests and manages scoped keys for one coord replica.

    `db` runs a function on a database Session; `clock` gives the time; `bootstrap` is the
    configured bootstrap key ("" for none).
    """

    def __init__(
        self, db: Callable[[Callable[[Session], Any]], Any], clock: Callable[[], float], bootstrap: str
    ):
        self._db = db
        self._clock = clock
        self._bootstrap = bootstrap.encode()
        self._hash_key = b""

    def now(self) -> float:
        return self._clock()

    async def hash_key(self) -> bytes:
        """The deployment's hash key, made once and shared by every replica through the database."""
        if not self._hash_key:
            fresh = secrets.token_hex(32)
            try:
                stored = await self._db(lambda s: store.set_setting_once(s, _HASH_SETTING, fresh))
            except IntegrityError:  # another replica stored its own first: use that one
                stored = await self._db(lambda s: store.get_setting(s, _HASH_SETTING) or "")
            self._hash_key = bytes.fromhex(stored)
        return self._hash_key

    async def authorize(self, request: Request, prefix: str) -> Principal:
        """The caller, if its key is valid and holds the scope this route needs; else 401/403."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing admin key", headers={"WWW-Authenticate": "Bearer"})
        principal = await self.principal(token)
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path).removeprefix(prefix)
        if not permits(principal.scopes, request.method, path):
            needed = scope_needed(request.method, path)
            raise HTTPException(
                403, f"{principal.name} lacks the {needed!r} scope needed for {request.method} {prefix}{path}"
            )
        request.state.admin = principal
        if request.method != "GET":
            log.info("admin request", extra={"by": principal.name, "method": request.method, "path": path})
        return principal

    async def principal(self, token: str) -> Principal:
        if self._bootstrap and hmac.compare_digest(token.encode(), self._bootstrap):
            return Principal("bootstrap key", frozenset({ALL}))
        parts = split_key(token)
        if parts is None:
            raise HTTPException(401, "invalid admin key", headers={"WWW-Authenticate": "Bearer"})
        key_id, secret = parts
        digest = hash_secret(await self.hash_key(), secret)
        key = await self._db(lambda s: find_key(s, key_id))
        if key is None or not hmac.compare_digest(digest, key.secret_hash):
            raise HTTPException(401, "invalid admin key", headers={"WWW-Authenticate": "Bearer"})
        why = key.refusal(self._clock())
        if why is not None:
            raise HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})
        return Principal(f"admin key {key.id}", frozenset(key.scopes))

    async def create(
        self, scopes: Iterable[str], expires_in: float | None, description: str, by: str
    ) -> tuple[AdminKey, str]:
        """A new key and its secret (the secret is not kept)."""
        try:
            checked = check_scopes(scopes)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        key_id, secret = secrets.token_hex(6), secrets.token_hex(32)
        digest = hash_secret(await self.hash_key(), secret)
        now = self._clock()
        expires_at = None if expires_in is None else now + expires_in
        key = await self._db(lambda s: add_key(s, key_id, digest, checked, description, by, now, expires_at))
        if key is None:  # 48 random bits collided: vanishingly rare, and safe to refuse
            raise HTTPException(503, "could not allocate an admin key id; try again")
        log.info("admin key created", extra={"admin_key": key.id, "scopes": list(checked), "by": by})
        return key, f"{KEY_PREFIX}{key_id}-{secret}"

    async def provision(self, token: str, scopes: Iterable[str]) -> AdminKey | None:
        """Make sure a key given to coord at start (the operator's, from a Secret) exists.
        A key revoked through the API stays revoked: it is never re-created."""
        parts = split_key(token)
        if parts is None:
            raise ValueError(
                f"a provisioned admin key must look like {KEY_PREFIX}<12 of a-z0-9>-<32+ letters/digits>"
            )
        checked = check_scopes(scopes)
        key_id, secret = parts
        digest = hash_secret(await self.hash_key(), secret)
        now = self._clock()
        added = await self._db(
            lambda s: add_key(s, key_id, digest, checked, "provisioned at start", "coord", now, None)
        )
        existing = added or await self._db(lambda s: find_key(s, key_id))
        if existing is not None and not hmac.compare_digest(existing.secret_hash, digest):
            raise ValueError(f"admin key id {key_id} exists with another secret")
        if existing is not None and existing.revoked_at is not None:
            log.warning(
                "provisioned admin key was revoked; it stays refused", extra={"admin_key": existing.id}
            )
        return existing

    async def list(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [k.to_json(now) for k in await self._db(list_keys)]

    async def revoke(self, admin_key_id: int, by: str) -> dict[str, Any]:
        now = self._clock()
        key = await self._db(lambda s: revoke_key(s, admin_key_id, now))
        log.info("admin key revoked", extra={"admin_key": key.id, "by": by})
        return key.to_json(now)


def add_routes(
    app: Any,
    keys: AdminKeys,
    guarded: list[Any],
    parse_duration: Callable[[str | float | None], float | None],
    prefix: str = "/api/v1",
) -> None:
    """GET/POST {prefix}/adminkeys and POST {prefix}/adminkeys/{id}/revoke (scope `all`).
    `guarded`: the dependencies that authorise a request (AdminKeys.authorize)."""

    @app.post(f"{prefix}/adminkeys", dependencies=guarded)
    async def create_admin_key(body: CreateBody, request: Request) -> dict[str, Any]:
        key, secret = await keys.create(
            body.scopes, parse_duration(body.expiration), body.description, caller(request).name
        )
        out = key.to_json(keys.now())
        out["key"] = secret
        return out

    @app.get(f"{prefix}/adminkeys", dependencies=guarded)
    async def list_admin_keys() -> list[dict[str, Any]]:
        return await keys.list()

    @app.post(f"{prefix}/adminkeys/{{admin_key_id}}/revoke", dependencies=guarded)
    async def revoke_admin_key(admin_key_id: RowId, request: Request) -> dict[str, Any]:
        return await keys.revoke(admin_key_id, caller(request).name)


def caller(request: Request) -> Principal:
    """The Principal AdminKeys.authorize found for this request."""
    principal = getattr(request.state, "admin", None)
    if not isinstance(principal, Principal):
        raise HTTPException(401, "missing admin key")
    return principal
