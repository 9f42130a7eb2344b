"""`wiremesh status|ip|up|down|logout`: talk to the local wiremeshd over its unix socket."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx

DEFAULT_SOCKET = "/var/lib/wiremesh/wiremeshd.sock"
TIMEOUT = 15.0


class LocalAPIUnavailable(Exception):
    pass


def default_socket() -> str:
    return os.environ.get("WIREMESH_SOCKET", DEFAULT_SOCKET)


def call(socket_path: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One request to the local API; (status, decoded JSON)."""
    transport = httpx.HTTPTransport(uds=socket_path)
    try:
        with httpx.Client(transport=transport, base_url="http://wiremeshd", timeout=TIMEOUT) as client:
            response = client.request(method, f"/v0/{path}", json=body)
    except httpx.HTTPError as exc:
        raise LocalAPIUnavailable(f"cannot reach wiremeshd at {socket_path}: {exc}") from exc
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"error": response.text[:200]}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help_text)
        parser.add_argument(
            "--socket", default=None, metavar="PATH", help=f"wiremeshd's socket (default {DEFAULT_SOCKET})"
        )
        return parser

    status = add("status", "show this node and its peers")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
    ip = add("ip", "show this node's mesh addresses")
    family = ip.add_mutually_exclusive_group()
    family.add_argument("-4", dest="family", action="store_const", const=4, help="IPv4 only")
    family.add_argument("-6", dest="family", action="store_const", const=6, help="IPv6 only")
    ip.set_defaults(func=_ip)
    up = add("up", "resume forwarding through the mesh")
    up.add_argument(
        "--auth-key",
        default=None,
        metavar="KEY",
        help="re-authenticate a node coord cut off (expired); 'file:PATH' reads it from a file",
    )
    up.add_argument(
        "--advertise-tags",
        default=None,
        metavar="TAG1,TAG2",
        help="ask coord for these tags (tag:name); granted when this node's user owns them in the"
        " policy's tagOwners; exit status 1 when any is refused",
    )
    up.add_argument(
        "--force-reauth",
        action="store_true",
        help="sign in again at coord's identity provider (OIDC): prints the login URL and waits;"
        " the node's key expiry starts again",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="how long to wait for an interactive login (default %(default)s)",
    )
    up.add_argument(
        "--exit-node",
        default=None,
        metavar="NAME|IP",
        help="send all non-mesh traffic through this peer (an approved exit node); '' stops",
    )
    up.add_argument(
        "--exit-node-allow-lan-access",
        action="store_true",
        help="with --exit-node, keep reaching this host's connected subnets directly",
    )
    up.set_defaults(func=_action, action="up")
    add("down", "stop forwarding; stay logged in").set_defaults(func=_action, action="down")
    add("logout", "deregister this node and remove its keys").set_defaults(func=_action, action="logout")


def _request(
    args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any] | None:
    try:
        return call(args.socket or default_socket(), method, path, body)
    except LocalAPIUnavailable as exc:
        print(f"wiremesh: {exc}", file=sys.stderr)
        return None


def _failed(status: int, payload: Any) -> bool:
    if status == 200:
        return False
    message = payload.get("error") if isinstance(payload, dict) else None
    print(f"wiremesh: {message or f'HTTP {status}'}", file=sys.stderr)
    return True


def _status(args: argparse.Namespace) -> int:
    got = _request(args, "GET", "status")
    if got is None:
        return 1
    status, payload = got
    if _failed(status, payload):
        return 1
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(format_status(payload), end="")
    return 0


def _ip(args: argparse.Namespace) -> int:
    got = _request(args, "GET", "ip")
    if got is None:
        return 1
    status, payload = got
    if _failed(status, payload):
        return 1
    for address in payload.get("addresses", []):
        if args.family is None or (args.family == 6) == (":" in address):
            print(address)
    return 0


def _read_auth_key(value: str) -> str:
    if value.startswith("file:"):
        with open(value[5:]) as f:
            return f.read(1024).strip()
    return value.strip()


def _action(args: argparse.Namespace) -> int:
    body: dict[str, Any] | None = None
    if getattr(args, "auth_key", None):
        try:
            body = {"auth_key": _read_auth_key(args.auth_key)}
        except OSError as exc:
            print(f"wiremesh: cannot read the auth key: {exc}", file=sys.stderr)
            return 1
    tags = getattr(args, "advertise_tags", None)
    if tags is not None:
        body = {**(body or {}), "advertise_tags": [t.strip() for t in tags.split(",") if t.strip()]}
    if getattr(args, "force_reauth", False):
        body = {"force_reauth": True}
    exit_node = getattr(args, "exit_node", None)
    if exit_node is not None:
        body = {
            **(body or {}),
            "exit_node": exit_node,
            "exit_node_allow_lan_access": bool(args.exit_node_allow_lan_access),
        }
    elif getattr(args, "exit_node_allow_lan_access", False):
        print("wiremesh: --exit-node-allow-lan-access goes with --exit-node NAME|IP", file=sys.stderr)
        return 2
    got = _request(args, "POST", args.action, body)
    if got is None:
        return 1
    status, payload = got
    if _failed(status, payload):
        return 1
    if getattr(args, "force_reauth", False) and not payload.get("auth_url"):
        print("wiremesh: coord did not ask for a sign-in (it has no OIDC login)", file=sys.stderr)
    elif args.action == "up" and payload.get("auth_url"):
        finished = _wait_for_login(args, payload)
        if finished is None:
            return 1
        payload = finished
    print(f"{args.action}: {payload.get('backend_state', 'ok')}")
    exit_error = _exit_node_error(payload)
    if exit_node and exit_error:
        print(f"wiremesh: {exit_error}", file=sys.stderr)
        return 1
    refused = _refused_tags(payload)
    if tags is not None and refused:
        print(f"wiremesh: {refused}", file=sys.stderr)
        return 1
    return 0


