"""Kubernetes Services on the mesh, as the Tailscale operator offers them: a proxy pod per Service,
with a mesh address and name of its own (the pure side: what a Service asks for, and the objects
that give it; `proxycontrol.py` creates them).

- **Ingress**: a Service annotated `wiremesh.dev/expose: "true"` gets a MeshNode and a proxy
  Deployment running `wiremeshd --ingress-to <cluster IP>`: mesh devices reach the Service at the
  proxy's mesh address, or by its MagicDNS name (`wiremesh.dev/hostname`, default
  `<namespace>-<service>`). The Service gets `wiremesh.dev/mesh-ipv4` and `wiremesh.dev/mesh-name`.
- **Egress**: an ExternalName Service annotated `wiremesh.dev/tailnet-ip: 100.64.0.7` or
  `wiremesh.dev/tailnet-fqdn: laptop.wiremesh.internal` gets a proxy running
  `wiremeshd --egress-to <device>` behind a ClusterIP Service with the same ports, and its
  `externalName` is pointed at that Service: pods reach the mesh device at the Service's name.

Proxies live in the namespace of the MeshNodes' key Secrets (`--namespace`; the chart's
RELEASE-meshnode-keys), since a pod can take its key only from a Secret of its own namespace. Their state is the
pod's own (an emptyDir): a pod that is recreated comes back as a new node only after its MeshNode
is recreated (delete it; the operator makes a new one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import re
from typing import Any

from wiremesh.operator import meshnode as mn

EXPOSE = "wiremesh.dev/expose"
HOSTNAME = "wiremesh.dev/hostname"
TAILNET_IP = "wiremesh.dev/tailnet-ip"
TAILNET_FQDN = "wiremesh.dev/tailnet-fqdn"
MESH_IPV4 = "wiremesh.dev/mesh-ipv4"
MESH_NAME = "wiremesh.dev/mesh-name"
PROXY_SERVICE = "wiremesh.dev/proxy-service"
PROXY_LABEL = "wiremesh.dev/proxy"  # on the MeshNode, Deployment and Service of a proxy
SERVICE_LABEL = "wiremesh.dev/proxy-for"  # "<namespace>.<service>"
TUN = "wm0"
LISTEN_PORT = 41641
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclasses.dataclass(frozen=True, slots=True)
class ProxySpec:
    """What one annotated Service asks for."""

    kind: str  # "ingress" or "egress"
    namespace: str
    service: str
    name: str  # the proxy's MeshNode, Deployment and (egress) Service name
    hostname: str  # its mesh name
    target: str  # ingress: the Service's cluster IP; egress: the device's address or name
    ports: tuple[tuple[str, int], ...] = ()  # egress: (protocol, port) of the user's Service

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.service}"


class ProxySpecError(ValueError):
    """The Service's annotations cannot be served; the message is for an Event."""


def proxy_name(namespace: str, service: str) -> str:
    """`wm-<namespace>-<service>`, at most 63 characters (a hash keeps long ones unique)."""
    name = f"wm-{namespace}-{service}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54].rstrip('-')}-{digest}"


def wanted(service: dict[str, Any]) -> ProxySpec | None:
    """The proxy an annotated Service asks for, None if it asks for none; ProxySpecError if its
    annotations cannot be served."""
    meta = service.get("metadata") or {}
    spec = service.get("spec") or {}
    notes = meta.get("annotations") or {}
    namespace, svc = str(meta.get("namespace") or "default"), str(meta.get("name") or "")
    name = proxy_name(namespace, svc)
    hostname = str(notes.get(HOSTNAME) or f"{namespace}-{svc}").lower()[:63].strip("-")
    if not _HOST_RE.match(hostname):
        raise ProxySpecError(f"{HOSTNAME} {hostname!r} must be a DNS label (letters, digits, '-')")
    if str(notes.get(EXPOSE, "")).lower() == "true":
        cluster_ip = spec.get("clusterIP")
        try:
            ip = ipaddress.IPv4Address(str(cluster_ip))
        except ValueError:
            raise ProxySpecError(
                f"{EXPOSE} needs a Service with an IPv4 cluster IP, not {cluster_ip!r}"
            ) from None
        return ProxySpec("ingress", namespace, svc, name, hostname, str(ip))
    target = str(notes.get(TAILNET_IP) or notes.get(TAILNET_FQDN) or "")
    if not target:
        return None
    if TAILNET_IP in notes:
        try:
            ipaddress.IPv4Address(target)
        except ValueError:
            raise ProxySpecError(f"{TAILNET_IP} must be a mesh IPv4 address, not {target[:64]!r}") from None
    if spec.get("type") != "ExternalName":
        raise ProxySpecError(
            "an egress Service must be of type ExternalName (its name is pointed at the proxy)"
        )
    ports = tuple(
        (str(p.get("protocol") or "TCP"), int(p["port"])) for p in spec.get("ports") or [] if p.get("port")
    )
    if not ports:
        raise ProxySpecError("an egress Service must list its ports (the proxy's Service takes the same)")
    return ProxySpec("egress", namespace, svc, name, hostname, target, ports)


