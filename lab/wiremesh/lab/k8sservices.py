"""The chart in the lab cluster with names and Services on the mesh: split DNS for cluster.local
through the nodes, and the operator's Service proxies.

    with Lab() as lab, KubeCluster(lab) as cluster:
        mesh = ServicesOnCluster(cluster)
        mesh.install()                               # kube-dns Service first, then helm install
        laptop = mesh.join_laptop(resolv_conf=...)   # --accept-dns: MagicDNS is its resolver
        mesh.expose("web", "default")                # wiremesh.dev/expose on a Service

The lab's CoreDNS runs on the control-plane host, as a cluster's DNS runs behind a Service in a
real cluster; `kube_dns_service` puts it behind the Service a real cluster has (kube-system/
kube-dns at DNS_IP, endpoints at the CoreDNS address), so the chart's split DNS sends
cluster.local to a cluster IP that only the nodes can reach (through kube-proxy), as on any
cluster. Every node offers the Service CIDR; coord makes one primary.
"""

from __future__ import annotations

from typing import Any

from wiremesh.lab.cluster import SERVICE_CIDR
from wiremesh.lab.k8smesh import MeshOnCluster
from wiremesh.lab.kubenode import CLUSTER_DOMAIN

DNS_IP = "10.96.0.10"
MESH_DOMAIN = "mesh.lab"
# Who may reach what: users' devices reach nodes, pods, cluster IPs and the Service proxies;
# nodes and proxies reach users' devices (pods through their node, egress proxies on their own).
POLICY = {
    "tagOwners": {"tag:k8s-node": [], "tag:k8s-proxy": []},
    "hosts": {"pods": "10.244.0.0/16", "services": SERVICE_CIDR},
    "acls": [
        {"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:member:*"]},
        {
            "action": "accept",
            "src": ["autogroup:member"],
            "dst": ["tag:k8s-node:*", "tag:k8s-proxy:*", "pods:*", "services:*"],
        },
        {"action": "accept", "src": ["tag:k8s-node", "tag:k8s-proxy"], "dst": ["autogroup:member:*"]},
    ],
}


class ServicesOnCluster(MeshOnCluster):
    def values(self) -> dict[str, Any]:
        values = super().values()
        values["cluster"] = {"domain": CLUSTER_DOMAIN, "dnsIP": DNS_IP, "serviceCIDR": SERVICE_CIDR}
        values["coord"]["dns"] = {"domain": MESH_DOMAIN}
        values["acl"] = {"create": True, "policy": POLICY}
        return values

    def install(self) -> None:
        self.kube_dns_service()
        super().install()

    def kube_dns_service(self) -> None:
        """kube-system/kube-dns at DNS_IP, its endpoints the CoreDNS the lab runs on k8s-ctl."""
        ctl = self.cluster.ctl
        assert ctl is not None
        ports = [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
        ]
        self.cluster.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                    "spec": {"clusterIP": DNS_IP, "ports": ports},
                },
                {
                    "apiVersion": "v1",
                    "kind": "Endpoints",
                    "metadata": {"name": "kube-dns", "namespace": "kube-system"},
                    "subsets": [{"addresses": [{"ip": ctl.address}], "ports": ports}],
                },
            ]
        )

    def web_service(
        self, name: str, app: str, port: int = 8080, annotations: dict[str, str] | None = None
    ) -> str:
        """A ClusterIP Service in front of pods labelled app=`app`; returns its cluster IP."""
        self.cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}},
                "spec": {"selector": {"app": app}, "ports": [{"port": port, "targetPort": port}]},
            }
        )
        return str(self.cluster.kubectl_json("get", "service", name, "-n", "default")["spec"]["clusterIP"])

    def egress_service(self, name: str, device: str, port: int) -> None:
        """An ExternalName Service for a mesh device (by MagicDNS name), put on the mesh by the operator."""
        self.cluster.apply(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": name,
                    "namespace": "default",
                    "annotations": {"wiremesh.dev/tailnet-fqdn": f"{device}.{MESH_DOMAIN}"},
                },
                "spec": {
                    "type": "ExternalName",
                    "externalName": "placeholder.invalid",
                    "ports": [{"port": port, "protocol": "TCP"}],
                },
            }
        )

    def laptop_resolv_conf(self) -> str:
        """What the laptop's resolver was before wiremeshd: the lab has no public DNS, so its ISP
        resolver is the cluster's CoreDNS address (only for names outside the mesh and the cluster)."""
        ctl = self.cluster.ctl
        assert ctl is not None
        return f"nameserver {ctl.address}\n"
