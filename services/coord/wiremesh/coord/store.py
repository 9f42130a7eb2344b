"""Coord's tables and the synchronous operations on them (one Session per call).

Coord owns nodes, users, addresses, endpoints, routes and online state. Node rows are
turned into frozen `NodeRecord`s right away so the in-memory mesh state never holds ORM
objects across threads.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

IPV4_BASE = ipaddress.IPv4Network("100.64.0.0/10")
IPV6_BASE = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
# Addresses a Tailscale user expects never to be handed out: quad-100 (MagicDNS).
_RESERVED_V4 = {ipaddress.IPv4Address("100.100.100.100")}


class Base(DeclarativeBase):
    pass


class Setting(Base):
    __tablename__ = "coord_settings"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "coord_users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[float] = mapped_column(Float)
    # The user's identity-provider groups as of their last OIDC login (folded "eng@example.com").
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)


class NodeRow(Base):
    __tablename__ = "coord_nodes"
    __table_args__ = {"sqlite_autoincrement": True}  # ids are never reused (migration c0003)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    machine_key: Mapped[str] = mapped_column(String(64), unique=True)
    node_key: Mapped[str] = mapped_column(String(64), index=True)
    disco_key: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("coord_users.id"))
    tags: Mapped[list[str]] = mapped_column(JSON)
    addr_index: Mapped[int] = mapped_column(Integer, unique=True)
    ipv4: Mapped[str] = mapped_column(String(64), unique=True)
    ipv6: Mapped[str] = mapped_column(String(64), unique=True)
    ephemeral: Mapped[bool] = mapped_column(Boolean)
    auth_key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    key_expiry: Mapped[float | None] = mapped_column(Float, nullable=True)
    expired: Mapped[bool] = mapped_column(Boolean, default=False)
    endpoints: Mapped[list[str]] = mapped_column(JSON)
    advertised_routes: Mapped[list[str]] = mapped_column(JSON)
    approved_routes: Mapped[list[str]] = mapped_column(JSON)
    home_relay: Mapped[int | None] = mapped_column(Integer, nullable=True)


class HandshakeRow(Base):
    """An accepted agent handshake, by its ephemeral key: the replay guard every replica shares.

    The primary key is the uniqueness constraint that makes a replay lose even when it races
    the original to another replica. Rows go once the handshake is stale on every replica.
    """

    __tablename__ = "coord_handshakes"
    ephemeral: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    expires_at: Mapped[float] = mapped_column(Float, index=True)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeRecord:
    id: int
    machine_key: str
    node_key: str
    disco_key: str
    hostname: str
    name: str
    user: str
    tags: tuple[str, ...]
    ipv4: str
    ipv6: str
    ephemeral: bool
    created_at: float
    last_seen: float | None
    online: bool
    key_expiry: float | None
    expired: bool
    endpoints: tuple[str, ...]
    advertised_routes: tuple[str, ...]
    approved_routes: tuple[str, ...]
    home_relay: int | None
    # The pre-auth key the node last registered with: what binds a MeshNode to its node (the
    # hostname is the node's own say-so, so it never does).
    auth_key_id: int | None = None
    user_groups: tuple[str, ...] = ()  # the user's IdP groups (policy `group:NAME@DOMAIN`)

    def to_admin_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        del out["machine_key"]
        out["addresses"] = [self.ipv4, self.ipv6]
        return out


class StoreError(ValueError):
    """A request coord refuses; the message is meant for the user."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _record(row: NodeRow, user: str, groups: list[str] | None = None) -> NodeRecord:
    return NodeRecord(
        id=row.id,
        machine_key=row.machine_key,
        node_key=row.node_key,
        disco_key=row.disco_key,
        hostname=row.hostname,
        name=row.name,
        user=user,
        tags=tuple(row.tags),
        ipv4=row.ipv4,
        ipv6=row.ipv6,
        ephemeral=row.ephemeral,
        created_at=row.created_at,
        last_seen=row.last_seen,
        online=row.online,
        key_expiry=row.key_expiry,
        expired=row.expired,
        endpoints=tuple(row.endpoints),
        advertised_routes=tuple(row.advertised_routes),
        approved_routes=tuple(row.approved_routes),
        home_relay=row.home_relay,
        auth_key_id=row.auth_key_id,
        user_groups=tuple(groups or ()),
    )


def get_setting(session: Session, name: str) -> str | None:
    row = session.get(Setting, name)
    return None if row is None else row.value


def set_setting_once(session: Session, name: str, value: str) -> str:
    """Store `value` unless another replica already did; returns the stored value."""
    existing = session.get(Setting, name)
    if existing is not None:
        return existing.value
    session.add(Setting(name=name, value=value))
    session.flush()
    return value


def load_all(session: Session) -> list[NodeRecord]:
    rows = session.execute(
        select(NodeRow, User.name, User.groups).join(User, NodeRow.user_id == User.id)
    ).all()
    return [_record(row, user, groups) for row, user, groups in rows]