def _wait_for_login(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any] | None:
    """Print the login URL wiremeshd got from coord and wait until the user has signed in
    there (the URL is gone and the node runs); None, after saying why, on a refusal or timeout."""
    started = time.monotonic()
    shown = ""
    while True:
        url = payload.get("auth_url") or ""
        if url and url != shown:
            shown = url
            print(f"To authenticate, visit:\n\n\t{url}\n", flush=True)
        if shown and not url:
            if payload.get("error"):
                print(f"wiremesh: {payload['error']}", file=sys.stderr)
                return None
            if payload.get("backend_state") == "Running":
                return payload
        if time.monotonic() - started > args.timeout:
            print("wiremesh: timed out waiting for the login to complete", file=sys.stderr)
            return None
        time.sleep(1.0)
        got = _request(args, "GET", "status")
        if got is None or _failed(*got):
            return None
        payload = got[1]


def _exit_node_error(status: dict[str, Any]) -> str:
    me = status.get("self") if isinstance(status, dict) else None
    chosen = me.get("exit_node") if isinstance(me, dict) else None
    return str(chosen.get("error") or "") if isinstance(chosen, dict) else ""


def _refused_tags(status: dict[str, Any]) -> str:
    """ "tags refused: tag:x (why)" when coord did not grant some requested tags, else ""."""
    me = status.get("self") if isinstance(status, dict) else None
    if not isinstance(me, dict) or not me.get("refused_tags"):
        return ""
    why = f" ({me['tags_error']})" if me.get("tags_error") else ""
    return f"tags refused: {', '.join(str(t) for t in me['refused_tags'])}{why}"


EXPIRY_WARNING = 7 * 86400.0  # warn this long before the node key expires, as Tailscale does


def _expiry_warning(key_expiry: Any, now: float) -> str:
    """ "key expires in 2d 3h ...: run `wiremesh up --force-reauth`" when it is close, else ""."""
    if not isinstance(key_expiry, int | float):
        return ""
    left = float(key_expiry) - now
    if left > EXPIRY_WARNING:
        return ""
    hint = "run `wiremesh up --force-reauth` to sign in again"
    if left <= 0:
        return f"node key expired: {hint}"
    days, rest = divmod(int(left), 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    when = f"{days}d {hours}h" if days else (f"{hours}h {minutes}m" if hours else f"{max(minutes, 1)}m")
    return f"node key expires in {when}: {hint}"


def _bytes(n: Any) -> str:
    value = float(n or 0)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _ago(seconds: Any) -> str:
    if seconds is None:
        return "never"
    return f"{float(seconds):.0f}s ago"


def format_status(status: dict[str, Any]) -> str:
    """Like `tailscale status`: one line for this node, one per peer."""
    me = status.get("self", {})
    lines = []
    state = status.get("backend_state", "?")
    if state != "Running":
        lines.append(f"# state: {state}" + (f" ({status['error']})" if status.get("error") else ""))
    if status.get("auth_url"):
        lines.append(f"# log in: visit {status['auth_url']}")
    refused = _refused_tags(status)
    if refused:
        lines.append(f"# {refused}")
    expiry = _expiry_warning(me.get("key_expiry"), time.time())
    if expiry:
        lines.append(f"# {expiry}")
    chosen = me.get("exit_node") or {}
    if chosen.get("selected"):
        lan = "with" if chosen.get("allow_lan_access") else "without"
        via = chosen.get("name") or chosen["selected"]
        lines.append(
            f"# exit node: {via} ({lan} LAN access)" + (f": {chosen['error']}" if chosen.get("error") else "")
        )
    v4 = next((a for a in me.get("addresses", []) if ":" not in a), "-")
    lines.append(f"{v4:<16}{me.get('name') or '-':<20}{me.get('user') or '-':<12}self")
    for peer in status.get("peers", []):
        addr = next((a for a in peer.get("addresses", []) if ":" not in a), "-")
        name = peer.get("name", "-")
        online = "online" if peer.get("online") else "offline"
        if peer.get("exit_node"):
            online += "; exit node"
        elif peer.get("exit_node_option"):
            online += "; offers exit node"
        lines.append(
            f"{addr:<16}{name:<20}{peer.get('user') or '-':<12}{online:<8} "
            f"{peer.get('endpoint') or '-':<22} rx {_bytes(peer.get('rx_bytes'))} tx {_bytes(peer.get('tx_bytes'))}"
            f"  handshake {_ago(peer.get('last_handshake_seconds_ago'))}"
        )
    dns = status.get("dns") or {}
    if dns.get("magic_dns") and dns.get("resolver"):
        # Names above are MagicDNS names under the tailnet's domain (like Tailscale's short names).
        via = f"; this host uses it ({dns['host_config']})" if dns.get("host_config") else ""
        lines.append(f"# MagicDNS: NAME.{dns.get('domain')} at {', '.join(dns['resolver'])}{via}")
    return "\n".join(lines) + "\n"
