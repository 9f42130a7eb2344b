"""`wiremesh netcheck` and `wiremesh ping PEER`: magicsock's view, from the running wiremeshd.

netcheck: whether UDP works, our public address, whether the NAT maps per destination, port
mapping, the preferred (home) relay and the latency to every relay region.
ping: rounds of disco pings to PEER (each round pings the relay and every direct candidate),
one line per round with the best answer and its path (a direct address, else the relay
region), until a direct path answers (or COUNT rounds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from typing import Any

from wiremesh.agent.cli.local import DEFAULT_SOCKET, LocalAPIUnavailable, call, default_socket


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    netcheck = subparsers.add_parser("netcheck", help="probe UDP, NAT behaviour and relay latency")
    netcheck.add_argument(
        "--socket", default=None, metavar="PATH", help=f"wiremeshd's socket (default {DEFAULT_SOCKET})"
    )
    netcheck.add_argument("--json", action="store_true", help="machine-readable output")
    netcheck.set_defaults(func=_netcheck)
    ping = subparsers.add_parser(
        "ping", help="disco-ping a peer: one line per round with the best answer and its path"
    )
    ping.add_argument("peer", help="peer name or node key")
    ping.add_argument(
        "--socket", default=None, metavar="PATH", help=f"wiremeshd's socket (default {DEFAULT_SOCKET})"
    )
    ping.add_argument("-c", "--count", type=int, default=10, help="rounds at most (default 10)")
    ping.add_argument(
        "--until-direct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop at the first direct answer (default on)",
    )
    ping.add_argument("--json", action="store_true", help="one JSON object per round")
    ping.set_defaults(func=_ping)


def _request(args: argparse.Namespace, path: str) -> tuple[int, Any] | None:
    try:
        return call(args.socket or default_socket(), "POST", path)
    except LocalAPIUnavailable as exc:
        print(f"wiremesh: {exc}", file=sys.stderr)
        return None


def _error(status: int, payload: Any) -> int:
    message = payload.get("error") if isinstance(payload, dict) else None
    print(f"wiremesh: {message or f'HTTP {status}'}", file=sys.stderr)
    return 1


def format_netcheck(report: dict[str, Any]) -> str:
    def yes(value: Any) -> str:
        return "unknown" if value is None else ("yes" if value else "no")

    lines = [
        "Report:",
        f"  * UDP: {yes(report.get('udp'))}",
        f"  * Public address: {report.get('public_address') or '-'}",
        f"  * Mapping varies by destination: {yes(report.get('mapping_varies_by_destination'))}",
        f"  * Port mapping: {report.get('port_mapping') or 'none'}"
        + (f" ({report['port_mapped_address']})" if report.get("port_mapped_address") else ""),
        f"  * Preferred relay: region {report.get('preferred_region')}"
        if report.get("preferred_region") is not None
        else "  * Preferred relay: none",
        "  * Relay latency:",
    ]
    latency = report.get("region_latency_ms") or {}
    if not latency:
        lines.append("    (no relay answered)")
    for region, ms in sorted(latency.items(), key=lambda item: item[1]):
        lines.append(f"    - region {region}: {ms:.1f} ms")
    return "\n".join(lines)


def _netcheck(args: argparse.Namespace) -> int:
    got = _request(args, "netcheck")
    if got is None:
        return 1
    status, payload = got
    if status != 200:
        return _error(status, payload)
    print(json.dumps(payload, indent=2) if args.json else format_netcheck(payload))
    return 0


def format_reply(peer: str, reply: dict[str, Any], ip: str | None = None) -> str:
    via = (
        f"via {reply['address']}"
        if reply.get("via") == "direct"
        else f"via relay region {reply.get('region')}"
    )
    who = f"{peer} ({ip})" if ip else peer
    return f"pong from {who} {via} in {reply.get('latency_ms', 0):.1f} ms"


def best_reply(replies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The answer a round reports: the fastest direct one if any came back, else the fastest
    relayed one (each round pings every path, so several may answer, as in Tailscale)."""

    def rank(reply: dict[str, Any]) -> tuple[bool, float]:
        latency = reply.get("latency_ms")
        return reply.get("via") != "direct", float(latency) if isinstance(latency, int | float) else 1e9

    return min(replies, key=rank, default=None)


def _peer_ip(args: argparse.Namespace) -> str | None:
    """The peer's first mesh address from `status` (mesh mode), for the reply lines; None if
    the daemon does not say (static mode) or cannot be asked."""
    try:
        status, payload = call(args.socket or default_socket(), "GET", "status")
    except LocalAPIUnavailable:
        return None
    peers = payload.get("peers") if status == 200 and isinstance(payload, dict) else None
    for peer in peers if isinstance(peers, list) else ():
        if not isinstance(peer, dict):
            continue
        if args.peer in (peer.get("name"), peer.get("hostname"), peer.get("node_key")) or args.peer in (
            peer.get("addresses") or ()
        ):
            addresses = peer.get("addresses") or []
            return str(addresses[0]) if addresses else None
    return None


def _ping(args: argparse.Namespace) -> int:
    """One line per round, like `tailscale ping`: the best answer of the round (direct if one
    came back); stop at the first direct answer unless --no-until-direct."""
    peer = urllib.parse.quote(args.peer, safe="")
    ip = None if args.json else _peer_ip(args)
    answered = False
    for n in range(max(args.count, 1)):
        got = _request(args, f"ping/{peer}")
        if got is None:
            return 1
        status, payload = got
        if status != 200:
            return _error(status, payload)
        replies = [r for r in payload.get("replies") or [] if isinstance(r, dict)]
        best = best_reply(replies)
        if args.json:
            print(json.dumps(payload), flush=True)
        elif best is None:
            print(f"timeout waiting for {args.peer}", flush=True)
        else:
            print(format_reply(args.peer, best, ip), flush=True)
        answered = answered or best is not None
        if args.until_direct and best is not None and best.get("via") == "direct":
            return 0
        if n + 1 < args.count:
            time.sleep(1.0)
    if args.until_direct and answered and not args.json:
        print(f"direct connection not established with {args.peer}; traffic goes through the relay")
    return 0 if answered else 1
