"""The key registry's tables and the operations on them (synchronous, one Session each).

Auth keys are stored as a public prefix plus a SHA-256 of the secret; the full key is shown
once, at creation. Node keys keep their history: rotation, expiry and revocation set
`revoked_at` and a reason instead of deleting, so a removed key can never come back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from wiremesh.core import bus
from wiremesh.core.control.messages import MAX_TAGS, tag_syntax_ok

AUTH_KEY_PREFIX = "wmauth"
MAX_USER_LEN = 64


class Base(DeclarativeBase):
    pass


class AuthKey(Base):
    __tablename__ = "keys_auth_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    user: Mapped[str] = mapped_column(String(128))
    reusable: Mapped[bool]
    ephemeral: Mapped[bool]
    tags: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    used_count: Mapped[int] = mapped_column(Integer, default=0)
    expired_at: Mapped[float | None] = mapped_column(Float, nullable=True)

    def is_expired(self, now: float) -> bool:
        return (
            self.expired_at is not None
            or (self.expires_at is not None and self.expires_at <= now)
            or (not self.reusable and self.used_count > 0)
        )

    def info(self, now: float) -> bus.AuthKeyInfo:
        return bus.AuthKeyInfo(
            id=self.id,
            prefix=f"{AUTH_KEY_PREFIX}-{self.prefix}",
            user=self.user,
            reusable=self.reusable,
            ephemeral=self.ephemeral,
            tags=tuple(self.tags),
            created_at=self.created_at,
            expires_at=self.expires_at,
            used_count=self.used_count,
            expired=self.is_expired(now),
        )


class NodeKey(Base):
    __tablename__ = "keys_node_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    node_id: Mapped[int] = mapped_column(Integer, index=True)
    machine_key: Mapped[str] = mapped_column(String(64), index=True)
    node_key: Mapped[str] = mapped_column(String(64), unique=True)
    disco_key: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    reason: Mapped[str] = mapped_column(String(32), default="")

    def event(self, reason: str = "") -> bus.NodeKeyEvent:
        return bus.NodeKeyEvent(
            node_key=self.node_key, node_id=self.node_id, expires_at=self.expires_at, reason=reason
        )


class RegistryError(ValueError):
    """A request the registry refuses; the message is meant for the end user."""


def validate_tags(tags: tuple[str, ...]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise RegistryError(f"at most {MAX_TAGS} tags")
    for tag in tags:
        if not tag_syntax_ok(tag):
            raise RegistryError(f"invalid tag {tag!r}: tags look like tag:name (letters, digits, - and _)")
    return tuple(dict.fromkeys(tags))


def validate_user(user: str) -> str:
    if not user or len(user) > MAX_USER_LEN or not all(c.isalnum() or c in "-_.@" for c in user):
        raise RegistryError(f"invalid user name {user[:80]!r}")
    return user


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_auth_key(session: Session, req: bus.AuthKeyCreate, now: float) -> tuple[bus.AuthKeyInfo, str]:
    tags = validate_tags(req.tags)
    user = validate_user(req.user)
    if req.expires_in is not None and not 0 < req.expires_in <= 10 * 365 * 86400:
        raise RegistryError("expiration must be positive and at most ten years")
    prefix = secrets.token_hex(6)
    secret = secrets.token_hex(24)
    full = f"{AUTH_KEY_PREFIX}-{prefix}-{secret}"
    row = AuthKey(
        prefix=prefix,
        secret_hash=_hash(full),
        user=user,
        reusable=req.reusable,
        ephemeral=req.ephemeral,
        tags=list(tags),
        created_at=now,
        expires_at=None if req.expires_in is None else now + req.expires_in,
        used_count=0,
    )
    session.add(row)
    session.flush()
    return row.info(now), full


def list_auth_keys(session: Session, now: float) -> tuple[bus.AuthKeyInfo, ...]:
    rows = session.scalars(select(AuthKey).order_by(AuthKey.id)).all()
    return tuple(r.info(now) for r in rows)


def expire_auth_key(session: Session, auth_key_id: int, now: float) -> bus.AuthKeyInfo:
    row = session.get(AuthKey, auth_key_id)
    if row is None:
        raise RegistryError(f"no auth key with id {auth_key_id}")
    if row.expired_at is None:
        row.expired_at = now
    return row.info(now)


def check_auth_key(session: Session, secret: str, now: float) -> AuthKey:
    """The auth key `secret` names if it could be used now (nothing is written)."""
    row = _usable_auth_key(session, secret, now)
    if not row.reusable and row.used_count:
        raise RegistryError("auth key already used")
    return row


def _usable_auth_key(session: Session, secret: str, now: float) -> AuthKey:
    parts = secret.split("-")
    if len(parts) != 3 or parts[0] != AUTH_KEY_PREFIX or len(secret) > 128:
        raise RegistryError("unknown auth key")
    row = session.scalars(select(AuthKey).where(AuthKey.prefix == parts[1])).one_or_none()
    if row is None or not hmac.compare_digest(row.secret_hash, _hash(secret)):
        raise RegistryError("unknown auth key")
    if row.expired_at is not None or (row.expires_at is not None and row.expires_at <= now):
        raise RegistryError("auth key expired")
    return row


def consume_auth_key(session: Session, secret: str, now: float) -> AuthKey:
    """Validate `secret` and count one use, atomically (two replicas cannot both use a one-off key)."""
    row = _usable_auth_key(session, secret, now)
    guard: Any = AuthKey.reusable.is_(True) if row.reusable else AuthKey.used_count == 0
    result = session.execute(
        update(AuthKey)
        .where(AuthKey.id == row.id, AuthKey.expired_at.is_(None), guard)
        .values(used_count=AuthKey.used_count + 1)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise RegistryError("auth key already used")
    session.refresh(row)
    return row


@dataclasses.dataclass(frozen=True, slots=True)
class NodeKeyChanges:
    added: tuple[bus.NodeKeyEvent, ...] = ()
    removed: tuple[bus.NodeKeyEvent, ...] = ()


def register_node_key(session: Session, req: bus.NodeKeyRegister, now: float) -> NodeKeyChanges:
    """Make req.node_key the node's only valid key; any other valid key of the node is rotated away."""
    existing = session.scalars(select(NodeKey).where(NodeKey.node_key == req.node_key)).one_or_none()
    if existing is not None and (existing.node_id != req.node_id or existing.revoked_at is not None):
        raise RegistryError("node key already used; generate a new one")
    removed = []
    current = session.scalars(
        select(NodeKey).where(NodeKey.node_id == req.node_id, NodeKey.revoked_at.is_(None))
    ).all()
    for row in current:
        if row.node_key != req.node_key:
            row.revoked_at = now
            row.reason = "rotated"
            removed.append(row.event("rotated"))
    if existing is None:
        existing = NodeKey(
            node_id=req.node_id,
            machine_key=req.machine_key,
            node_key=req.node_key,
            disco_key=req.disco_key,
            created_at=now,
            expires_at=req.expires_at,
        )
        session.add(existing)
    else:
        existing.disco_key = req.disco_key
        existing.expires_at = req.expires_at
    session.flush()
    return NodeKeyChanges(added=(existing.event(),), removed=tuple(removed))


