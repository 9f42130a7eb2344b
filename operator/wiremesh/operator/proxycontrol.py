"""The operator's Service proxies (proxies.py says what they are): annotated Services in, a
MeshNode, a Deployment and (egress) a Service per proxy out, kept in step by watch events and by a
sweep every poll interval, which also removes the proxies of Services that went away or lost
their annotations, and writes the proxy's mesh name and address back on the Service.

Kubernetes calls go through the official client (synchronous: the handlers run them in a thread).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any

from wiremesh.operator import proxies

log = logging.getLogger("wiremesh.operator.proxies")

GROUP, VERSION, MESHNODES = "wiremesh.dev", "v1alpha1", "meshnodes"
SPEC_HASH = "wiremesh.dev/spec-hash"


@dataclasses.dataclass(frozen=True, slots=True)
class ProxyConfig:
    namespace: str  # where proxies run (the operator's namespace: their key Secrets are there)
    image: str  # the agent image
    login_server: str
    pull_policy: str = "IfNotPresent"
    forwarding: str = "init"  # how proxy pods get ip_forward (proxies.deployment_body)
    tags: tuple[str, ...] = ("tag:k8s-proxy",)
    user: str = "default"
    dns_domain: str = "wiremesh.internal"  # coord's MagicDNS domain, for the Service's annotation
    cluster_domain: str = "cluster.local"


def _hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class ProxyController:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self._apis: tuple[Any, Any, Any] | None = None

    def _clients(self) -> tuple[Any, Any, Any]:
        if self._apis is None:
            import kubernetes

            try:
                kubernetes.config.load_incluster_config()
            except kubernetes.config.ConfigException:
                kubernetes.config.load_kube_config()
            self._apis = (
                kubernetes.client.CoreV1Api(),
                kubernetes.client.AppsV1Api(),
                kubernetes.client.CustomObjectsApi(),
            )
        return self._apis

    # ---- one Service

    def reconcile(self, service: dict[str, Any]) -> str:
        """Bring the Service's proxy in line with it; returns an error for an Event ("" if none)."""
        meta = service.get("metadata") or {}
        namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
        try:
            spec = proxies.wanted(service)
        except proxies.ProxySpecError as exc:
            self.remove(proxies.proxy_name(namespace, name))
            return str(exc)
        if spec is None:
            self.remove(proxies.proxy_name(namespace, name))
            return ""
        replaced = self._ensure_deployment(spec)
        meshnode = self._ensure_meshnode(spec, fresh=replaced)
        notes = proxies.service_annotations(spec, meshnode, self.config.dns_domain, self.config.namespace)
        if spec.kind == "ingress" and meshnode:
            coord_name = ((meshnode.get("status") or {}).get("name")) or spec.hostname
            notes[proxies.MESH_NAME] = f"{coord_name}.{self.config.dns_domain}"
        patch: dict[str, Any] = {}
        if any((meta.get("annotations") or {}).get(k) != v for k, v in notes.items()):
            patch["metadata"] = {"annotations": notes}
        if spec.kind == "egress":
            self._ensure_egress_service(spec)
            target = proxies.external_name(spec, self.config.namespace, self.config.cluster_domain)
            if (service.get("spec") or {}).get("externalName") != target:
                patch["spec"] = {"externalName": target}
        if patch:
            self._clients()[0].patch_namespaced_service(name, namespace, patch)
        return ""

    def _ensure_meshnode(self, spec: proxies.ProxySpec, fresh: bool) -> dict[str, Any] | None:
        """The proxy's MeshNode; with `fresh`, a new one (a new pod has no identity: see below)."""
        custom = self._clients()[2]
        from kubernetes.client.exceptions import ApiException

        body = proxies.meshnode_body(spec, self.config.tags, self.config.user)
        try:
            current: dict[str, Any] = custom.get_cluster_custom_object(GROUP, VERSION, MESHNODES, spec.name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            custom.create_cluster_custom_object(GROUP, VERSION, MESHNODES, body)
            log.info("proxy_meshnode_created name=%s", spec.name)
            return None
        if fresh:
            # The proxy keeps its node keys in its pod: a replaced pod is a new device, so its
            # MeshNode is recreated (the old coord node goes with the old MeshNode, freeing the
            # name for the new one) and a fresh one-off key issued.
            custom.delete_cluster_custom_object(GROUP, VERSION, MESHNODES, spec.name)
            log.info("proxy_meshnode_recreated name=%s", spec.name)
            return None
        if {k: (current.get("spec") or {}).get(k) for k in body["spec"]} != body["spec"]:
            custom.patch_cluster_custom_object(GROUP, VERSION, MESHNODES, spec.name, {"spec": body["spec"]})
        return current

    def _ensure_deployment(self, spec: proxies.ProxySpec) -> bool:
        """Create or replace the proxy Deployment; True when an existing one was replaced."""
        from kubernetes.client.exceptions import ApiException

        apps = self._clients()[1]
        cfg = self.config
        body = proxies.deployment_body(
            spec, cfg.namespace, cfg.image, cfg.login_server, cfg.pull_policy, cfg.forwarding
        )
        digest = _hash(body)
        body["metadata"]["annotations"] = {SPEC_HASH: digest}
        try:
            current = apps.read_namespaced_deployment(spec.name, cfg.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            apps.create_namespaced_deployment(cfg.namespace, body)
            log.info("proxy_deployment_created name=%s kind=%s target=%s", spec.name, spec.kind, spec.target)
            return False
        if (current.metadata.annotations or {}).get(SPEC_HASH) == digest:
            return False
        apps.replace_namespaced_deployment(spec.name, cfg.namespace, body)
        log.info("proxy_deployment_replaced name=%s target=%s", spec.name, spec.target)
        return True

    def _ensure_egress_service(self, spec: proxies.ProxySpec) -> None:
        from kubernetes.client.exceptions import ApiException

        core = self._clients()[0]
        body = proxies.egress_service_body(spec, self.config.namespace)
        try:
            current = core.read_namespaced_service(spec.name, self.config.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            core.create_namespaced_service(self.config.namespace, body)
            return
        ports = [(p.protocol, p.port) for p in current.spec.ports or []]
        if ports != list(spec.ports):
            core.patch_namespaced_service(
                spec.name, self.config.namespace, {"spec": {"ports": body["spec"]["ports"]}}
            )

    # ---- removal and the sweep

    def remove(self, name: str) -> None:
        """The proxy called `name` goes: Deployment, Service, MeshNode (its coord node with it)."""
        from kubernetes.client.exceptions import ApiException

        core, apps, custom = self._clients()
        for delete in (
            lambda: apps.delete_namespaced_deployment(name, self.config.namespace),
            lambda: core.delete_namespaced_service(name, self.config.namespace),
            lambda: custom.delete_cluster_custom_object(GROUP, VERSION, MESHNODES, name),
        ):
            try:
                delete()
            except ApiException as exc:
                if exc.status != 404:
                    raise
            else:
                log.info("proxy_removed name=%s", name)

    def sweep(self) -> dict[str, str]:
        """Reconcile every annotated Service and remove orphaned proxies; returns errors by Service."""
        core, apps, _ = self._clients()
        errors: dict[str, str] = {}
        wanted: set[str] = set()
        for item in core.list_service_for_all_namespaces().items:
            service = core.api_client.sanitize_for_serialization(item)
            notes = (service.get("metadata") or {}).get("annotations") or {}
            if not ({proxies.EXPOSE, proxies.TAILNET_IP, proxies.TAILNET_FQDN} & set(notes)):
                continue
            meta = service["metadata"]
            wanted.add(proxies.proxy_name(meta.get("namespace") or "default", meta["name"]))
            error = self.reconcile(service)
            if error:
                errors[f"{meta.get('namespace')}/{meta['name']}"] = error
        selector = f"{proxies.PROXY_LABEL}"
        for deployment in apps.list_namespaced_deployment(
            self.config.namespace, label_selector=selector
        ).items:
            if deployment.metadata.name not in wanted:
                self.remove(deployment.metadata.name)
        return errors


PROXY_ANNOTATIONS = (proxies.EXPOSE, proxies.TAILNET_IP, proxies.TAILNET_FQDN)


def register(registry: Any, controller: ProxyController, interval: float) -> None:
    """Service watch events and the periodic sweep, on the operator's kopf registry."""
    import asyncio

    import kopf

    known: set[str] = set()  # proxies this process has made (events for other Services cost nothing)

    @kopf.on.event("", "v1", "services", registry=registry)
    async def service_event(event: kopf.RawEvent, body: kopf.Body, **_: Any) -> None:
        meta = body.get("metadata") or {}
        name = proxies.proxy_name(meta.get("namespace") or "default", meta.get("name") or "")
        asks = any(k in (meta.get("annotations") or {}) for k in PROXY_ANNOTATIONS)
        try:
            if event.get("type") == "DELETED" or not asks:
                if name in known:
                    await asyncio.to_thread(controller.remove, name)
                    known.discard(name)
                return
            error = await asyncio.to_thread(controller.reconcile, dict(body))
        except Exception as exc:  # the sweep retries; one bad call must not stop the watch
            log.warning("proxy_reconcile_failed service=%s error=%r", name, str(exc))
            return
        if error:
            kopf.event(body, type="Warning", reason="ProxyInvalid", message=error[:500])
            log.warning(
                "proxy_invalid service=%s/%s error=%s", meta.get("namespace"), meta.get("name"), error
            )
        else:
            known.add(name)

    async def sweep_forever() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(controller.sweep)
            except Exception as exc:
                log.warning("proxy_sweep_failed error=%r", str(exc))

    tasks: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry)
    async def start_sweep(**_: Any) -> None:
        tasks.append(asyncio.get_running_loop().create_task(sweep_forever()))

    @kopf.on.cleanup(registry=registry)
    async def stop_sweep(**_: Any) -> None:
        for task in tasks:
            task.cancel()
