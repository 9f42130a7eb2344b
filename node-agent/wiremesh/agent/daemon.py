"""`wiremeshd`: the node agent daemon.

Modes are chosen from the arguments; each has its own argument group and `run_*` function so
that a new one (mesh mode: --login-server/--auth-key/--state-dir) is added beside static mode
without touching it:

    wiremeshd --tun wm0 --wg-config /etc/wiremesh/wm0.conf [--metrics-listen 127.0.0.1:9586]

Runs in the foreground, logs key=value lines on stderr, removes its interface and exits 0 on
SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from prometheus_client import CollectorRegistry

from wiremesh.agent import metrics, netconf, tun, wgconfig
from wiremesh.agent.engine import Engine, resolve_workers
from wiremesh.agent.mesh import cli as mesh

log = logging.getLogger("wiremesh.agent.daemon")

DEFAULT_MTU = 1420
EXIT_CONFIG = 2
EXIT_RUNTIME = 1

Runner = Callable[[argparse.Namespace], int]
# (name, "is this mode selected by these args?", runner); checked in order.
MODES: list[tuple[str, Callable[[argparse.Namespace], bool], Runner]] = []


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tun", required=True, metavar="IFNAME", help="TUN interface to create")
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        default=metrics.DEFAULT_METRICS_LISTEN,
        help="serve Prometheus /metrics here (default %(default)s: loopback only, as the metrics name "
        "peers and endpoints; 'off' serves none)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity"
    )
    parser.add_argument(
        "--workers",
        default=os.environ.get("WIREMESH_WORKERS", "auto"),
        choices=["0", "1", "auto"],
        help="receive worker processes: 1 decrypts (and, in mesh mode, filters) in a second process"
        " (a second core works on the tunnel), 0 keeps everything in this one; auto (the default, or"
        " $WIREMESH_WORKERS) is 1 with 2+ CPUs",
    )


def add_static_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("static mode", "a fixed set of peers from a wg-quick style file")
    group.add_argument("--wg-config", metavar="FILE", help="wg-quick style configuration file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wiremeshd", description="wiremesh node agent")
    add_common_arguments(parser)
    add_static_arguments(parser)
    mesh.add_arguments(parser)
    return parser


class KeyValueFormatter(logging.Formatter):
    """`ts=... level=... logger=... event=<message>`; messages are already `name k=v ...`."""

    def format(self, record: logging.LogRecord) -> str:
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        line = f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name} event={record.getMessage()}"
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


def setup_logging(level: str) -> None:
    import time

    handler = logging.StreamHandler(sys.stderr)
    formatter = KeyValueFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def wait_for_signal() -> str:
    """Block until SIGTERM or SIGINT; return its name."""
    got: list[str] = []
    done = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        got.append(signal.Signals(signum).name)
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    while not done.wait(1.0):
        pass
    return got[0]


def static_routes(config: wgconfig.WgConfig) -> list[str]:
    """Routes for the peers' AllowedIPs, minus what the interface addresses already route.

    Default routes (/0) are skipped: routing everything into the tunnel needs policy routing so
    that the tunnel's own UDP packets still leave by the real uplink (wg-quick's fwmark trick),
    which static mode does not do.
    """
    connected = {ipaddress.ip_interface(a).network for a in config.interface.addresses}
    routes: list[str] = []
    for peer in config.peers:
        for prefix in peer.allowed_ips:
            net = ipaddress.ip_network(prefix)
            if net.prefixlen == 0:
                log.warning("default_route_skipped prefix=%s reason=static_mode_has_no_policy_routing", net)
                continue
            if net in connected or str(net) in routes:
                continue
            routes.append(str(net))
    return routes


def peer_configs(config: wgconfig.WgConfig) -> list[object]:
    from wiremesh.core.wireguard import PeerConfig

    out: list[object] = []
    for peer in config.peers:
        endpoint = wgconfig.resolve_endpoint(peer.endpoint) if peer.endpoint else None
        out.append(
            PeerConfig(
                public_key=peer.public_key,
                preshared_key=peer.preshared_key,
                allowed_ips=peer.allowed_ips,
                endpoint=endpoint,
                persistent_keepalive=peer.persistent_keepalive,
            )
        )
    return out


def run_static(args: argparse.Namespace) -> int:
    try:
        config = wgconfig.load(args.wg_config)
        peers = peer_configs(config)
        routes = static_routes(config)
    except (wgconfig.ConfigError, ValueError) as exc:
        log.error("config_invalid error=%r", str(exc))
        return EXIT_CONFIG
    registry = CollectorRegistry()
    engine = Engine(
        config.interface.private_key,
        args.tun,
        listen_port=config.interface.listen_port or 0,
        mtu=config.interface.mtu or DEFAULT_MTU,
        workers=resolve_workers(args.workers),
    )
    registry.register(metrics.EngineCollector(engine))
    server = None
    try:
        engine.start()
        engine.set_addresses(config.interface.addresses)
        engine.set_routes(routes)
        engine.set_peers(peers)
        server = metrics.serve_if_wanted(registry, args.metrics_listen)
        log.info(
            "ready mode=static interface=%s listen_port=%d peers=%d addresses=%s",
            args.tun,
            engine.listen_port,
            len(peers),
            ",".join(config.interface.addresses) or "-",
        )
        sig = wait_for_signal()
        log.info("shutting_down signal=%s", sig)
    except (OSError, netconf.NetconfError, ValueError) as exc:
        log.error("startup_failed interface=%s error=%r", args.tun, str(exc))
        return EXIT_RUNTIME
    finally:
        if server is not None:
            server.shutdown()
        engine.stop()
    return 0


MODES.append(("static", lambda a: bool(getattr(a, "wg_config", None)), run_static))
MODES.append(("mesh", mesh.selected, mesh.run))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        tun.validate_ifname(args.tun)
    except ValueError as exc:
        parser.error(str(exc))
    for name, selected, runner in MODES:
        if selected(args):
            log.debug("mode_selected mode=%s", name)
            return runner(args)
    parser.error("no mode selected: give --wg-config FILE or --login-server URL")
    return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