def revoke_node_keys(session: Session, node_id: int, reason: str, now: float) -> NodeKeyChanges:
    rows = session.scalars(
        select(NodeKey).where(NodeKey.node_id == node_id, NodeKey.revoked_at.is_(None))
    ).all()
    for row in rows:
        row.revoked_at = now
        row.reason = reason
        if reason == "expired":
            row.expires_at = now
    return NodeKeyChanges(removed=tuple(r.event(reason) for r in rows))


def expire_due_node_keys(session: Session, now: float) -> NodeKeyChanges:
    """Mark keys past their expiry; each is reported once even with several replicas sweeping."""
    due = session.scalars(
        select(NodeKey).where(
            NodeKey.revoked_at.is_(None), NodeKey.expires_at.is_not(None), NodeKey.expires_at <= now
        )
    ).all()
    removed = []
    for row in due:
        result = session.execute(
            update(NodeKey)
            .where(NodeKey.id == row.id, NodeKey.revoked_at.is_(None))
            .values(revoked_at=now, reason="expired")
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0) == 1:
            removed.append(row.event("expired"))
    return NodeKeyChanges(removed=tuple(removed))


def valid_node_keys(session: Session, now: float) -> tuple[bus.NodeKeyEvent, ...]:
    rows = session.scalars(select(NodeKey).where(NodeKey.revoked_at.is_(None)).order_by(NodeKey.id)).all()
    return tuple(r.event() for r in rows if r.expires_at is None or r.expires_at > now)