def load_node(session: Session, node_id: int) -> NodeRecord | None:
    found = session.execute(
        select(NodeRow, User.name, User.groups)
        .join(User, NodeRow.user_id == User.id)
        .where(NodeRow.id == node_id)
    ).one_or_none()
    return None if found is None else _record(found[0], found[1], found[2])


def set_user_groups(session: Session, name: str, groups: tuple[str, ...], now: float) -> list[int]:
    """Record a user's IdP groups (creating the user if new); the ids of the user's nodes when
    the groups changed (their policy identity changed with them), else []."""
    uid = ensure_user(session, name, now)
    user = session.get(User, uid)
    assert user is not None
    if list(groups) == list(user.groups or []):
        return []
    user.groups = list(groups)
    session.flush()
    return list(session.scalars(select(NodeRow.id).where(NodeRow.user_id == uid)).all())


def node_by_machine_key(session: Session, machine_key: str) -> NodeRecord | None:
    row = session.scalars(select(NodeRow).where(NodeRow.machine_key == machine_key)).one_or_none()
    return None if row is None else load_node(session, row.id)


def ensure_user(session: Session, name: str, now: float) -> int:
    """The id of the user called `name`, created if new."""
    user = session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is not None:
        return user.id
    try:
        with session.begin_nested():
            user = User(name=name, created_at=now, groups=[])
            session.add(user)
            session.flush()
        return user.id
    except IntegrityError:
        # Another replica created the user meanwhile (two of its first nodes logging in at once).
        return session.scalars(select(User.id).where(User.name == name)).one()


def address_for(index: int) -> tuple[str, str]:
    v4 = IPV4_BASE.network_address + index
    v6 = IPV6_BASE.network_address + index
    return str(v4), str(v6)


def _usable_index(index: int) -> bool:
    # Addresses ending in .0 or .255 are ordinary hosts inside the /10 and are handed out too:
    # unbroken runs of addresses keep every packet-filter source set a few CIDR prefixes (a gap
    # every 256 nodes would cost ~14 prefixes per 256 sources, IPv4 and IPv6 alike).
    if not 0 < index < IPV4_BASE.num_addresses - 1:
        return False
    return IPV4_BASE.network_address + index not in _RESERVED_V4


def _next_index(session: Session) -> int:
    """The next address index after the highest in use; wraps to the lowest free one when full.

    Counting up (rather than filling the lowest hole) means an address freed by a deleted
    node is not handed out again soon, so stale peers never see it on a different node.
    """
    highest = session.scalar(select(func.max(NodeRow.addr_index))) or 0
    candidate = highest + 1
    while candidate < IPV4_BASE.num_addresses - 1 and not _usable_index(candidate):
        candidate += 1
    if candidate < IPV4_BASE.num_addresses - 1:
        return candidate
    used = set(session.scalars(select(NodeRow.addr_index)).all())
    for index in range(1, IPV4_BASE.num_addresses - 1):
        if index not in used and _usable_index(index):
            return index
    raise StoreError("address space exhausted", 507)


def _unique_name(session: Session, hostname: str, exclude_id: int | None = None) -> str:
    taken = set(
        session.scalars(
            select(NodeRow.name).where(NodeRow.name.like(f"{hostname}%"), NodeRow.id != (exclude_id or -1))
        ).all()
    )
    if hostname not in taken:
        return hostname
    n = 1
    while f"{hostname}-{n}" in taken:
        n += 1
    return f"{hostname}-{n}"


@dataclasses.dataclass(frozen=True, slots=True)
class NewNode:
    machine_key: str
    node_key: str
    disco_key: str
    hostname: str
    user: str
    tags: tuple[str, ...]
    ephemeral: bool
    auth_key_id: int | None
    key_expiry: float | None
    endpoints: tuple[str, ...]
    advertised_routes: tuple[str, ...]
    approved_routes: tuple[str, ...] = ()  # what the policy's autoApprovers approve at once


def create_node(session: Session, new: NewNode, now: float) -> NodeRecord:
    user_id = ensure_user(session, new.user, now)
    for _attempt in range(20):
        index = _next_index(session)
        v4, v6 = address_for(index)
        row = NodeRow(
            machine_key=new.machine_key,
            node_key=new.node_key,
            disco_key=new.disco_key,
            hostname=new.hostname,
            name=_unique_name(session, new.hostname),
            user_id=user_id,
            tags=list(new.tags),
            addr_index=index,
            ipv4=v4,
            ipv6=v6,
            ephemeral=new.ephemeral,
            auth_key_id=new.auth_key_id,
            created_at=now,
            last_seen=now,
            online=False,
            key_expiry=new.key_expiry,
            expired=False,
            endpoints=list(new.endpoints),
            advertised_routes=list(new.advertised_routes),
            approved_routes=list(new.approved_routes),
            home_relay=None,
        )
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError:
            # Another replica took this address or name first, or the machine registered twice.
            if node_by_machine_key(session, new.machine_key) is not None:
                raise StoreError("machine already registered", 409) from None
            continue
        record = load_node(session, row.id)
        assert record is not None
        return record
    raise StoreError("could not allocate an address; try again", 503)


