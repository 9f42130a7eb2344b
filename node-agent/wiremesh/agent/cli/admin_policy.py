"""`wiremesh admin policy get|set FILE|clear`: the ACL policy in force on coord.

`set` uploads the file as is (HuJSON, comments kept); coord refuses an invalid policy or one
whose tests fail, printing each error, and the policy in force stays in force.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import httpx

from wiremesh.core.policy.hujson import MAX_TEXT


def register(groups: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    policy = groups.add_parser("policy", help="the ACL policy").add_subparsers(
        dest="action", metavar="ACTION"
    )
    policy.required = True
    policy.add_parser("get", help="print the policy in force").set_defaults(func=_get)
    put = policy.add_parser("set", help="validate on coord and put a policy file in force")
    put.add_argument("file", help="policy file (HuJSON), or - for standard input")
    put.set_defaults(func=_set)
    policy.add_parser("clear", help="remove the policy: everyone may reach everyone").set_defaults(
        func=_clear
    )


def _request(args: argparse.Namespace, method: str, content: bytes | None = None) -> tuple[int, Any]:
    key = args.admin_key
    if not key and args.admin_key_file:
        key = pathlib.Path(args.admin_key_file).read_text().strip()
    if not key:
        raise _Failed("no admin key: pass --admin-key or set WIREMESH_ADMIN_KEY")
    try:
        response = httpx.request(
            method,
            f"{args.server.rstrip('/')}/api/v1/policy",
            content=content,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "text/plain; charset=utf-8"},
            timeout=30,
        )
    except httpx.HTTPError as exc:
        raise _Failed(f"cannot reach coord at {args.server}: {exc}") from exc
    try:
        data = response.json()
    except ValueError:
        data = {"detail": response.text[:200]}
    return response.status_code, data


class _Failed(Exception):
    pass


def _run(fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(fn(args))
    except _Failed as exc:
        print(f"wiremesh admin policy: {exc}", file=sys.stderr)
        return 1


def _report(args: argparse.Namespace, status: int, data: Any) -> int:
    if status >= 400:
        detail = data.get("detail") if isinstance(data, dict) else data
        print(f"wiremesh admin policy: coord refused ({status}): {detail}", file=sys.stderr)
        for error in data.get("errors", []) if isinstance(data, dict) else []:
            print(f"  {error}", file=sys.stderr)
        return 1
    for warning in data.get("warnings", []):
        print(warning, file=sys.stderr)
    return 0


def _get(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        status, data = _request(args, "GET")
        if status >= 400:
            return _report(args, status, data)
        if args.json:
            import json

            print(json.dumps(data, indent=2))
        elif data.get("policy") is None:
            print("// no policy set: every node may reach every other node", file=sys.stderr)
        else:
            print(data["policy"], end="" if data["policy"].endswith("\n") else "\n")
        return 0

    return _run(run, args)


def _set(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        try:
            if args.file == "-":
                text = sys.stdin.buffer.read(MAX_TEXT + 1)
            else:
                text = pathlib.Path(args.file).read_bytes()[: MAX_TEXT + 1]
        except OSError as exc:
            raise _Failed(f"cannot read {args.file}: {exc.strerror or exc}") from exc
        status, data = _request(args, "PUT", text)
        code = _report(args, status, data)
        if code == 0:
            print(f"policy version {data.get('version')} in force")
        return code

    return _run(run, args)


def _clear(args: argparse.Namespace) -> int:
    def run(args: argparse.Namespace) -> int:
        status, data = _request(args, "DELETE")
        code = _report(args, status, data)
        if code == 0:
            print("policy cleared: every node may reach every other node")
        return code

    return _run(run, args)
