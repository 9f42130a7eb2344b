"""`wiremesh admin ...`: manage a tailnet through coord's admin API.

    wiremesh admin [--server URL] [--admin-key KEY] [--json] authkeys create|list|expire
    wiremesh admin nodes list|expire ID|delete ID|rename ID NAME|tag ID tag:a,tag:b
    wiremesh admin routes list|approve NODE PREFIX...|unapprove NODE PREFIX...
    wiremesh admin policy get|set FILE|clear
    wiremesh admin adminkeys create --scopes read|nodes|authkeys|policy|all,...|list|revoke ID

The admin key comes from --admin-key, WIREMESH_ADMIN_KEY, or --admin-key-file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
from typing import Any

import httpx

from wiremesh.agent.cli import admin_policy
from wiremesh.core.policy.model import EXIT_ROUTES


class AdminError(Exception):
    pass


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = subparsers.add_parser("admin", help="manage nodes, auth keys and routes through coord")
    admin.add_argument("--server", default=os.environ.get("WIREMESH_SERVER", "http://127.0.0.1:8080"))
    admin.add_argument("--admin-key", default=os.environ.get("WIREMESH_ADMIN_KEY", ""))
    admin.add_argument("--admin-key-file", default=os.environ.get("WIREMESH_ADMIN_KEY_FILE", ""))
    admin.add_argument("--json", action="store_true", help="print JSON instead of a table")
    groups = admin.add_subparsers(dest="admin_group", metavar="GROUP")
    groups.required = True

    authkeys = groups.add_parser("authkeys", help="pre-auth keys").add_subparsers(
        dest="action", metavar="ACTION"
    )
    authkeys.required = True
    create = authkeys.add_parser("create", help="create a pre-auth key (printed once)")
    create.add_argument("--reusable", action="store_true")
    create.add_argument("--ephemeral", action="store_true")
    create.add_argument("--tags", default="", help="tag:a,tag:b")
    create.add_argument("--expiration", default="1h", help="e.g. 90s, 30m, 1h, 7d, never")
    create.add_argument("--user", default="default")
    create.set_defaults(func=_authkeys_create)
    authkeys.add_parser("list", help="list pre-auth keys").set_defaults(func=_authkeys_list)
    expire = authkeys.add_parser("expire", help="expire a pre-auth key now")
    expire.add_argument("id", type=int)
    expire.set_defaults(func=_authkeys_expire)

    nodes = groups.add_parser("nodes", help="nodes").add_subparsers(dest="action", metavar="ACTION")
    nodes.required = True
    nodes.add_parser("list", help="list nodes").set_defaults(func=_nodes_list)
    for name, helptext in (("expire", "expire a node's key now"), ("delete", "delete a node")):
        sub = nodes.add_parser(name, help=helptext)
        sub.add_argument("id", help="node id or name")
        sub.set_defaults(func=_nodes_expire if name == "expire" else _nodes_delete)
    rename = nodes.add_parser("rename", help="give a node a new name")
    rename.add_argument("id", help="node id or name")
    rename.add_argument("name")
    rename.set_defaults(func=_nodes_rename)
    tag = nodes.add_parser("tag", help="set a node's tags (replaces them)")
    tag.add_argument("id", help="node id or name")
    tag.add_argument("tags", help="tag:a,tag:b (empty string clears)")
    tag.set_defaults(func=_nodes_tag)

    routes = groups.add_parser("routes", help="subnet routes").add_subparsers(dest="action", metavar="ACTION")
    routes.required = True
    routes.add_parser("list", help="list advertised and approved routes").set_defaults(func=_routes_list)
    approve = routes.add_parser("approve", help="approve routes a node advertises")
    approve.add_argument("node", help="node id or name")
    approve.add_argument("prefix", nargs="+", help="prefixes; 'exit-node' stands for 0.0.0.0/0 and ::/0")
    approve.set_defaults(func=_routes_approve)
    unapprove = routes.add_parser("unapprove", help="withdraw routes' approval (peers drop them)")
    unapprove.add_argument("node", help="node id or name")
    unapprove.add_argument("prefix", nargs="+", help="prefixes; 'exit-node' stands for 0.0.0.0/0 and ::/0")
    unapprove.set_defaults(func=_routes_unapprove)

    admin_policy.register(groups)  # policy get|set FILE|clear
    groups.add_parser(
        "coord-key", help="coord's control public key, for wiremeshd --coord-key (read with the admin key)"
    ).set_defaults(func=_coord_key)

    adminkeys = groups.add_parser("adminkeys", help="scoped admin API keys").add_subparsers(
        dest="action", metavar="ACTION"
    )
    adminkeys.required = True
    make = adminkeys.add_parser("create", help="create a scoped admin key (printed once)")
    make.add_argument(
        "--scopes",
        required=True,
        help="comma list of read (every GET), nodes, authkeys, policy, all (everything)",
    )
    make.add_argument("--expiration", default="90d", help="e.g. 1h, 30d, never")
    make.add_argument("--description", default="")
    make.set_defaults(func=_adminkeys_create)
    adminkeys.add_parser("list", help="list admin keys (never their secrets)").set_defaults(
        func=_adminkeys_list
    )
    revoke = adminkeys.add_parser("revoke", help="revoke an admin key now, on every replica")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(func=_adminkeys_revoke)


# plumbing ---------------------------------------------------------------------------------


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    key = args.admin_key
    if not key and args.admin_key_file:
        key = pathlib.Path(args.admin_key_file).read_text().strip()
    if not key:
        raise AdminError("no admin key: pass --admin-key or set WIREMESH_ADMIN_KEY")
    try:
        response = httpx.request(
            method,
            f"{args.server.rstrip('/')}/api/v1{path}",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=15,
        )
    except httpx.HTTPError as exc:
        raise AdminError(f"cannot reach coord at {args.server}: {exc}") from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code >= 400:
        detail = data.get("detail") if isinstance(data, dict) else response.text[:200]
        raise AdminError(f"coord refused ({response.status_code}): {detail}")
    return data


def _resolve(args: argparse.Namespace, ident: str) -> int:
    if ident.isdigit():
        return int(ident)
    for node in _call(args, "GET", "/nodes"):
        if ident in (node["name"], node["hostname"]):
            return int(node["id"])
    raise AdminError(f"no node named {ident!r}")


def _when(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _emit(args: argparse.Namespace, data: Any, text: str | None = None) -> int:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    elif text is not None:
        print(text)
    return 0


def _guard(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except AdminError as exc:
            print(f"wiremesh admin: {exc}", file=sys.stderr)
            return 1

    return run


# commands ---------------------------------------------------------------------------------


@_guard
def _authkeys_create(args: argparse.Namespace) -> int:
    tags = [t for t in args.tags.split(",") if t]
    body = {
        "user": args.user,
        "reusable": args.reusable,
        "ephemeral": args.ephemeral,
        "tags": tags,
        "expiration": None if args.expiration == "never" else args.expiration,
    }
    data = _call(args, "POST", "/authkeys", body)
    return _emit(args, data, data["key"])


@_guard
def _coord_key(args: argparse.Namespace) -> int:
    data = _call(args, "GET", "/key")
    return _emit(args, data, data["public_key"])


@_guard
def _authkeys_list(args: argparse.Namespace) -> int:
    keys = _call(args, "GET", "/authkeys")
    if args.json:
        return _emit(args, keys)
    rows = [
        [
            str(k["id"]),
            k["prefix"],
            k["user"],
            "yes" if k["reusable"] else "no",
            "yes" if k["ephemeral"] else "no",
            ",".join(k["tags"]) or "-",
            str(k["used_count"]),
            _when(k["expires_at"]),
            "yes" if k["expired"] else "no",
        ]
        for k in keys
    ]
    _table(rows, ["ID", "KEY", "USER", "REUSABLE", "EPHEMERAL", "TAGS", "USED", "EXPIRES", "EXPIRED"])
    return 0


@_guard
def _authkeys_expire(args: argparse.Namespace) -> int:
    data = _call(args, "POST", f"/authkeys/{args.id}/expire")
    return _emit(args, data, f"auth key {args.id} expired")


@_guard
def _nodes_list(args: argparse.Namespace) -> int:
    nodes = _call(args, "GET", "/nodes")
    if args.json:
        return _emit(args, nodes)
    rows = [
        [
            str(n["id"]),
            n["name"],
            n["user"],
            " ".join(n["addresses"]),
            ",".join(n["tags"]) or "-",
            "online" if n["online"] else f"offline (last seen {_when(n['last_seen'])})",
            "expired" if n["expired"] else _when(n["key_expiry"]),
        ]
        for n in nodes
    ]
    _table(rows, ["ID", "NAME", "USER", "ADDRESSES", "TAGS", "STATUS", "KEY EXPIRY"])
    return 0


@_guard
def _nodes_expire(args: argparse.Namespace) -> int:
    node_id = _resolve(args, args.id)
    data = _call(args, "POST", f"/nodes/{node_id}/expire")
    return _emit(args, data, f"node {data['name']} ({node_id}) expired")


@_guard
def _nodes_delete(args: argparse.Namespace) -> int:
    node_id = _resolve(args, args.id)
    data = _call(args, "DELETE", f"/nodes/{node_id}")
    return _emit(args, data, f"node {data['name']} ({node_id}) deleted")


@_guard
def _nodes_rename(args: argparse.Namespace) -> int:
    node_id = _resolve(args, args.id)
    data = _call(args, "POST", f"/nodes/{node_id}/rename", {"name": args.name})
    return _emit(args, data, f"node {node_id} is now {data['name']}")


@_guard
def _nodes_tag(args: argparse.Namespace) -> int:
    node_id = _resolve(args, args.id)
    tags = [t for t in args.tags.split(",") if t]
    data = _call(args, "POST", f"/nodes/{node_id}/tags", {"tags": tags})
    return _emit(args, data, f"node {data['name']} tags: {','.join(data['tags']) or '-'}")


@_guard
def _routes_list(args: argparse.Namespace) -> int:
    routes = _call(args, "GET", "/routes")
    if args.json:
        return _emit(args, routes)
    rows = [
        [
            str(r["node_id"]),
            r["node"],
            r["prefix"],
            "yes" if r["advertised"] else "no",
            "yes" if r["approved"] else "no",
            "yes" if r.get("primary") else "-",
        ]
        for r in routes
    ]
    _table(rows, ["NODE ID", "NODE", "PREFIX", "ADVERTISED", "APPROVED", "PRIMARY"])
    return 0


def _prefixes(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for prefix in args.prefix:
        out.extend(EXIT_ROUTES if prefix == "exit-node" else (prefix,))
    return list(dict.fromkeys(out))


@_guard
def _routes_approve(args: argparse.Namespace) -> int:
    node_id = _resolve(args, args.node)
    prefixes = _prefixes(args)
    data = _call(args, "POST", f"/nodes/{node_id}/routes/approve", {"prefixes": prefixes})
    return _emit(args, data, f"approved {', '.join(prefixes)} via {data['name']}")


@_guard
def _routes_unapprove(args: argparse.Namespace) -> int:
    node_id = _resolve(args, args.node)
    prefixes = _prefixes(args)
    data = _call(args, "POST", f"/nodes/{node_id}/routes/unapprove", {"prefixes": prefixes})
    return _emit(args, data, f"withdrew approval of {', '.join(prefixes)} via {data['name']}")


@_guard
def _adminkeys_create(args: argparse.Namespace) -> int:
    body = {
        "scopes": [s for s in args.scopes.split(",") if s],
        "expiration": None if args.expiration == "never" else args.expiration,
        "description": args.description,
    }
    data = _call(args, "POST", "/adminkeys", body)
    return _emit(args, data, data["key"])


@_guard
def _adminkeys_list(args: argparse.Namespace) -> int:
    keys = _call(args, "GET", "/adminkeys")
    if args.json:
        return _emit(args, keys)
    rows = [
        [
            str(k["id"]),
            k["prefix"],
            ",".join(k["scopes"]),
            _when(k["expires_at"]),
            "revoked" if k["revoked_at"] is not None else ("active" if k["active"] else "expired"),
            k["description"] or "-",
        ]
        for k in keys
    ]
    _table(rows, ["ID", "KEY", "SCOPES", "EXPIRES", "STATE", "DESCRIPTION"])
    return 0


@_guard
def _adminkeys_revoke(args: argparse.Namespace) -> int:
    data = _call(args, "POST", f"/adminkeys/{args.id}/revoke")
    return _emit(args, data, f"admin key {args.id} revoked")
