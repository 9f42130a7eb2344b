"""`wiremesh-operator`: run the kopf operator for MeshNode and ACL resources.

It talks to the Kubernetes API with the pod's service account (or $KUBECONFIG / ~/.kube/config)
and to coord's admin API with the admin key. Every flag has a WIREMESH_* environment twin.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import kopf

from wiremesh.operator.handlers import Operator, OperatorConfig, make_registry
from wiremesh.operator.proxycontrol import ProxyConfig

SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def _default_namespace() -> str:
    try:
        return SA_NAMESPACE.read_text().strip() or "wiremesh"
    except OSError:
        return "wiremesh"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="wiremesh-operator", description=__doc__.splitlines()[0])
    p.add_argument("--coord-url", default=env("WIREMESH_COORD_URL", "http://wiremesh-coord:8080"))
    p.add_argument(
        "--login-server",
        default=env("WIREMESH_LOGIN_SERVER", ""),
        help="coord URL written into the auth-key Secrets for agents (default: --coord-url)",
    )
    p.add_argument("--admin-key", default=env("WIREMESH_ADMIN_KEY", ""))
    p.add_argument("--admin-key-file", default=env("WIREMESH_ADMIN_KEY_FILE", ""))
    p.add_argument(
        "--namespace",
        default=env("WIREMESH_OPERATOR_NAMESPACE", "") or _default_namespace(),
        help="namespace of the auth-key Secrets (default: the pod's own namespace)",
    )
    p.add_argument(
        "--node-keys-namespace",
        default=env("WIREMESH_NODE_KEYS_NAMESPACE", ""),
        help="namespace for the auth-key Secrets of mirrored cluster Nodes, which the node agents"
        " may read (default: --namespace)",
    )
    p.add_argument("--poll-interval", type=float, default=float(env("WIREMESH_POLL_INTERVAL", "10")))
    p.add_argument("--auth-key-expiration", default=env("WIREMESH_AUTH_KEY_EXPIRATION", "24h"))
    p.add_argument(
        "--mirror-nodes",
        action=argparse.BooleanOptionalAction,
        default=env("WIREMESH_MIRROR_NODES", "true").lower() not in ("0", "false", "no"),
        help="keep a MeshNode per cluster Node, advertising its pod CIDR",
    )
    p.add_argument(
        "--approve-pod-routes",
        action=argparse.BooleanOptionalAction,
        default=env("WIREMESH_APPROVE_POD_ROUTES", "true").lower() not in ("0", "false", "no"),
        help="approve mirrored Nodes' pod CIDRs in coord at once (every device the ACL lets reach a"
        " node then reaches its pods); --no-approve-pod-routes leaves approval to an admin",
    )
    p.add_argument(
        "--node-tags",
        default=env("WIREMESH_NODE_TAGS", "tag:k8s-node"),
        help="comma-separated tags for mirrored cluster Nodes",
    )
    p.add_argument(
        "--service-routes",
        default=env("WIREMESH_SERVICE_ROUTES", ""),
        help="comma-separated routes every mirrored Node also advertises (approved with"
        " --approve-pod-routes): the cluster's Service CIDR, so mesh devices reach cluster IPs and"
        " the cluster DNS (coord makes one node primary for it)",
    )
    p.add_argument(
        "--proxy-image",
        default=env("WIREMESH_PROXY_IMAGE", ""),
        help="the agent image for Service proxies (Services annotated wiremesh.dev/expose or"
        " wiremesh.dev/tailnet-ip|tailnet-fqdn); empty: Services are not put on the mesh",
    )
    p.add_argument(
        "--proxy-image-pull-policy", default=env("WIREMESH_PROXY_IMAGE_PULL_POLICY", "IfNotPresent")
    )
    p.add_argument(
        "--proxy-forwarding",
        choices=("init", "sysctls"),
        default=env("WIREMESH_PROXY_FORWARDING", "init"),
        help="how proxy pods turn on IP forwarding: a privileged init container (init), or the pod's"
        " securityContext.sysctls (needs the kubelet's --allowed-unsafe-sysctls=net.ipv4.ip_forward)",
    )
    p.add_argument(
        "--proxy-tags",
        default=env("WIREMESH_PROXY_TAGS", "tag:k8s-proxy"),
        help="comma-separated tags for Service proxies' MeshNodes (define them in the policy's tagOwners)",
    )
    p.add_argument(
        "--dns-domain",
        default=env("WIREMESH_DNS_DOMAIN", "wiremesh.internal"),
        help="coord's MagicDNS domain, for the names written on exposed Services",
    )
    p.add_argument("--cluster-domain", default=env("WIREMESH_CLUSTER_DOMAIN", "cluster.local"))
    p.add_argument(
        "--health-listen",
        default=env("WIREMESH_HEALTH_LISTEN", "0.0.0.0:8080"),
        help="HOST:PORT for the liveness probe (/healthz); empty to disable",
    )
    p.add_argument("--log-level", default=env("WIREMESH_LOG_LEVEL", "info"))
    args = p.parse_args(argv)
    if args.admin_key_file:
        try:
            args.admin_key = Path(args.admin_key_file).read_text().strip()
        except OSError as exc:
            p.error(f"cannot read --admin-key-file: {exc}")
    if not args.admin_key:
        p.error("an admin key is needed: --admin-key, --admin-key-file or WIREMESH_ADMIN_KEY")
    if args.poll_interval <= 0:
        p.error("--poll-interval must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    config = OperatorConfig(
        coord_url=args.coord_url,
        admin_key=args.admin_key,
        namespace=args.namespace,
        node_keys_namespace=args.node_keys_namespace,
        login_server=args.login_server,
        poll_interval=args.poll_interval,
        auth_key_expiration=args.auth_key_expiration,
        mirror_nodes=args.mirror_nodes,
        approve_pod_routes=args.approve_pod_routes,
        node_tags=tuple(t.strip() for t in args.node_tags.split(",") if t.strip()),
        service_routes=tuple(r.strip() for r in args.service_routes.split(",") if r.strip()),
        proxies=ProxyConfig(
            namespace=args.namespace,
            image=args.proxy_image,
            login_server=args.login_server or args.coord_url,
            pull_policy=args.proxy_image_pull_policy,
            forwarding=args.proxy_forwarding,
            tags=tuple(t.strip() for t in args.proxy_tags.split(",") if t.strip()),
            dns_domain=args.dns_domain,
            cluster_domain=args.cluster_domain,
        )
        if args.proxy_image
        else None,
    )
    liveness = f"http://{args.health_listen}/healthz" if args.health_listen else None

    async def run() -> None:
        op = Operator(config)
        # kopf handles SIGTERM/SIGINT itself: handlers finish, then the cleanup handlers run.
        await kopf.operator(
            registry=make_registry(op),
            clusterwide=True,
            standalone=True,  # one replica; no peering resources needed
            liveness_endpoint=liveness,
        )

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
