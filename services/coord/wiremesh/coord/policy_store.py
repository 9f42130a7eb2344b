"""Coord's side of the ACL policy: the policy in force, stored in the database, compiled over
the mesh's nodes into visible peers and per-node packet filters.

`PolicyMesh` is a drop-in `Mesh` whose visibility comes from the policy compiler instead of
the static modes, and which remembers which nodes' packet filters changed so their streams
can be sent the new filter. `PolicyService` validates, stores and applies new policies and
serves the admin endpoints (`GET/PUT /api/v1/policy`).

The policy text lives in the `coord_settings` table (one row), so every replica reads the
same policy; a replica that sets it publishes `bus.POLICY_CHANGED` and the others reload.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Gauge
from sqlalchemy.orm import Session

from wiremesh.coord.mesh import Mesh
from wiremesh.coord.store import NodeRecord, Setting
from wiremesh.core.policy import (
    Policy,
    PolicyCompiler,
    PolicyNode,
    auto_approved,
    check_policy,
    run_tests,
)
from wiremesh.core.policy.hujson import MAX_TEXT

log = logging.getLogger("wiremesh.coord.policy")
SETTING_NAME = "acl_policy"


def policy_node(record: NodeRecord) -> PolicyNode:
    return PolicyNode(
        id=record.id,
        user=record.user,
        tags=frozenset(record.tags),
        addresses=tuple(a for a in (record.ipv4, record.ipv6) if a),
        routes=tuple(record.approved_routes),
        groups=frozenset(record.user_groups),
    )


class PolicyMesh(Mesh):
    """A Mesh whose "who sees whom" is the compiled policy (no policy: everyone sees everyone)."""

    def __init__(self, visibility: str = "all", policy: Policy | None = None) -> None:
        super().__init__(visibility)
        self.compiler = PolicyCompiler(policy, ())
        # Nodes whose compiled output (peers or packet filter) changed since last taken.
        self.filter_changed: set[int] = set()

    # visibility, from the compiler
    def _can_see(self, viewer: NodeRecord, peer: NodeRecord) -> bool:
        if viewer.id == peer.id or peer.expired:
            return False
        try:
            return self.compiler.compiled(viewer.id).can_see(peer.id)
        except KeyError:
            return False

    def _candidates(self, record: NodeRecord) -> frozenset[int]:
        # Visibility is symmetric (either side may reach the other), so a node's peers are
        # also exactly the nodes that see it.
        try:
            return self.compiler.compiled(record.id).reach  # may include itself; _can_see says no
        except KeyError:
            return frozenset()

    def upsert(self, record: NodeRecord) -> set[int]:
        old = self.records.get(record.id)
        before = set(self.viewers(old)) if old is not None else set()
        known = record.id in self.compiler
        if record.expired:
            # An expired node is nobody's peer and nobody's source until it logs in again.
            changed = self.compiler.remove_node(record.id) if known else set()
        elif known:
            changed = self.compiler.update_node(policy_node(record))
        else:
            changed = self.compiler.add_node(policy_node(record))
        self.filter_changed |= changed
        affected = super().upsert(record) | before
        if old is not None and record.id in changed:
            affected.add(record.id)  # what it may see changed: its own stream needs a full netmap
        return affected

    def remove(self, node_id: int) -> set[int]:
        old = self.records.get(node_id)
        if old is None:
            return set()
        before = set(self.viewers(old))
        changed = self.compiler.remove_node(node_id)
        affected = super().remove(node_id)
        changed.discard(node_id)
        self.filter_changed |= changed
        return affected | before | changed

    def set_policy(self, policy: Policy | None) -> set[int]:
        """Swap the policy; returns the nodes whose peers or filter changed."""
        changed = self.compiler.set_policy(policy)
        self.filter_changed |= changed
        return changed

    def take_filter_changed(self) -> set[int]:
        changed, self.filter_changed = self.filter_changed, set()
        return changed

    def packet_filter(self, node_id: int) -> list[dict[str, Any]]:
        try:
            return self.compiler.compiled(node_id).packet_filter()
        except KeyError:
            return []

    def packet_filter_json(self, node_id: int) -> bytes:
        return json.dumps(self.packet_filter(node_id), separators=(",", ":")).encode()


class PolicyRejected(ValueError):
    """The policy is invalid or its tests fail; `errors` says where and why."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__(
            "; ".join(errors[:3]) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")
        )
        self.errors = errors


def validate(text: str | bytes, nodes: list[PolicyNode] | None = None) -> tuple[Policy, list[str]]:
    """Parse, validate and run the tests; returns (policy, warnings) or raises PolicyRejected."""
    if len(text) > MAX_TEXT:
        raise PolicyRejected([f"policy larger than {MAX_TEXT} bytes"])
    policy, diagnostics = check_policy(text)
    if policy is None:
        raise PolicyRejected([d.format("policy") for d in diagnostics if d.severity == "error"])
    failures = run_tests(policy, nodes or ())
    if failures:
        raise PolicyRejected([f.format("policy") for f in failures])
    return policy, [d.format("policy") for d in diagnostics if d.severity == "warning"]