def update_node(session: Session, node_id: int, **values: Any) -> NodeRecord:
    row = session.get(NodeRow, node_id)
    if row is None:
        raise StoreError(f"no node with id {node_id}", 404)
    if "name" in values and values["name"] != row.name:
        clash = session.scalars(select(NodeRow.id).where(NodeRow.name == values["name"])).first()
        if clash is not None:
            raise StoreError(f"name {values['name']!r} is already taken", 409)
    if "hostname" in values and "name" not in values and values["hostname"] != row.hostname:
        values["name"] = _unique_name(session, values["hostname"], exclude_id=node_id)
    if "user" in values:  # a re-authentication as another user moves the node to them
        values["user_id"] = ensure_user(session, values.pop("user"), time.time())
    for key, value in values.items():
        setattr(row, key, list(value) if isinstance(value, tuple) else value)
    session.flush()
    record = load_node(session, node_id)
    assert record is not None
    return record


def delete_node(session: Session, node_id: int) -> NodeRecord:
    record = load_node(session, node_id)
    if record is None:
        raise StoreError(f"no node with id {node_id}", 404)
    row = session.get(NodeRow, node_id)
    session.delete(row)
    return record


def set_presence(session: Session, node_ids: list[int], online: bool, now: float) -> None:
    for start in range(0, len(node_ids), 500):
        chunk = node_ids[start : start + 500]
        session.execute(
            update(NodeRow)
            .where(NodeRow.id.in_(chunk))
            .values(online=online, last_seen=now)
            .execution_options(synchronize_session=False)
        )


def stale_online(session: Session, before: float) -> list[int]:
    """Nodes still marked online whose replica stopped refreshing them (it crashed)."""
    return list(
        session.scalars(select(NodeRow.id).where(NodeRow.online.is_(True), NodeRow.last_seen < before)).all()
    )


def ephemeral_gone(session: Session, before: float) -> list[int]:
    return list(
        session.scalars(
            select(NodeRow.id).where(
                NodeRow.ephemeral.is_(True), NodeRow.online.is_(False), NodeRow.last_seen < before
            )
        ).all()
    )


def node_by_key(session: Session, node_key: str) -> NodeRecord | None:
    row = session.scalars(select(NodeRow).where(NodeRow.node_key == node_key)).first()
    return None if row is None else load_node(session, row.id)


def node_id_by_disco_key(session: Session, disco_key: str) -> int | None:
    return session.scalars(select(NodeRow.id).where(NodeRow.disco_key == disco_key)).first()


def counts(session: Session) -> dict[str, int]:
    return {
        "nodes": session.scalar(select(func.count(NodeRow.id))) or 0,
        "users": session.scalar(select(func.count(User.id))) or 0,
    }


_CLAIM_HANDSHAKE: dict[str, Any] = {}  # dialect name -> INSERT ... ON CONFLICT DO NOTHING RETURNING


def _claim_statement(dialect: str) -> Any:
    statement = _CLAIM_HANDSHAKE.get(dialect)
    if statement is None:
        from sqlalchemy.dialects import postgresql, sqlite

        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        table: Any = HandshakeRow.__table__
        # Built once on the Table, run on the Core connection: the ORM insert path costs
        # several times the database's own work, and this runs for every agent request.
        statement = insert(table).on_conflict_do_nothing().returning(table.c.expires_at)
        _CLAIM_HANDSHAKE[dialect] = statement
    return statement


def record_handshake(session: Session, ephemeral: bytes, expires_at: float) -> bool:
    """Record an agent handshake's ephemeral key; False if some replica already recorded it.

    One INSERT that does nothing on conflict: on PostgreSQL a concurrent insert of the same key
    waits for the first to commit and then does nothing, so exactly one caller sees True.
    """
    dialect = session.get_bind().dialect.name
    values = {"ephemeral": ephemeral, "expires_at": expires_at}
    if dialect in ("postgresql", "sqlite"):
        # A returned row means this insert happened (psycopg reports no rowcount for it).
        return session.connection().execute(_claim_statement(dialect), values).first() is not None
    try:  # any other database: let the primary key refuse the duplicate
        with session.begin_nested():
            session.add(HandshakeRow(**values))
    except IntegrityError:
        return False
    return True


def forget_handshakes(session: Session, now: float) -> int:
    """Delete handshakes that are stale by now (a replay of them is refused as stale); how many."""
    result: Any = session.execute(delete(HandshakeRow).where(HandshakeRow.expires_at < now))
    return int(result.rowcount)
