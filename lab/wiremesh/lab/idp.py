"""A real OpenID provider for tests and demos: Ory Hydra, built from its Go module, with a small
login-and-consent app (Hydra keeps users out of its core: an app it redirects to signs them in).

Hydra is built once per machine into ``~/.cache/wiremesh/hydra/<version>`` (under
``$WIREMESH_GO_CACHE`` if set), beside the programs wiremesh.lab.gobuild builds. `go install
MODULE@VERSION` refuses Hydra (its go.mod has replace directives), so the module's source comes
from the Go module proxy (``go mod download``), its replace of the nested client module is
dropped for the published one, and ``go build -tags sqlite`` (cgo) gives an in-memory database.

    with IdentityProvider(workdir, users={"alice@example.com": User("pw", ("eng",))}) as idp:
        idp.add_client("wiremesh", "secret", ["http://127.0.0.1:8080/oidc/callback"])
        idp.issuer                           # http://127.0.0.1:PORT/
        page = browser_login(url, "alice@example.com", "pw")   # drives the login form over HTTP

`spawn` and `http` let the whole provider live inside a lab namespace; `python -m
wiremesh.lab.idp app|browser ...` runs the app or a browser there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import html
import http.server
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

from wiremesh.lab import gobuild
from wiremesh.lab.support import StartedService, wait_until

log = logging.getLogger("wiremesh.lab.idp")

HYDRA_MODULE = "github.com/ory/hydra/v2"
HYDRA_VERSION = "v2.3.0"
# Hydra's go.mod replaces its client with ./internal/httpclient, a nested module the module zip
# leaves out; the published module of the same version serves instead.
NESTED_CLIENT = "github.com/ory/hydra-client-go/v2"
BUILD_TIMEOUT = gobuild.BUILD_TIMEOUT
SYSTEM_SECRET = "wiremesh-test-hydra-system-secret-0000"


class IdpError(RuntimeError):
    """Hydra could not be built or started; the message says why."""


# ---- building hydra ----


def cache_dir() -> Path:
    return gobuild.cache_root() / "hydra" / HYDRA_VERSION


def binary(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "bin" / "hydra"


def is_built(cache: Path | None = None) -> bool:
    path = binary(cache)
    return path.is_file() and os.access(path, os.X_OK)


def build(cache: Path | None = None, timeout: float = BUILD_TIMEOUT) -> Path:
    """Build Hydra into the cache unless it is there; concurrent callers wait on a lock file."""
    cache = cache or cache_dir()
    if is_built(cache):
        return binary(cache)
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_built(cache):
            return binary(cache)
        env = gobuild.go_env()
        # cgo for the sqlite driver behind `dsn: memory`; a module cache anyone may delete later.
        env.update(CGO_ENABLED="1", GOFLAGS=env["GOFLAGS"] + " -modcacherw")
        try:
            go = gobuild.go_binary()
        except gobuild.GoBuildError as exc:
            raise IdpError(str(exc)) from None
        started = time.monotonic()

        def step(argv: list[str], cwd: Path) -> str:
            remaining = max(timeout - (time.monotonic() - started), 1.0)
            try:
                done = subprocess.run(
                    argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=remaining
                )
            except subprocess.TimeoutExpired:
                raise IdpError(f"`go {argv[1]}` did not finish within {timeout:g} s") from None
            if done.returncode != 0:
                raise IdpError(f"`{' '.join(argv[:3])}` failed:\n{done.stderr[-4000:]}")
            return done.stdout

        info = json.loads(step([go, "mod", "download", "-json", f"{HYDRA_MODULE}@{HYDRA_VERSION}"], cache))
        src = cache / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(info["Dir"], src)
        for path in [src, *src.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)  # the module cache is read-only
        step([go, "mod", "edit", f"-dropreplace={NESTED_CLIENT}"], src)
        staging = cache / "bin.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        tags = "sqlite,sqlite_omit_load_extension"
        step(
            [go, "build", "-trimpath", "-ldflags=-s -w", "-tags", tags, "-o", str(staging / "hydra"), "."],
            src,
        )
        bindir = cache / "bin"
        shutil.rmtree(bindir, ignore_errors=True)
        staging.rename(bindir)
        shutil.rmtree(src, ignore_errors=True)
        elapsed = time.monotonic() - started
        (cache / "build-seconds").write_text(f"{elapsed:.0f}\n")
        log.info("hydra_built version=%s seconds=%.0f dir=%s", HYDRA_VERSION, elapsed, bindir)
    return binary(cache)


# ---- the login-and-consent app ----


@dataclasses.dataclass(frozen=True)
class User:
    password: str
    groups: tuple[str, ...] = ()
    name: str = ""


def _request(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    return json.loads(raw) if raw else None


LOGIN_FORM = """<!doctype html><title>Sign in</title><h1>Sign in</h1>{error}
<form method="post" action="/login">
<input type="hidden" name="challenge" value="{challenge}">
<label>Email <input name="email"></label> <label>Password <input type="password" name="password"></label>
<button type="submit">Sign in</button></form>"""


class LoginApp:
    """Hydra's login and consent endpoints: a form checks the password; consent is granted at
    once (a first-party app) with the user's email, name and groups in the ID token."""

    def __init__(self, admin_url: str, users: Mapping[str, User] | Path, listen: tuple[str, int]) -> None:
        self.admin_url = admin_url.rstrip("/")
        self._users = users  # a live mapping, or a JSON file read at each sign-in
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("login_app " + format, *args)

            def do_GET(self) -> None:
                app.get(self)

            def do_POST(self) -> None:
                app.post(self)

        self.server = http.server.ThreadingHTTPServer(listen, Handler)
        self.thread: threading.Thread | None = None

    def start(self) -> LoginApp:
        self.thread = threading.Thread(target=self.server.serve_forever, name="login-app", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def users(self) -> Mapping[str, User]:
        if isinstance(self._users, Path):
            return read_users(self._users)
        return self._users

    @staticmethod
    def subject(email: str) -> str:
        """A stable subject that is not the email (so coord maps subjects, not addresses)."""
        return "u-" + hashlib.sha256(email.encode()).hexdigest()[:16]

    def _page(self, handler: http.server.BaseHTTPRequestHandler, status: int, text: str) -> None:
        body = text.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "text/html; charset=utf-8")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _redirect(self, handler: http.server.BaseHTTPRequestHandler, location: str) -> None:
        handler.send_response(302)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def get(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlparse(handler.path)
        query = urllib.parse.parse_qs(url.query)
        try:
            if url.path == "/login":
                challenge = query["login_challenge"][0]
                self._page(handler, 200, LOGIN_FORM.format(error="", challenge=html.escape(challenge)))
            elif url.path == "/consent":
                self._consent(handler, query["consent_challenge"][0])
            else:
                self._page(handler, 404, "not found")
        except (KeyError, IndexError):
            self._page(handler, 400, "missing challenge")
        except urllib.error.HTTPError as exc:
            self._page(handler, 502, f"hydra refused: {exc.code} {exc.read()[:300].decode(errors='replace')}")

    def post(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        length = min(int(handler.headers.get("Content-Length") or 0), 64 * 1024)
        form = urllib.parse.parse_qs(handler.rfile.read(length).decode())
        challenge = form.get("challenge", [""])[0]
        email = form.get("email", [""])[0]
        user = self.users.get(email)
        if user is None or not secrets.compare_digest(user.password, form.get("password", [""])[0]):
            error = "<p class=error>Wrong email or password.</p>"
            self._page(handler, 200, LOGIN_FORM.format(error=error, challenge=html.escape(challenge)))
            return
        quoted = urllib.parse.quote(challenge)
        try:
            accepted = _request(
                "PUT",
                f"{self.admin_url}/admin/oauth2/auth/requests/login/accept?login_challenge={quoted}",
                {"subject": self.subject(email), "remember": False, "context": {"email": email}},
            )
        except urllib.error.HTTPError as exc:
            self._page(handler, 502, f"hydra refused the login: {exc.code}")
            return
        self._redirect(handler, accepted["redirect_to"])

    def _consent(self, handler: http.server.BaseHTTPRequestHandler, challenge: str) -> None:
        quoted = urllib.parse.quote(challenge)
        asked = _request(
            "GET", f"{self.admin_url}/admin/oauth2/auth/requests/consent?consent_challenge={quoted}"
        )
        email = (asked.get("context") or {}).get("email", "")
        user = self.users.get(email, User(""))
        claims = {"email": email, "email_verified": True, "name": user.name or email.split("@")[0]}
        if "groups" in asked.get("requested_scope", []) or user.groups:
            claims["groups"] = list(user.groups)
        accepted = _request(
            "PUT",
            f"{self.admin_url}/admin/oauth2/auth/requests/consent/accept?consent_challenge={quoted}",
            {
                "grant_scope": asked.get("requested_scope", []),
                "grant_access_token_audience": asked.get("requested_access_token_audience", []),
                "remember": False,
                "session": {"id_token": claims},
            },
        )
        self._redirect(handler, accepted["redirect_to"])


def read_users(path: Path) -> dict[str, User]:
    raw = json.loads(path.read_text())
    return {e: User(u["password"], tuple(u.get("groups", ())), u.get("name", "")) for e, u in raw.items()}


def write_users(path: Path, users: Mapping[str, User]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({k: dataclasses.asdict(v) for k, v in users.items()}))
    tmp.rename(path)


# ---- hydra itself ----


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


Spawn = Callable[[list[str], Any, Mapping[str, str]], subprocess.Popen[Any]]
Http = Callable[[str, str, Any], Any]  # (method, url, body) -> decoded JSON


def _spawn_here(argv: list[str], log_file: Any, env: Mapping[str, str]) -> subprocess.Popen[Any]:
    return subprocess.Popen(
        argv, stdout=log_file, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
    )


class IdentityProvider(StartedService):
    """Hydra (public and admin APIs) plus the login app, on `host`.

    By default both run here on loopback (the app in a thread). In a lab, pass `spawn` (start a
    process inside the namespace), `http` (an admin request made from inside it) and fixed ports;
    the app then runs as `python -m wiremesh.lab.idp app` beside Hydra.
    """

    def __init__(
        self,
        workdir: Path,
        users: Mapping[str, User],
        *,
        host: str = "127.0.0.1",
        ports: tuple[int, int, int] | None = None,
        spawn: Spawn | None = None,
        http: Http | None = None,
        id_token_ttl: str = "1h",
    ) -> None:
        self.workdir = Path(workdir)
        self.users = dict(users)
        self.host = host
        self.public_port, self.admin_port, self.app_port = ports or (free_port(), free_port(), free_port())
        self.spawn = spawn
        self.http = http or _request
        self.id_token_ttl = id_token_ttl
        self.procs: list[subprocess.Popen[Any]] = []
        self.app: LoginApp | None = None

    @property
    def issuer(self) -> str:
        return f"http://{self.host}:{self.public_port}/"

    @property
    def admin_url(self) -> str:
        return f"http://{self.host}:{self.admin_port}"

    def config_text(self) -> str:
        app = f"http://{self.host}:{self.app_port}"
        return json.dumps(
            {
                "dsn": "memory",
                "serve": {
                    "public": {"host": self.host, "port": self.public_port},
                    "admin": {"host": self.host, "port": self.admin_port},
                },
                "urls": {
                    "self": {"issuer": self.issuer},
                    "login": f"{app}/login",
                    "consent": f"{app}/consent",
                },
                "secrets": {"system": [SYSTEM_SECRET]},
                "ttl": {"id_token": self.id_token_ttl},
                "oidc": {"subject_identifiers": {"supported_types": ["public"]}},
                "log": {"level": "warn"},
            },
            indent=2,
        )

    def start(self) -> None:
        hydra = build()
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "hydra.json"
        config.write_text(self.config_text())
        spawn = self.spawn or _spawn_here
        env = {**os.environ, "SQA_OPT_OUT": "true"}
        with open(self.workdir / "hydra.log", "ab") as out:
            self.procs.append(
                spawn(
                    [str(hydra), "serve", "all", "--dev", "--sqa-opt-out", "--config", str(config)], out, env
                )
            )
        if self.spawn is None:
            self.app = LoginApp(self.admin_url, self.users, (self.host, self.app_port)).start()
        else:
            users = self.workdir / "users.json"
            write_users(users, self.users)
            argv = [
                sys.executable,
                "-m",
                "wiremesh.lab.idp",
                "app",
                "--listen",
                f"{self.host}:{self.app_port}",
            ]
            argv += ["--admin-url", self.admin_url, "--users", str(users)]
            with open(self.workdir / "login-app.log", "ab") as out:
                self.procs.append(spawn(argv, out, os.environ))
        wait_until(self._ready, 60, what="hydra ready", interval=0.2)

    def _ready(self) -> bool:
        if any(p.poll() is not None for p in self.procs):
            raise IdpError(f"hydra or its login app exited:\n{self.logs()}")
        try:
            ready = self.http("GET", f"{self.admin_url}/health/ready", None)
            self.http("GET", f"{self.issuer}.well-known/openid-configuration", None)
            return bool(ready)
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        if self.app is not None:
            self.app.stop()
            self.app = None
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self.procs = []

    def set_user(self, email: str, user: User) -> None:
        """Add or change a user at the provider (their groups show at their next sign-in)."""
        self.users[email] = user
        if self.spawn is not None:
            write_users(self.workdir / "users.json", self.users)

    def logs(self) -> str:
        out = []
        for name in ("hydra.log", "login-app.log"):
            path = self.workdir / name
            if path.exists():
                out.append(f"--- {name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(out)

    def add_client(
        self, client_id: str, secret: str, redirect_uris: list[str], *, id_token_lifespan: str | None = None
    ) -> dict[str, Any]:
        """Register an OAuth2 client (authorization code, client_secret_basic)."""
        client = self.http(
            "POST",
            f"{self.admin_url}/admin/clients",
            {
                "client_id": client_id,
                "client_secret": secret,
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "scope": "openid email profile groups",
                "redirect_uris": redirect_uris,
                "token_endpoint_auth_method": "client_secret_basic",
            },
        )
        if id_token_lifespan is not None:
            self.http(
                "PUT",
                f"{self.admin_url}/admin/clients/{urllib.parse.quote(client_id)}/lifespans",
                {"authorization_code_grant_id_token_lifespan": id_token_lifespan},
            )
        return dict(client)


# ---- a browser, over HTTP ----

_HIDDEN = re.compile(r'name="challenge" value="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Page:
    status: int
    url: str
    text: str


def browser_login(url: str, email: str, password: str, *, stop_at: str = "", timeout: float = 30.0) -> Page:
    """Open `url`, follow redirects to the login form, sign in, and follow redirects until a page
    (or, with `stop_at`, a redirect to a URL starting with it, not followed) is reached."""
    with httpx.Client(timeout=timeout, follow_redirects=False) as client:
        page = _follow(client, client.get(url), stop_at)
        found = _HIDDEN.search(page.text)
        if found is None:
            return page  # no form: already signed in, or an error page
        form = {"challenge": html.unescape(found.group(1)), "email": email, "password": password}
        login = page.url.split("?", 1)[0]
        return _follow(client, client.post(login, data=form), stop_at)


def _follow(client: httpx.Client, response: httpx.Response, stop_at: str) -> Page:
    for _ in range(20):
        location = response.headers.get("location")
        if response.status_code not in (301, 302, 303, 307, 308) or not location:
            return Page(response.status_code, str(response.url), response.text)
        target = str(response.url.join(location))
        if stop_at and target.startswith(stop_at):
            return Page(response.status_code, target, "")
        response = client.get(target)
    raise IdpError("too many redirects")


# ---- command line (for running inside a lab namespace) ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wiremesh.lab.idp")
    sub = parser.add_subparsers(dest="command", required=True)
    app = sub.add_parser("app", help="serve the login-and-consent app")
    app.add_argument("--listen", required=True)
    app.add_argument("--admin-url", required=True)
    app.add_argument("--users", required=True, help="JSON file: {email: {password, groups, name}}")
    browser = sub.add_parser("browser", help="sign in at URL; print the final page as JSON")
    browser.add_argument("url")
    browser.add_argument("email")
    browser.add_argument("password")
    sub.add_parser("build", help="build hydra into the cache")
    args = parser.parse_args(argv)
    if args.command == "build":
        print(build())
        return 0
    if args.command == "browser":
        page = browser_login(args.url, args.email, args.password)
        print(json.dumps(dataclasses.asdict(page)))
        return 0
    host, _, port = args.listen.rpartition(":")
    server = LoginApp(args.admin_url, Path(args.users), (host, int(port)))
    with contextlib.suppress(KeyboardInterrupt):
        server.server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