# ---- storage (coord_settings row) ----


def load(session: Session) -> tuple[str | None, int]:
    """(policy text or None for "no policy set", version)."""
    row = session.get(Setting, SETTING_NAME)
    if row is None:
        return None, 0
    try:
        raw = json.loads(row.value)
        return raw.get("text"), int(raw.get("version", 0))
    except (ValueError, TypeError, AttributeError):
        log.error("stored_policy_unreadable")
        return None, 0


def save(session: Session, text: str | None, clock: Callable[[], float] = time.time) -> int:
    """Store the policy (None clears it); returns the new version."""
    row = session.get(Setting, SETTING_NAME)
    version = 1
    if row is not None:
        try:
            version = int(json.loads(row.value).get("version", 0)) + 1
        except (ValueError, TypeError, AttributeError):
            version = 1
    value = json.dumps({"text": text, "version": version, "updated_at": clock()})
    if row is None:
        session.add(Setting(name=SETTING_NAME, value=value))
    else:
        row.value = value
    session.commit()
    return version


# ---- the service: what the coordinator and the admin API call ----


class PolicyService:
    """Loads, validates, stores, applies and announces the policy for one coord replica.

    `coord` is the Coordinator (duck-typed to avoid an import cycle): it provides `mesh`
    (a PolicyMesh), `streams`, `db`, `nc`, `config.replica_id` and `apply_auto_approvals()`.
    """

    def __init__(self, coord: Any) -> None:
        self.coord = coord
        self.text: str | None = None
        self.version = 0
        self.warnings: list[str] = []
        self.rules = 0
        self.current: Policy | None = None  # None: no policy set (allow all)
        self._updates: Counter | None = None

    @property
    def mesh(self) -> PolicyMesh:
        mesh: PolicyMesh = self.coord.mesh
        return mesh

    def _register_metrics(self) -> None:
        registry = getattr(self.coord, "registry", None)
        if registry is None or self._updates is not None:
            return
        Gauge(
            "wiremesh_coord_policy_version",
            "version of the ACL policy in force (0: none set, allow all)",
            registry=registry,
        ).set_function(lambda: self.version)
        Gauge(
            "wiremesh_coord_policy_rules", "network rules in the ACL policy in force", registry=registry
        ).set_function(lambda: self.rules)
        self._updates = Counter(
            "wiremesh_coord_policy_updates",
            "policy updates through the admin API",
            ["outcome"],
            registry=registry,
        )

    async def load(self) -> None:
        """Apply the stored policy (at start, and when another replica changed it)."""
        self._register_metrics()
        text, version = await self.coord.db.run(load)
        policy: Policy | None = None
        if text is not None:
            # Its tests passed when it was set; they are not re-run here, since a node set that
            # changed since must not undo a policy in force.
            parsed, diagnostics = check_policy(text)
            if parsed is None:
                # Fail closed: a stored policy we cannot read (say, after a downgrade) must not
                # turn into allow-all.
                log.error(
                    "stored_policy_unreadable action=deny_all errors=%r",
                    [d.format("policy") for d in diagnostics if d.severity == "error"][:3],
                )
                parsed = Policy((), {}, {}, {}, {}, ())
            policy = parsed
            self.warnings = [d.format("policy") for d in diagnostics if d.severity == "warning"]
        self.text, self.version = text, version
        self._apply(policy)

    async def subscribe(self, nc: Any) -> None:
        from wiremesh.core import bus

        async def on_changed(msg: Any) -> None:
            try:
                event = bus.decode(bus.PolicyChanged, msg.data)
            except ValueError:
                return
            if event.origin != self.coord.config.replica_id and event.version != self.version:
                await self.load()

        await nc.subscribe(bus.POLICY_CHANGED, cb=on_changed)

    async def set_policy(self, text: str | None) -> dict[str, Any]:
        """Validate (raises PolicyRejected), store, apply and announce a new policy;
        None clears it (back to allow-all)."""
        policy = None
        warnings: list[str] = []
        if text is not None:
            try:
                policy, warnings = validate(text, self.mesh.compiler.nodes())
            except PolicyRejected:
                if self._updates is not None:
                    self._updates.labels("rejected").inc()
                raise
        version = await self.coord.db.run(lambda s: save(s, text))
        self.text, self.version, self.warnings = text, version, warnings
        changed = self._apply(policy)
        if self._updates is not None:
            self._updates.labels("applied").inc()
        await self._announce(version)
        # Advertisements waiting for an admin that the new policy's autoApprovers cover. Only the
        # replica that set the policy does this; the others learn it as ordinary node changes.
        await self.coord.apply_auto_approvals()
        log.info(
            "policy_set version=%d rules=%d nodes_changed=%d",
            version,
            len(policy.rules) if policy else 0,
            len(changed),
        )
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return {"policy": self.text, "version": self.version, "warnings": self.warnings}

    # ---- routes: what the policy's autoApprovers approve

    def auto_approved(
        self, user: str, tags: tuple[str, ...], advertised: tuple[str, ...], groups: tuple[str, ...] = ()
    ) -> tuple[str, ...]:
        node = PolicyNode(id=0, user=user, tags=frozenset(tags), groups=frozenset(groups))
        return auto_approved(self.current, node, advertised)

    # ---- tags: who may apply which (the policy's tagOwners)

    def undefined_tags(self, tags: Iterable[str]) -> list[str]:
        """Tags an admin may not apply: those the policy in force does not define in tagOwners.

        With no policy set every tag is allowed (nothing says which tags exist yet)."""
        if self.current is None:
            return []
        return self.current.undefined_tags(tags)

    def grant_requested_tags(
        self,
        user: str,
        carried: tuple[str, ...],
        requested: tuple[str, ...],
        user_groups: tuple[str, ...] = (),
    ) -> tuple[tuple[str, ...], tuple[str, ...], str]:
        """(granted, refused, why) for the tags a node asks for itself.

        A tag is granted when the node already carries it (tags stay when the policy changes,
        as in Tailscale) or the node's user owns it per tagOwners (the user, a group with the
        user, autogroup:member, or a tag the node carries). With no policy set nobody owns a
        tag, so every new request is refused: a node may not leave its user's identity (and
        key expiry, which tagged nodes skip) on its own say-so."""
        granted: list[str] = []
        refused: list[str] = []
        reasons: list[str] = []
        for tag in requested:
            if tag in carried:
                granted.append(tag)
            elif self.current is None:
                refused.append(tag)
                reasons.append(f"{tag}: no policy is set, so no tag has owners")
            elif tag not in self.current.tag_owners:
                refused.append(tag)
                reasons.append(f"{tag}: not defined in the policy's tagOwners")
            elif self.current.tag_owner_allows(user, tag, (*carried, *granted), user_groups):
                granted.append(tag)
            else:
                refused.append(tag)
                reasons.append(f"{tag}: user {user or '-'} does not own it in the policy's tagOwners")
        return tuple(granted), tuple(refused), "; ".join(reasons)

    def _apply(self, policy: Policy | None) -> set[int]:
        self.current = policy
        self.rules = len(policy.rules) if policy is not None else 0
        changed = self.mesh.set_policy(policy)
        self.mesh.take_filter_changed()
        for node_id in changed:
            for stream in self.coord.streams.get(node_id, ()):
                stream.full = True  # peers and filter may both have changed: resend the netmap
                stream.wake.set()
        return changed

    def flush_filter_changes(self) -> None:
        """After a node change: streams of nodes whose filter changed get a delta with it."""
        for node_id in self.mesh.take_filter_changed():
            for stream in self.coord.streams.get(node_id, ()):
                stream.self_dirty = True
                stream.wake.set()

    async def _announce(self, version: int) -> None:
        from wiremesh.core import bus

        nc = self.coord.nc
        if nc is None or not nc.is_connected:
            return
        try:
            await nc.publish(
                bus.POLICY_CHANGED,
                bus.encode(bus.PolicyChanged(version=version, origin=self.coord.config.replica_id)),
            )
        except Exception as exc:  # other replicas catch up on their next reload
            log.warning("policy_announce_failed error=%r", str(exc))


def add_routes(app: Any, coord: Any, guarded: list[Any], prefix: str = "/api/v1") -> None:
    """GET/PUT/DELETE {prefix}/policy on coord's FastAPI app (admin key required)."""

    @app.get(f"{prefix}/policy", dependencies=guarded)
    async def get_policy() -> dict[str, Any]:
        result: dict[str, Any] = coord.policy.describe()
        return result

    @app.put(f"{prefix}/policy", dependencies=guarded)
    async def put_policy(request: Request) -> Any:
        body = await request.body()
        if len(body) > MAX_TEXT:
            raise HTTPException(413, f"policy larger than {MAX_TEXT} bytes")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise HTTPException(400, "policy is not UTF-8 text") from None
        try:
            return await coord.policy.set_policy(text)
        except PolicyRejected as exc:
            # The policy in force stays in force.
            return JSONResponse({"detail": "policy rejected", "errors": exc.errors}, status_code=400)

    @app.delete(f"{prefix}/policy", dependencies=guarded)
    async def delete_policy() -> dict[str, Any]:
        result: dict[str, Any] = await coord.policy.set_policy(None)
        return result
