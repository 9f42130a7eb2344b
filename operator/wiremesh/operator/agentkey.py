"""`python -m wiremesh.operator.agentkey`: the node agent's init step in the Helm chart's DaemonSet.

It fetches the auth-key Secret the operator wrote for this pod's cluster Node
(`meshnode-<spec.nodeName>-authkey`, in the node-keys namespace) with the pod's own projected
service-account token, and leaves what wiremeshd needs as files in a directory shared with the
agent container (an emptyDir):

    authkey            the one-off pre-auth key (mode 0600; empty when there is none)
    hostname           the mesh hostname the MeshNode expects
    advertise-routes   the Node's pod CIDRs, comma-separated

The token is mounted into this init container only; the long-running agent never holds any
Kubernetes credential. A Secret that does not exist yet (the operator has not mirrored the Node)
is waited for; if it never comes, empty files are left and the agent starts with the identity
it keeps in its state directory, if it has one.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import pathlib
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

log = logging.getLogger("wiremesh.operator.agentkey")

TOKEN_DIR = "/var/run/secrets/wiremesh"
MAX_SECRET_BYTES = 64 * 1024  # one small Secret; anything bigger is not ours
MAX_KEY_BYTES = 256  # what wiremeshd accepts
_HOSTNAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_ROUTES = re.compile(r"^[0-9a-fA-F:.,/]*$")


class FetchError(RuntimeError):
    """The Secret could not be read: `retry` says whether waiting may help."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


def fetch_secret(api_url: str, token: str, ca_file: str, namespace: str, name: str) -> dict[str, str] | None:
    """The Secret's data (decoded), None when it does not exist."""
    path = f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/secrets/{urllib.parse.quote(name)}"
    request = urllib.request.Request(
        api_url.rstrip("/") + path, headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}
    )
    context = ssl.create_default_context(cafile=ca_file or None)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            body = response.read(MAX_SECRET_BYTES + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        if exc.code in (401, 403):
            raise FetchError(
                f"the API server refused to show Secret {namespace}/{name} ({exc.code}): check the"
                " agent's ServiceAccount, Role and RoleBinding in that namespace",
                retry=False,
            ) from None
        raise FetchError(f"reading Secret {namespace}/{name}: HTTP {exc.code}", retry=True) from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"API server unreachable at {api_url}: {exc}", retry=True) from None
    if len(body) > MAX_SECRET_BYTES:
        raise FetchError(f"Secret {namespace}/{name} is larger than {MAX_SECRET_BYTES} bytes", retry=False)
    try:
        data = json.loads(body).get("data") or {}
        return {str(k): base64.b64decode(v).decode() for k, v in data.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise FetchError(f"Secret {namespace}/{name} is unreadable: {exc}", retry=False) from None


def agent_files(data: dict[str, str] | None, default_hostname: str) -> dict[str, str]:
    """The files for wiremeshd, checked: a malformed field is dropped rather than passed on."""
    data = data or {}
    key = data.get("authkey", "").strip()
    if len(key) > MAX_KEY_BYTES or not key.isprintable():
        log.warning("auth key in the Secret is malformed: ignored")
        key = ""
    hostname = data.get("hostname", "").strip()
    if not _HOSTNAME.match(hostname):
        hostname = default_hostname
    routes = data.get("advertise-routes", "").strip()
    if not _ROUTES.match(routes):
        log.warning("advertise-routes in the Secret is malformed: ignored")
        routes = ""
    return {"authkey": key, "hostname": hostname, "advertise-routes": routes}


def write_files(out: pathlib.Path, files: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, value in files.items():
        path = out / name
        tmp = out / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if name == "authkey" else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        tmp.replace(path)


def run(
    args: argparse.Namespace,
    fetch: Callable[[str, str, str, str, str], dict[str, str] | None] = fetch_secret,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    token_file = pathlib.Path(args.token_file)
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        log.error("no service-account token at %s: %s", token_file, exc.strerror)
        return 1
    deadline = clock() + args.wait
    data: dict[str, str] | None = None
    while True:
        try:
            data = fetch(args.api_url, token, args.ca_file, args.namespace, args.secret)
        except FetchError as exc:
            if not exc.retry or clock() >= deadline:
                log.error("%s", exc)
                return 1
            log.warning("%s; retrying", exc)
        else:
            if data is not None and data.get("authkey"):
                break
            if clock() >= deadline:
                log.warning(
                    "no auth key in Secret %s/%s after %.0fs: starting without one (a node that"
                    " joined before keeps its identity in its state directory)",
                    args.namespace,
                    args.secret,
                    args.wait,
                )
                break
        sleep(min(args.interval, max(0.0, deadline - clock())))
    files = agent_files(data, args.default_hostname)
    write_files(pathlib.Path(args.out), files)
    log.info(
        "auth key for %s written to %s (hostname %s, routes %s)",
        args.secret,
        args.out,
        files["hostname"],
        files["advertise-routes"] or "-",
    )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    default_api = ""
    if env("KUBERNETES_SERVICE_HOST"):
        host = env("KUBERNETES_SERVICE_HOST", "")
        host = f"[{host}]" if ":" in host else host
        default_api = f"https://{host}:{env('KUBERNETES_SERVICE_PORT', '443')}"
    p = argparse.ArgumentParser(
        prog="python -m wiremesh.operator.agentkey", description=__doc__.splitlines()[0]
    )
    p.add_argument("--namespace", required=True, help="namespace of the node-key Secrets")
    p.add_argument("--secret", required=True, help="this node's Secret, meshnode-NODE-authkey")
    p.add_argument("--out", required=True, help="directory for the files wiremeshd reads")
    p.add_argument("--default-hostname", required=True, help="hostname when the Secret has none")
    p.add_argument("--api-url", default=default_api, help="default: from KUBERNETES_SERVICE_HOST/PORT")
    p.add_argument("--token-file", default=f"{TOKEN_DIR}/token")
    p.add_argument("--ca-file", default=f"{TOKEN_DIR}/ca.crt")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the Secret")
    p.add_argument("--interval", type=float, default=3.0, help="seconds between attempts")
    args = p.parse_args(argv)
    if not args.api_url:
        p.error("no API server: pass --api-url (KUBERNETES_SERVICE_HOST is not set)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