def labels(proxy: ProxySpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/managed-by": "wiremesh-operator",
        "app.kubernetes.io/component": "proxy",
        PROXY_LABEL: proxy.name,
        SERVICE_LABEL: proxy.key[:63],
    }


def meshnode_body(proxy: ProxySpec, tags: tuple[str, ...], user: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "wiremesh.dev/v1alpha1",
        "kind": "MeshNode",
        "metadata": {"name": proxy.name, "labels": labels(proxy)},
        "spec": {"hostname": proxy.hostname, "tags": list(tags), "user": user},
    }


FORWARDING_SETUPS = ("init", "sysctls")


def deployment_body(
    proxy: ProxySpec,
    namespace: str,
    image: str,
    login_server: str,
    pull_policy: str = "IfNotPresent",
    forwarding: str = "init",
) -> dict[str, Any]:
    """One replica of wiremeshd in a pod of its own (its own network namespace, TUN and mesh
    address), with the proxy's MeshNode key, forwarding to the Service or the device.

    The pod forwards between its TUN and the cluster, and ip_forward is not a "safe" sysctl:
    `forwarding="init"` sets it in a privileged init container, for this pod's network namespace
    only (as the Tailscale operator's proxies do; needs privileged pods to be allowed);
    `"sysctls"` asks for it in the pod's securityContext (needs the kubelet's
    --allowed-unsafe-sysctls=net.ipv4.ip_forward)."""
    flag = "--ingress-to" if proxy.kind == "ingress" else "--egress-to"
    selector = {PROXY_LABEL: proxy.name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": proxy.name, "namespace": namespace, "labels": labels(proxy)},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # one node identity: never two pods at once
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": {**labels(proxy), **selector}},
                "spec": {
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 10,
                    **_forwarding(forwarding, image, pull_policy),
                    "containers": [
                        {
                            "name": "wiremeshd",
                            "image": image,
                            "imagePullPolicy": pull_policy,
                            "args": [
                                *("--login-server", login_server, "--state-dir", "/var/lib/wiremesh"),
                                *("--tun", TUN, "--hostname", proxy.hostname),
                                *("--listen-port", str(LISTEN_PORT), flag, proxy.target),
                            ],
                            "env": [
                                {
                                    "name": "WIREMESH_AUTH_KEY",
                                    "valueFrom": {
                                        "secretKeyRef": {
                                            "name": mn.secret_name(proxy.name),
                                            "key": mn.SECRET_KEY,
                                        }
                                    },
                                }
                            ],
                            "securityContext": {
                                "runAsUser": 0,
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},
                            },
                            "resources": {
                                "requests": {"cpu": "20m", "memory": "64Mi"},
                                "limits": {"memory": "256Mi"},
                            },
                            "volumeMounts": [
                                {"name": "dev-net-tun", "mountPath": "/dev/net/tun"},
                                {"name": "state", "mountPath": "/var/lib/wiremesh"},
                                {"name": "tmp", "mountPath": "/tmp"},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "dev-net-tun", "hostPath": {"path": "/dev/net/tun", "type": "CharDevice"}},
                        {"name": "state", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                },
            },
        },
    }


def _forwarding(setup: str, image: str, pull_policy: str) -> dict[str, Any]:
    if setup == "sysctls":
        return {"securityContext": {"sysctls": [{"name": "net.ipv4.ip_forward", "value": "1"}]}}
    if setup != "init":
        raise ValueError(f"forwarding setup must be one of {FORWARDING_SETUPS}, not {setup!r}")
    return {
        "initContainers": [
            {
                "name": "sysctl",
                "image": image,
                "imagePullPolicy": pull_policy,
                "command": ["/bin/sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
                "securityContext": {"privileged": True, "runAsUser": 0},
            }
        ]
    }


def egress_service_body(proxy: ProxySpec, namespace: str) -> dict[str, Any]:
    """The ClusterIP Service in front of an egress proxy (the user's ExternalName points here)."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": proxy.name, "namespace": namespace, "labels": labels(proxy)},
        "spec": {
            "type": "ClusterIP",
            "selector": {PROXY_LABEL: proxy.name},
            "ports": [
                {"name": f"{proto.lower()}-{port}", "protocol": proto, "port": port, "targetPort": port}
                for proto, port in proxy.ports
            ],
        },
    }


def external_name(proxy: ProxySpec, namespace: str, cluster_domain: str) -> str:
    return f"{proxy.name}.{namespace}.svc.{cluster_domain}"


def service_annotations(
    proxy: ProxySpec, meshnode: dict[str, Any] | None, domain: str, namespace: str
) -> dict[str, str]:
    """What the operator writes back on the user's Service."""
    if proxy.kind == "egress":
        return {PROXY_SERVICE: f"{namespace}/{proxy.name}"}
    status = (meshnode or {}).get("status") or {}
    addresses = status.get("addresses") or {}
    out = {MESH_NAME: f"{proxy.hostname}.{domain}"}
    if addresses.get("ipv4"):
        out[MESH_IPV4] = str(addresses["ipv4"])
    return out
