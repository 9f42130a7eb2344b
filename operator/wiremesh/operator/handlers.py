"""kopf handlers: MeshNode and ACL resources turned into coord configuration through coord's
admin API, and coord's view written back into their status.

Status comes from polling coord (a kopf timer per resource, every `poll_interval` seconds):
the admin API already has everything the status shows, it works against any coord replica
without giving the operator NATS credentials, and a missed poll heals itself at the next one.

Handlers are registered on a registry built per operator (`make_registry`), so tests and
embedders can run several with different settings in one process.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import logging
from typing import Any

import kopf

from wiremesh.operator import acl as aclmod
from wiremesh.operator import meshnode as mn
from wiremesh.operator.coord import CoordAdmin, CoordError
from wiremesh.operator.proxycontrol import ProxyConfig, ProxyController
from wiremesh.operator.proxycontrol import register as register_proxies

GROUP = "wiremesh.dev"
VERSION = "v1alpha1"
MESHNODES = "meshnodes"
ACLS = "acls"
FINALIZER = f"{GROUP}/operator"
MANAGED_BY = {"app.kubernetes.io/managed-by": "wiremesh-operator"}

log = logging.getLogger("wiremesh.operator")


@dataclasses.dataclass
class OperatorConfig:
    coord_url: str
    admin_key: str
    namespace: str = "wiremesh"  # where the auth-key Secrets live
    # Where the Secrets of mirrored cluster Nodes go instead (empty: `namespace`): a namespace
    # holding nothing else, so the node agents may be allowed to read Secrets there.
    node_keys_namespace: str = ""
    login_server: str = ""  # the coord URL agents use (default: coord_url)
    poll_interval: float = 10.0
    auth_key_expiration: str = "24h"
    manage_tags: bool = True
    mirror_nodes: bool = True  # a MeshNode per cluster Node, advertising its pod CIDR
    approve_pod_routes: bool = True  # and approving it (see mirror_spec)
    node_tags: tuple[str, ...] = ("tag:k8s-node",)
    # Routes every mirrored Node also advertises (and approves with approve_pod_routes): the
    # cluster's Service CIDR, so mesh devices reach cluster IPs and the cluster DNS. Every node
    # offers them; coord elects one primary (HA subnet routers).
    service_routes: tuple[str, ...] = ()
    proxies: ProxyConfig | None = None  # Services on the mesh (proxies.py); None: off


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _retry(exc: CoordError) -> kopf.TemporaryError:
    return kopf.TemporaryError(str(exc), delay=5)


class KubeObjects:
    """The auth-key Secrets and mirrored MeshNodes, through the official client (sync, so run
    in a thread)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._api: Any = None

    def _core(self) -> Any:
        if self._api is None:
            import kubernetes

            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            self._api = kubernetes.client.CoreV1Api()
        return self._api

    async def read(self, name: str, namespace: str | None = None) -> dict[str, str] | None:
        ns = namespace or self.namespace

        def read() -> dict[str, str] | None:
            from kubernetes.client.exceptions import ApiException

            try:
                secret = self._core().read_namespaced_secret(name, ns)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            return {k: base64.b64decode(v).decode() for k, v in (secret.data or {}).items()}

        return await asyncio.to_thread(read)

    async def write(
        self,
        name: str,
        data: dict[str, str],
        owner: dict[str, Any],
        labels: dict[str, str],
        namespace: str | None = None,
    ) -> None:
        """Create or replace the Secret (owned by the MeshNode, so a cluster with a garbage
        collector removes it with the MeshNode even if the operator is gone)."""
        ns = namespace or self.namespace

        def write() -> None:
            from kubernetes.client.exceptions import ApiException

            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": {**MANAGED_BY, **labels},
                    "ownerReferences": [owner],
                },
                "stringData": data,
            }
            api = self._core()
            try:
                api.create_namespaced_secret(ns, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                api.replace_namespaced_secret(name, ns, body)

        await asyncio.to_thread(write)

    async def delete(self, name: str, namespace: str | None = None) -> None:
        ns = namespace or self.namespace

        def delete() -> None:
            from kubernetes.client.exceptions import ApiException

            try:
                self._core().delete_namespaced_secret(name, ns)
            except ApiException as exc:
                if exc.status != 404:
                    raise

        await asyncio.to_thread(delete)

    # MeshNodes the operator itself owns (mirrors of cluster Nodes); sync, run in a thread.
    def upsert_meshnode(self, body: dict[str, Any]) -> None:
        from kubernetes.client import CustomObjectsApi
        from kubernetes.client.exceptions import ApiException

        self._core()  # loads the configuration
        api = CustomObjectsApi()
        name = body["metadata"]["name"]
        try:
            current: Any = api.get_cluster_custom_object(GROUP, VERSION, MESHNODES, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            api.create_cluster_custom_object(GROUP, VERSION, MESHNODES, body)
            return
        labels = (current.get("metadata") or {}).get("labels") or {}
        if labels.get("app.kubernetes.io/managed-by") != MANAGED_BY["app.kubernetes.io/managed-by"]:
            log.warning("node_mirror_skipped name=%s: a MeshNode of that name is not ours", name)
            return
        spec = current.get("spec") or {}
        # Only the fields the mirror manages (a merge patch leaves an admin's approvedRoutes be
        # when pod routes are not approved automatically).
        if {key: spec.get(key) for key in body["spec"]} != body["spec"]:
            api.patch_cluster_custom_object(GROUP, VERSION, MESHNODES, name, {"spec": body["spec"]})

    def delete_meshnode(self, name: str) -> None:
        from kubernetes.client import CustomObjectsApi
        from kubernetes.client.exceptions import ApiException

        self._core()
        try:
            current: Any = CustomObjectsApi().get_cluster_custom_object(GROUP, VERSION, MESHNODES, name)
            labels = (current.get("metadata") or {}).get("labels") or {}
            if mn.NODE_LABEL in labels:
                CustomObjectsApi().delete_cluster_custom_object(GROUP, VERSION, MESHNODES, name)
        except ApiException as exc:
            if exc.status != 404:
                raise


class Operator:
    """The reconcilers, with the clients they share."""

    def __init__(
        self, config: OperatorConfig, coord: CoordAdmin | None = None, secrets: KubeObjects | None = None
    ) -> None:
        self.config = config
        self.coord = coord or CoordAdmin(config.coord_url, config.admin_key)
        self.secrets = secrets or KubeObjects(config.namespace)
        # coord node id -> MeshNode name, so two MeshNodes never claim one node.
        self.claims: dict[int, str] = {}
        self.mirrored: dict[str, dict[str, Any]] = {}  # Node name -> the MeshNode spec last written

    # ---- ACL ----

    async def reconcile_acl(self, body: kopf.Body, spec: Any, status: Any, patch: kopf.Patch) -> None:
        generation = body.metadata.get("generation")
        checked = aclmod.check_spec(dict(spec))
        if not checked.valid:
            self._acl_invalid(body, patch, status, checked.problems, generation, checked.warnings)
            return
        try:
            reply = await self.coord.set_policy(checked.text)
        except CoordError as exc:
            if exc.retryable:
                raise _retry(exc) from None
            problems = aclmod.parse_coord_errors(exc.errors, exc.detail)
            self._acl_invalid(body, patch, status, problems, generation, checked.warnings)
            return
        version = int(reply.get("version") or 0)
        patch.status.update(aclmod.applied_status(checked, generation, version))
        patch.status["conditions"] = aclmod.merge_conditions(
            status.get("conditions"),
            aclmod.condition("Applied", True, "PolicyApplied", f"coord policy version {version}", _now()),
        )
        kopf.event(body, type="Normal", reason="PolicyApplied", message=f"coord policy version {version}")
        log.info(
            "acl_applied name=%s generation=%s coord_version=%d", body.metadata.name, generation, version
        )

    def _acl_invalid(
        self,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Any,
        problems: tuple[aclmod.PolicyProblem, ...],
        generation: int | None,
        warnings: tuple[str, ...],
    ) -> None:
        patch.status.update(aclmod.invalid_status(problems, generation, warnings))
        first = str(problems[0])
        patch.status["conditions"] = aclmod.merge_conditions(
            status.get("conditions"),
            aclmod.condition(
                "Applied", False, "PolicyInvalid", f"previous policy stays in force: {first}", _now()
            ),
        )
        kopf.event(body, type="Warning", reason="PolicyInvalid", message=first[: aclmod.MAX_MESSAGE])
        log.warning("acl_invalid name=%s generation=%s error=%r", body.metadata.name, generation, first)

    async def acl_drift(self, body: kopf.Body, spec: Any, status: Any, patch: kopf.Patch) -> None:
        """Put the ACL's policy back if someone changed coord's policy behind its back."""
        if not status.get("valid") or status.get("appliedGeneration") != body.metadata.get("generation"):
            return
        checked = aclmod.check_spec(dict(spec))
        try:
            current = await self.coord.get_policy()
        except CoordError as exc:
            log.warning("acl_poll_failed error=%r", str(exc))
            return
        if current.get("policy") != checked.text and checked.valid:
            log.warning(
                "acl_drift name=%s coord_version=%s: re-applying", body.metadata.name, current.get("version")
            )
            await self.reconcile_acl(body, spec, status, patch)

    async def delete_acl(self, body: kopf.Body) -> None:
        """No ACL resource means no policy: coord goes back to its default (every node may reach
        every other), as a mesh with no policy file does."""
        try:
            await self.coord.clear_policy()
        except CoordError as exc:
            raise _retry(exc) from None
        log.info("acl_deleted name=%s: coord policy cleared", body.metadata.name)

    # ---- MeshNode ----

    def _owner(self, body: kopf.Body) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeshNode",
            "name": body.metadata.name,
            "uid": body.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    async def ensure_auth_key(
        self, body: kopf.Body, desired: mn.Desired, status: Any, patch: kopf.Patch
    ) -> None:
        """A one-off pre-auth key for the node, in a Secret the agent reads; created once, and
        again only when it expired unused (the node never registered)."""
        name = mn.secret_name(desired.name)
        namespace = self._secret_namespace(body)
        existing = await self.secrets.read(name, namespace)
        key_id = status.get("authKeyId")
        if existing and existing.get(mn.SECRET_KEY) and not await self._key_expired_unused(key_id, status):
            wanted = mn.secret_data(desired, existing[mn.SECRET_KEY], self._login_server())
            if any(existing.get(k) != v for k, v in wanted.items()):  # routes or hostname edited
                await self.secrets.write(
                    name,
                    {**existing, **wanted},
                    self._owner(body),
                    {f"{GROUP}/meshnode": desired.name},
                    namespace,
                )
            return
        if await self.issue_auth_key(body, desired, status, patch):
            patch.status["conditions"] = aclmod.merge_conditions(
                status.get("conditions"),
                aclmod.condition(
                    "Registered", False, "AwaitingLogin", f"agent joins with Secret {name}", _now()
                ),
            )

    def _secret_namespace(self, body: kopf.Body) -> str:
        """Mirrored cluster Nodes keep their Secrets apart (see OperatorConfig.node_keys_namespace)."""
        labels = body.metadata.get("labels") or {}
        if mn.NODE_LABEL in labels and self.config.node_keys_namespace:
            return self.config.node_keys_namespace
        return self.config.namespace

    async def issue_auth_key(
        self, body: kopf.Body, desired: mn.Desired, status: Any, patch: kopf.Patch
    ) -> bool:
        """Create a fresh one-off pre-auth key and (re)write the Secret with it; False when coord
        refused it (said in a condition and an event) or the operator must retry."""
        name = mn.secret_name(desired.name)
        namespace = self._secret_namespace(body)
        try:
            key = await self.coord.create_auth_key(
                desired.user,
                tags=list(desired.tags),
                ephemeral=desired.ephemeral,
                expiration=self.config.auth_key_expiration,
            )
        except CoordError as exc:
            if exc.retryable:
                raise _retry(exc) from None
            # Refused for good (a spec coord will not take): say so; a spec change retries.
            message = f"coord refused the pre-auth key: {exc.detail}"
            patch.status["conditions"] = aclmod.merge_conditions(
                status.get("conditions"),
                aclmod.condition("Registered", False, "AuthKeyRefused", message, _now()),
            )
            kopf.event(body, type="Warning", reason="AuthKeyRefused", message=message[: aclmod.MAX_MESSAGE])
            log.warning("meshnode_authkey_refused name=%s error=%r", desired.name, exc.detail)
            return False
        data = mn.secret_data(desired, str(key["key"]), self._login_server())
        labels = {f"{GROUP}/meshnode": desired.name}
        await self.secrets.write(name, data, self._owner(body), labels, namespace)
        patch.status["authKeySecret"] = f"{namespace}/{name}"
        patch.status["authKeyId"] = key.get("id")
        kopf.event(body, type="Normal", reason="AuthKeyCreated", message=f"pre-auth key in Secret {name}")
        log.info("meshnode_authkey name=%s secret=%s/%s", desired.name, namespace, name)
        return True

    async def _key_expired_unused(self, key_id: Any, status: Any) -> bool:
        if key_id is None or status.get("nodeId") is not None:
            return False
        try:
            keys = await self.coord.list_auth_keys()
        except CoordError:
            return False
        for key in keys:
            if key.get("id") == key_id:
                return bool(key.get("expired")) and not key.get("used_count")
        return True  # coord no longer knows it (a fresh coord database): issue a new one

    def _login_server(self) -> str:
        return self.config.login_server or self.config.coord_url

    async def reconcile_meshnode(self, body: kopf.Body, spec: Any, status: Any, patch: kopf.Patch) -> None:
        desired = mn.Desired.from_resource(body.metadata.name, dict(spec))
        await self.ensure_auth_key(body, desired, status, patch)
        await self.sync_meshnode(body, desired, status, patch)
        patch.status["observedGeneration"] = body.metadata.get("generation")

    async def sync_meshnode(
        self, body: kopf.Body, desired: mn.Desired, status: Any, patch: kopf.Patch
    ) -> None:
        """Find the node in coord, push tags and route approvals, write its state to status."""
        known = status.get("nodeId")
        try:
            nodes = await self.coord.list_nodes()
        except CoordError as exc:
            log.warning("meshnode_poll_failed name=%s error=%r", desired.name, str(exc))
            return
        claimed = {nid for nid, owner in self.claims.items() if owner != desired.name}
        keys = mn.key_ids(status)
        node = mn.find_node(nodes, known if isinstance(known, int) else None, keys, claimed)
        if node is None:
            log.debug("meshnode_unbound name=%s auth_keys=%s", desired.name, sorted(keys))
            if known is not None and not body.metadata.get("deletionTimestamp"):
                await self._node_gone(body, desired, status, patch, known)
            return
        node_id = int(node["id"])
        self.claims[node_id] = desired.name
        wanted = mn.changes(desired, node, self.config.manage_tags)
        try:
            if wanted.tags is not None:
                node = await self.coord.set_tags(node_id, list(wanted.tags))
            if wanted.approve:
                node = await self.coord.approve_routes(node_id, list(wanted.approve))
                kopf.event(body, type="Normal", reason="RoutesApproved", message=", ".join(wanted.approve))
            if wanted.unapprove:
                node = await self.coord.unapprove_routes(node_id, list(wanted.unapprove))
                kopf.event(body, type="Normal", reason="RoutesWithdrawn", message=", ".join(wanted.unapprove))
                log.info("meshnode_routes_withdrawn name=%s routes=%s", desired.name, wanted.unapprove)
        except CoordError as exc:
            if exc.retryable:
                raise _retry(exc) from None
            kopf.event(body, type="Warning", reason="CoordRefused", message=exc.detail[:500])
            log.warning("meshnode_sync_refused name=%s error=%r", desired.name, exc.detail)
        patch.status.update(mn.node_status(node))
        message = f"node {node.get('name')} ({node.get('ipv4')})"
        if wanted.waiting_routes:
            message += f"; waiting for it to advertise {', '.join(wanted.waiting_routes)}"
        patch.status["conditions"] = aclmod.merge_conditions(
            status.get("conditions"), aclmod.condition("Registered", True, "NodeRegistered", message, _now())
        )
        if known != node_id:
            kopf.event(body, type="Normal", reason="NodeRegistered", message=message)
            log.info("meshnode_registered name=%s node_id=%d", desired.name, node_id)

    async def _node_gone(
        self, body: kopf.Body, desired: mn.Desired, status: Any, patch: kopf.Patch, known: Any
    ) -> None:
        """The registered node left coord behind the operator's back (an admin deleted it, or
        coord lost its database) while the MeshNode still declares the device. Its private keys
        are on the device, so the operator cannot put it back itself: it issues a fresh one-off
        key into the Secret, and the agent rejoins with it once restarted (a deleted agent
        stays logged out until then, so the deletion still cuts the device off at once)."""
        if isinstance(known, int):
            self.claims.pop(known, None)
        patch.status.update(mn.gone_status())
        message = f"coord node {known} is gone (or re-registered with a key not issued for this MeshNode)"
        if await self.issue_auth_key(body, desired, status, patch):
            secret = f"{self._secret_namespace(body)}/{mn.secret_name(desired.name)}"
            message += (
                f"; a new one-off pre-auth key is in Secret {secret}:"
                " restart the agent (or run `wiremesh up --auth-key`) to rejoin"
            )
        patch.status["conditions"] = aclmod.merge_conditions(
            status.get("conditions"), aclmod.condition("Registered", False, "NodeGone", message, _now())
        )
        kopf.event(body, type="Warning", reason="NodeGone", message=message[: aclmod.MAX_MESSAGE])
        log.warning("meshnode_node_gone name=%s node_id=%s: new auth key issued", desired.name, known)

    async def poll_meshnode(self, body: kopf.Body, spec: Any, status: Any, patch: kopf.Patch) -> None:
        if body.metadata.get("deletionTimestamp"):
            return  # the delete handler owns the node and the Secret now
        desired = mn.Desired.from_resource(body.metadata.name, dict(spec))
        if status.get("nodeId") is None and status.get("authKeyId") is not None:
            await self.ensure_auth_key(body, desired, status, patch)  # re-issue an expired, unused key
        await self.sync_meshnode(body, desired, status, patch)

    async def delete_meshnode(self, body: kopf.Body, spec: Any, status: Any) -> None:
        """The device leaves the mesh: its coord node, its unused key and its Secret go."""
        desired = mn.Desired.from_resource(body.metadata.name, dict(spec))
        known = status.get("nodeId")
        try:
            if known is None:
                # It may have registered since the last poll.
                claimed = {nid for nid, owner in self.claims.items() if owner != desired.name}
                node = mn.find_node(await self.coord.list_nodes(), None, mn.key_ids(status), claimed)
                known = node.get("id") if node else None
            if known is not None:
                await self.coord.delete_node(int(known))
                self.claims.pop(int(known), None)
            key_id = status.get("authKeyId")
            if key_id is not None:
                try:
                    await self.coord.expire_auth_key(int(key_id))
                except CoordError as exc:
                    if exc.retryable:
                        raise
        except CoordError as exc:
            raise _retry(exc) from None
        await self.secrets.delete(mn.secret_name(desired.name), self._secret_namespace(body))
        log.info("meshnode_deleted name=%s node_id=%s", desired.name, known)

    # ---- cluster Nodes -> MeshNodes ----

    async def mirror_node(self, name: str, uid: str, spec: dict[str, Any]) -> None:
        """Create or update the MeshNode that mirrors cluster Node `name`."""
        wanted = mn.mirror_spec(
            name, spec, self.config.node_tags, self.config.approve_pod_routes, self.config.service_routes
        )
        if self.mirrored.get(name) == wanted:
            return  # most Node updates are status heartbeats
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeshNode",
            "metadata": {
                "name": mn.mirror_name(name),
                "labels": {**MANAGED_BY, mn.NODE_LABEL: mn.node_hostname(name)},
                # Owned by the Node: a cluster's garbage collector removes it with the Node.
                "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name, "uid": uid}],
            },
            "spec": wanted,
        }
        await asyncio.to_thread(self.secrets.upsert_meshnode, body)
        self.mirrored[name] = wanted
        log.info("node_mirrored node=%s routes=%s", name, body["spec"]["advertiseRoutes"])

    async def unmirror_node(self, name: str) -> None:
        self.mirrored.pop(name, None)
        await asyncio.to_thread(self.secrets.delete_meshnode, mn.mirror_name(name))
        log.info("node_unmirrored node=%s", name)


def make_registry(op: Operator) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    interval = op.config.poll_interval

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        # Keep kopf's bookkeeping in annotations: the status schema is ours.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        settings.posting.level = logging.WARNING  # our own events, not one per handler run
        settings.watching.server_timeout = 300
        settings.networking.request_timeout = 30
        # A deleted object keeps its finalizer until its poll timer has stopped. A timer caught in
        # a coord call outlives kopf's few zero-time cycles, and kopf then looks again only every
        # cancellation_polling seconds (60 by default): an ACL deletion took a minute. Give the
        # timer half a second to finish its call, and look again every 2 s.
        settings.background.instant_exit_timeout = 0.5
        settings.background.cancellation_polling = 2

    # A registry of our own starts with no login handlers: use the official client's
    # configuration (in-cluster service account, else $KUBECONFIG / ~/.kube/config).
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await op.coord.aclose()

    @kopf.on.resume(GROUP, VERSION, ACLS, registry=registry)
    @kopf.on.create(GROUP, VERSION, ACLS, registry=registry)
    @kopf.on.update(GROUP, VERSION, ACLS, field="spec", registry=registry)
    async def acl_changed(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, **_: Any
    ) -> None:
        await op.reconcile_acl(body, spec, status, patch)

    @kopf.timer(GROUP, VERSION, ACLS, interval=interval, initial_delay=interval, registry=registry)
    async def acl_poll(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, **_: Any
    ) -> None:
        await op.acl_drift(body, spec, status, patch)

    @kopf.on.delete(GROUP, VERSION, ACLS, registry=registry)
    async def acl_deleted(body: kopf.Body, **_: Any) -> None:
        await op.delete_acl(body)

    @kopf.on.resume(GROUP, VERSION, MESHNODES, registry=registry)
    @kopf.on.create(GROUP, VERSION, MESHNODES, registry=registry)
    @kopf.on.update(GROUP, VERSION, MESHNODES, field="spec", registry=registry)
    async def meshnode_changed(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, **_: Any
    ) -> None:
        await op.reconcile_meshnode(body, spec, status, patch)

    @kopf.timer(GROUP, VERSION, MESHNODES, interval=interval, registry=registry)
    async def meshnode_poll(
        body: kopf.Body, spec: kopf.Spec, status: kopf.Status, patch: kopf.Patch, **_: Any
    ) -> None:
        await op.poll_meshnode(body, spec, status, patch)

    @kopf.on.delete(GROUP, VERSION, MESHNODES, registry=registry)
    async def meshnode_deleted(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, **_: Any) -> None:
        await op.delete_meshnode(body, spec, status)

    if op.config.proxies is not None:
        register_proxies(registry, ProxyController(op.config.proxies), interval)

    if op.config.mirror_nodes:
        # Raw watch events: kopf then keeps no bookkeeping (annotations, finalizers) on Nodes.
        @kopf.on.event("", "v1", "nodes", registry=registry)
        async def node_event(event: kopf.RawEvent, name: str, uid: str, spec: kopf.Spec, **_: Any) -> None:
            if event.get("type") == "DELETED":
                await op.unmirror_node(name)
            else:
                await op.mirror_node(name, uid, dict(spec))

    return registry
