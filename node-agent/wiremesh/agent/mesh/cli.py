"""wiremeshd in mesh mode: its arguments, and the process that runs the Engine, magicsock,
the controller, the local API and metrics.

    wiremeshd --login-server URL --auth-key KEY --state-dir DIR --tun IFNAME
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import pathlib
import signal
from typing import Any

from prometheus_client import CollectorRegistry

from wiremesh.agent import exitnode, hostnet, metrics, netconf, subnetrouter
from wiremesh.agent.agentdns import AgentDNS
from wiremesh.agent.engine import Engine, resolve_workers
from wiremesh.agent.localapi import LocalAPIServer
from wiremesh.agent.magicsock import MagicSock
from wiremesh.agent.mesh.binding import MagicsockPaths, MeshAPI
from wiremesh.agent.mesh.config import MAX_AUTH_KEY_BYTES, MeshConfig, coord_pin
from wiremesh.agent.mesh.controller import MeshAgent
from wiremesh.agent.mesh.metrics import MeshCollector
from wiremesh.agent.state import Keys, StateDir, StateError
from wiremesh.agent.svcproxy import ServiceProxy
from wiremesh.core import crypto
from wiremesh.core.control.channel import ControlError
from wiremesh.core.control.messages import check_tags
from wiremesh.core.disco import DiscoKey
from wiremesh.core.policy.model import EXIT_ROUTES

log = logging.getLogger("wiremesh.agent.mesh")

DEFAULT_STATE_DIR = "/var/lib/wiremesh"
SOCKET_NAME = "wiremeshd.sock"

EXIT_CONFIG = 2
EXIT_RUNTIME = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mesh mode", "join a mesh through a coordination server")
    group.add_argument("--login-server", metavar="URL", help="coord's URL, e.g. http://coord:8080")
    group.add_argument(
        "--coord-key",
        metavar="KEY",
        default=os.environ.get("WIREMESH_COORD_KEY", ""),
        help="coord's control public key, pinned (`wiremesh admin coord-key` prints it; default "
        "$WIREMESH_COORD_KEY). Not needed with an auth key from `wiremesh admin authkeys create` (it "
        "carries the key's fingerprint) or once joined (state.json keeps the key of the first login); "
        "give it to accept a coord whose key was replaced",
    )
    group.add_argument(
        "--insecure-learn-coord-key",
        action="store_true",
        help="LAB ONLY: over plain http://, trust whatever key the login server presents at the first "
        "login (anyone on the path could pose as coord)",
    )
    group.add_argument(
        "--auth-key",
        metavar="KEY",
        default=None,
        help="pre-auth key for the first login; 'file:PATH' reads it from a file; "
        "default: $WIREMESH_AUTH_KEY (keeps it out of ps)",
    )
    group.add_argument(
        "--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR, help="keys and state (default %(default)s)"
    )
    group.add_argument("--hostname", metavar="NAME", default="", help="name to register (default: host name)")
    group.add_argument(
        "--advertise-routes", metavar="P1,P2", default="", help="subnets to offer the mesh (need approval)"
    )
    group.add_argument(
        "--accept-routes",
        action="store_true",
        help="route the subnets other nodes advertise (and an admin approved) into the mesh;"
        " off by default, as in Tailscale: the host's own routes always win over them",
    )
    group.add_argument(
        "--snat-subnet-routes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="as a subnet router, masquerade forwarded traffic: the subnet sees this node's"
        " address on it and peers see its mesh address (default on; --no-snat-subnet-routes"
        " keeps source addresses)",
    )
    group.add_argument(
        "--accept-dns",
        action="store_true",
        help="point this host's resolver at MagicDNS (systemd-resolved where present, /etc/resolv.conf"
        " otherwise), restored at stop; MagicDNS answers at 100.100.100.100 either way",
    )
    group.add_argument(
        "--ingress-to",
        metavar="IP",
        default="",
        help="proxy mode (the operator's Service proxies): forward TCP/UDP the mesh sends to this node's"
        " mesh address on to IP (a Service's cluster IP), masqueraded; needs IP forwarding",
    )
    group.add_argument(
        "--egress-to",
        metavar="NAME|IP",
        default="",
        help="proxy mode: forward TCP/UDP arriving at this host from outside the mesh on to this mesh"
        " device (a peer's name or mesh address), masqueraded to this node's mesh address",
    )
    group.add_argument(
        "--advertise-exit-node",
        action="store_true",
        help="offer to be an exit node (advertises 0.0.0.0/0 and ::/0; approved like a route or by the"
        " policy's autoApprovers.exitNode; needs IP forwarding, and masquerades what it forwards)",
    )
    group.add_argument(
        "--exit-node",
        metavar="NAME|IP",
        default=None,
        help="send all non-mesh traffic through this peer (an approved exit node); '' stops; default:"
        " the choice saved in the state directory (`wiremesh up --exit-node` changes it at run time)",
    )
    group.add_argument(
        "--exit-node-allow-lan-access",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with an exit node, keep reaching this host's connected subnets directly (default: off,"
        " they go through the exit node too, as in Tailscale)",
    )
    group.add_argument(
        "--advertise-tags",
        metavar="TAG1,TAG2",
        default="",
        help="tags to ask coord for (tag:name); granted when this node's user owns them in the"
        " policy's tagOwners, refused ones show in `wiremesh status`",
    )
    group.add_argument("--listen-port", metavar="N", type=int, default=0, help="UDP port (default: any)")
    group.add_argument(
        "--socket", metavar="PATH", default="", help=f"local API socket (default DIR/{SOCKET_NAME})"
    )
    group.add_argument(
        "--mtu",
        default="auto",
        help="TUN MTU; auto (the default): the default route's link MTU less WireGuard's 80 bytes"
        " (1420 on a 1500-byte link), at least 1280",
    )


def resolve_mtu(value: str) -> int:
    """--mtu as a number: "auto" asks the host (hostnet.mesh_mtu); ValueError if out of range."""
    if value == "auto":
        try:
            link = hostnet.default_route_mtu()
        except Exception:  # netlink unavailable: the conservative default
            link = None
        return hostnet.mesh_mtu(link)
    if not value.isdigit() or not 1280 <= int(value) <= 65535:
        raise ValueError(f"--mtu must be auto or 1280..65535, got {value!r}")
    return int(value)


def selected(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "login_server", None))


def read_auth_key(value: str | None) -> str:
    """--auth-key KEY | file:PATH, else $WIREMESH_AUTH_KEY; ValueError with the reason."""
    if value is None:
        value = os.environ.get("WIREMESH_AUTH_KEY", "")
    if value.startswith("file:"):
        path = pathlib.Path(value[5:])
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_AUTH_KEY_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"cannot read the auth key from {path}: {exc.strerror}") from None
        value = raw.decode(errors="replace")
    value = value.strip()
    if len(value) > MAX_AUTH_KEY_BYTES:
        raise ValueError(f"auth key longer than {MAX_AUTH_KEY_BYTES} bytes")
    return value


def config_from_args(args: argparse.Namespace) -> MeshConfig:
    """ValueError with a clear reason for anything malformed."""
    url = str(args.login_server).rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--login-server must be an http:// or https:// URL, got {url!r}")
    routes = tuple(r.strip() for r in str(args.advertise_routes).split(",") if r.strip())
    for route in routes:
        netconf.parse_prefix(route)
    if getattr(args, "advertise_exit_node", False):
        routes = tuple(dict.fromkeys((*routes, *EXIT_ROUTES)))
    exit_node = getattr(args, "exit_node", None)
    if exit_node is not None:
        exit_node = exitnode.check_selector(str(exit_node))
    try:
        tags = check_tags([t.strip() for t in str(args.advertise_tags).split(",") if t.strip()])
    except ControlError as exc:
        raise ValueError(f"--advertise-tags: {exc}") from None
    if not 0 <= args.listen_port < 65536:
        raise ValueError(f"--listen-port must be 0..65535, got {args.listen_port}")
    mtu = resolve_mtu(str(args.mtu))
    coord_key = str(args.coord_key or "").strip()
    if coord_key:
        try:
            crypto.decode_key(coord_key)
        except ValueError:
            raise ValueError(
                f"--coord-key is not a key (want 44 base64 characters): {coord_key[:60]!r}"
            ) from None
    state_dir = str(args.state_dir)
    return MeshConfig(
        login_server=url,
        state_dir=state_dir,
        tun=args.tun,
        auth_key=read_auth_key(args.auth_key),
        hostname=args.hostname,
        advertise_routes=tuple(str(netconf.parse_prefix(r)) for r in routes),
        advertise_tags=tags,
        accept_routes=bool(args.accept_routes),
        snat_subnet_routes=bool(args.snat_subnet_routes),
        exit_node=exit_node,
        exit_node_allow_lan_access=getattr(args, "exit_node_allow_lan_access", None),
        accept_dns=bool(getattr(args, "accept_dns", False)),
        ingress_to=_ipv4_or_empty(getattr(args, "ingress_to", ""), "--ingress-to"),
        egress_to=exitnode.check_selector(str(getattr(args, "egress_to", "") or "")),
        listen_port=args.listen_port,
        socket_path=args.socket or str(pathlib.Path(state_dir) / SOCKET_NAME),
        mtu=mtu,
        metrics_listen=args.metrics_listen,
        workers=resolve_workers(str(getattr(args, "workers", "0"))),
        coord_key=coord_key,
        insecure_learn_coord_key=bool(args.insecure_learn_coord_key),
    )


def _ipv4_or_empty(value: str, flag: str) -> str:
    if not value:
        return ""
    try:
        return str(ipaddress.IPv4Address(value.strip()))
    except ValueError:
        raise ValueError(f"{flag} must be an IPv4 address, got {value[:64]!r}") from None


def run(args: argparse.Namespace) -> int:
    """wiremeshd in mesh mode; returns the exit code."""
    try:
        config = config_from_args(args)
        state_dir = StateDir(config.state_dir)
        keys = state_dir.load_or_create_keys()
        coord_pin(config, state_dir.load())
    except (ValueError, StateError, OSError) as exc:
        log.error("config_invalid error=%r", str(exc))
        return EXIT_CONFIG
    if not config.auth_key and state_dir.load().node_id is None:
        log.warning(
            "no_auth_key hint=first login needs --auth-key, file:PATH or $WIREMESH_AUTH_KEY, unless coord"
            " offers OIDC login: then a login_url is logged and `wiremesh up` shows it"
        )
    registry = CollectorRegistry()
    engine = Engine(
        keys.node, config.tun, listen_port=config.listen_port, mtu=config.mtu, workers=config.workers
    )
    registry.register(metrics.EngineCollector(engine))
    server = None
    routing_subnets = False
    try:
        engine.start()
        if config.advertise_routes:
            routing_subnets = _start_subnet_router(config)
        server = metrics.serve_if_wanted(registry, config.metrics_listen)
        return asyncio.run(_serve(config, state_dir, keys, engine, registry))
    except (OSError, netconf.NetconfError, ValueError) as exc:
        log.error("startup_failed interface=%s error=%r", config.tun, str(exc))
        return EXIT_RUNTIME
    finally:
        if server is not None:
            server.shutdown()
        engine.stop()
        if routing_subnets:
            with contextlib.suppress(subnetrouter.SubnetRouterError):
                subnetrouter.remove(config.tun)


def _start_subnet_router(config: MeshConfig) -> bool:
    """Masquerade and MSS clamping for the subnets we advertise; a failure is logged, not fatal
    (the mesh itself still works, forwarding may not)."""
    forwarding = subnetrouter.forwarding_enabled()
    if not forwarding["ipv4"]:
        log.warning("ip_forwarding_off family=ipv4 hint=sysctl -w net.ipv4.ip_forward=1 to route subnets")
    if "::/0" in config.advertise_routes and not forwarding["ipv6"]:
        log.warning("ip_forwarding_off family=ipv6 hint=sysctl -w net.ipv6.conf.all.forwarding=1 (exit node)")
    if "0.0.0.0/0" in config.advertise_routes and not config.snat_subnet_routes:
        log.warning("exit_node_without_snat hint=internet hosts cannot answer mesh addresses; keep SNAT on")
    try:
        subnetrouter.install(config.tun, config.mtu, snat=config.snat_subnet_routes)
    except subnetrouter.SubnetRouterError as exc:
        log.error("subnet_router_rules_failed error=%r", str(exc))
        return False
    return True


def _service_proxy(config: MeshConfig, engine: Any) -> ServiceProxy | None:
    """The forwarding rules of a Service proxy (--ingress-to / --egress-to), if this is one."""
    if not (config.ingress_to or config.egress_to):
        return None
    if not subnetrouter.forwarding_enabled()["ipv4"]:
        log.warning("ip_forwarding_off family=ipv4 hint=a Service proxy forwards: net.ipv4.ip_forward=1")
    metrics_port = int(config.metrics_listen.rsplit(":", 1)[1]) if config.metrics_listen else 0
    return ServiceProxy(
        config.tun,
        ingress_to=config.ingress_to,
        egress_to=config.egress_to,
        keep_udp=(engine.listen_port,),
        keep_tcp=(metrics_port,) if metrics_port else (),
    )


async def _serve(config: MeshConfig, state_dir: StateDir, keys: Keys, engine: Any, registry: Any) -> int:
    # magicsock (NAT traversal, relays) takes over peers' paths once coord sends a relay map.
    magicsock = MagicSock(engine, keys.node, None, disco_key=DiscoKey(keys.disco))
    engine.paths = magicsock
    magicsock.start(timeout=0)
    dns = AgentDNS(config.state_dir, config.tun, accept_dns=config.accept_dns)
    await dns.start()
    proxy = _service_proxy(config, engine)
    agent = MeshAgent(config, state_dir, keys, engine, paths=MagicsockPaths(magicsock), dns=dns, proxy=proxy)
    magicsock.reachability.on_change = agent.report_paths
    registry.register(MeshCollector(agent))
    registry.register(metrics.MagicsockCollector(magicsock))
    api = LocalAPIServer(MeshAPI(agent, magicsock), config.socket_path)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop)
    await api.start()
    log.info(
        "ready mode=mesh interface=%s listen_port=%d socket=%s login_server=%s",
        config.tun,
        engine.listen_port,
        config.socket_path,
        config.login_server,
    )
    try:
        await agent.run()
    finally:
        await api.close()
        await dns.close()
        if proxy is not None:
            proxy.close()
        magicsock.stop()
    log.info("shutting_down")
    return 0
