"""A mesh in a lab: NATS, keys and coord in a "ctl" namespace, wiremeshd agents in others.

Nothing touches the root namespace's addresses: the services listen inside ctl, agents reach
coord at ctl's lab address, the test process talks to the services through sockets opened
inside ctl and to the agents through their unix sockets (filesystem, not network).
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import pathlib
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from wiremesh.agent.cli.local import call as local_call
from wiremesh.core import busauth
from wiremesh.lab import Host, Lab, NatKind, Router
from wiremesh.lab.support import nats_server_binary, wait_until

VENV_BIN = pathlib.Path(sys.executable).parent
COORD_PORT = 8080
KEYS_PORT = 8081
NATS_PORT = 4222
AGENT_PORT = 41641
METRICS_PORT = 9586
COORD_ARGS = ["--heartbeat-interval", "1", "--ephemeral-grace", "1"]


@dataclasses.dataclass
class Agent:
    name: str
    node: Host | Router
    ifname: str
    state_dir: pathlib.Path
    socket_path: str
    log_path: pathlib.Path
    routes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    proc: subprocess.Popen[Any] | None = None

    def status(self) -> dict[str, Any]:
        code, payload = local_call(self.socket_path, "GET", "status")
        assert code == 200, payload
        return dict(payload)

    def try_status(self) -> dict[str, Any] | None:
        try:
            return self.status()
        except Exception:
            return None

    def address(self, family: int = 4) -> str:
        addresses = self.status()["self"]["addresses"]
        return next(a for a in addresses if (":" in a) == (family == 6))

    def peer_names(self) -> set[str]:
        return {p["name"] for p in self.status()["peers"]}

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class MeshLab:
    """Services in `ctl`; `agent()` starts wiremeshd in a host (or router) of the lab."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.dir = pathlib.Path(lab.tmpdir)
        self.ctl = lab.host("ctl")
        # The bus admits only the service roles, each with its own NKey (wiremesh.core.busauth).
        self.bus = busauth.write_bus(self.dir / "bus", listen=f"127.0.0.1:{NATS_PORT}")
        self.admin_key = "adm-" + secrets.token_hex(16)
        self.nats: subprocess.Popen[Any] | None = None
        self.keys: subprocess.Popen[Any] | None = None
        self.coord: subprocess.Popen[Any] | None = None
        self.agents: dict[str, Agent] = {}

    @property
    def login_server(self) -> str:
        return f"http://{self.ctl.address}:{COORD_PORT}"

    # ---- services

    def _log(self, name: str) -> Any:
        return open(self.dir / f"{name}.log", "ab")

    def start_nats(self) -> None:
        with self._log("nats") as log:
            self.nats = self.lab.popen(
                self.ctl,
                [nats_server_binary(), "-c", str(self.bus.config)],
                stdout=log,
                stderr=log,
            )
        wait_until(lambda: self._port_open(NATS_PORT), 15, "nats-server in ctl")

    def _service(
        self, module: str, name: str, listen: str, extra: list[str], role: str | None = None
    ) -> subprocess.Popen[Any]:
        """`name` names its log and database, and its bus role unless `role` is given."""
        code = f"import sys; from {module} import main; sys.exit(main())"
        argv = [sys.executable, "-c", code, "--listen", listen, "--log-format", "text"]
        argv += ["--nats-url", f"nats://127.0.0.1:{NATS_PORT}", "--state-dir", str(self.dir)]
        argv += ["--nats-credentials", str(self.bus.credentials[role or name])]
        argv += ["--database-url", f"sqlite:///{self.dir / (name + '.db')}", *extra]
        env = {**os.environ, "WIREMESH_ADMIN_KEY": self.admin_key}
        with self._log(name) as log:
            return self.lab.popen(self.ctl, argv, stdout=log, stderr=log, env=env)

    def start_keys(self) -> None:
        self.keys = self._service("wiremesh.keys.app", "keys", f"127.0.0.1:{KEYS_PORT}", [])

    def start_coord(self) -> None:
        self.coord = self._service(
            "wiremesh.coord.app",
            "coord",
            f"{self.ctl.address}:{COORD_PORT}",
            ["--replica-id", "coord-0", *COORD_ARGS],
        )

    def wait_services(self) -> None:
        wait_until(lambda: self._ready(KEYS_PORT, "127.0.0.1"), 30, "keys ready")
        wait_until(lambda: self._ready(COORD_PORT, self.ctl.address), 30, "coord ready")

    def start_services(self) -> None:
        self.start_nats()
        self.start_keys()
        self.start_coord()
        self.wait_services()

    def stop_process(self, proc: subprocess.Popen[Any] | None) -> None:
        if proc is not None:
            self.lab.stop(proc)

    def _port_open(self, port: int, host: str = "127.0.0.1") -> bool:
        with contextlib.closing(self.lab.socket(self.ctl, socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.settimeout(0.5)
            return s.connect_ex((host, port)) == 0

    def coord_key(self) -> str:
        """Coord's public control key, read from inside ctl (the trusted path an operator would
        use; `wiremesh admin coord-key` gives the same) for an agent's --coord-key."""
        code, answer = self.http(self.ctl.address, COORD_PORT, "GET", "/key")
        assert code == 200, answer
        return str(answer["public_key"])

    def http(
        self,
        host: str,
        port: int,
        method: str,
        path: str,
        body: Any = None,
        node: Host | Router | None = None,
    ) -> tuple[int, Any]:
        sock = self.lab.socket(node or self.ctl, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            sock.connect((host, port))
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.sock = sock
            if isinstance(body, str):
                data: bytes | None = body.encode()
                content_type = "text/plain"
            else:
                data = None if body is None else json.dumps(body).encode()
                content_type = "application/json"
            headers = {"Authorization": f"Bearer {self.admin_key}", "Content-Type": content_type}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            try:
                return response.status, json.loads(raw)
            except ValueError:
                return response.status, raw.decode(errors="replace")
        finally:
            sock.close()

    def _ready(self, port: int, host: str) -> bool:
        try:
            return self.http(host, port, "GET", "/readyz")[0] == 200
        except OSError:
            return False

    def admin_cli(self, *args: str) -> Any:
        """`wiremesh admin --json ARGS` run inside ctl against coord; returns the parsed output."""
        argv = [str(VENV_BIN / "wiremesh"), "admin", "--server", self.login_server, "--json", *args]
        env = {**os.environ, "WIREMESH_ADMIN_KEY": self.admin_key}
        out = self.lab.run(self.ctl, argv, env=env).stdout
        return json.loads(out) if out.strip() else None

    def set_policy(self, text: str | None) -> Any:
        """PUT (or DELETE, for None) coord's policy; AssertionError with coord's answer if refused."""
        if text is None:
            code, answer = self.http(self.ctl.address, COORD_PORT, "DELETE", "/api/v1/policy")
        else:
            code, answer = self.http(self.ctl.address, COORD_PORT, "PUT", "/api/v1/policy", text)
        assert code == 200, answer
        return answer

    def auth_key(self, *options: str) -> str:
        created = self.admin_cli("authkeys", "create", "--user", "alice", *options)
        return str(created["key"])

    def logs(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    # ---- agents

    def agent(
        self,
        name: str,
        node: Host | Router,
        auth_key: str | None,
        routes: tuple[str, ...] = (),
        wait: bool = True,
        metrics: bool = False,
        flags: tuple[str, ...] = (),
    ) -> Agent:
        if name in self.agents:
            agent = self.agents[name]
        else:
            agent = Agent(
                name=name,
                node=node,
                ifname=f"wm{name[:4]}{secrets.token_hex(3)}",
                state_dir=self.dir / f"state-{name}",
                socket_path=str(self.dir / f"{name}.sock"),
                log_path=self.dir / f"agent-{name}.log",
                routes=routes,
                flags=flags,
            )
            self.agents[name] = agent
        argv = [sys.executable, "-m", "wiremesh.agent.daemon", "--login-server", self.login_server]
        argv += ["--state-dir", str(agent.state_dir), "--tun", agent.ifname, "--hostname", name]
        argv += ["--listen-port", str(AGENT_PORT), "--socket", agent.socket_path]
        if agent.routes:
            argv += ["--advertise-routes", ",".join(agent.routes)]
        argv += agent.flags
        if metrics:
            argv += ["--metrics-listen", f"127.0.0.1:{METRICS_PORT}"]
        if auth_key is not None:
            key_file = self.dir / f"{name}.authkey"
            key_file.write_text(auth_key)
            key_file.chmod(0o600)
            argv += ["--auth-key", f"file:{key_file}"]
        with agent.log_path.open("ab") as log:
            agent.proc = self.lab.popen(node, argv, stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_running(agent)
        return agent

    def wait_running(self, agent: Agent, timeout: float = 30) -> dict[str, Any]:
        def running() -> dict[str, Any] | None:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise RuntimeError(f"wiremeshd {agent.name} exited: {agent.log_text()[-3000:]}")
            status = agent.try_status()
            if status and status["backend_state"] == "Running" and status["netmap_version"]:
                return status
            return None

        return dict(wait_until(running, timeout, f"agent {agent.name} running", interval=0.1))

    def scrape(self, agent: Agent) -> str:
        """The agent's /metrics text (served on loopback inside its namespace)."""
        code, text = self.http("127.0.0.1", METRICS_PORT, "GET", "/metrics", node=agent.node)
        assert code == 200, text
        return str(text)

    def stop_agent(self, agent: Agent) -> None:
        if agent.proc is not None:
            self.lab.stop(agent.proc)
            agent.proc = None


class RelayMapMeshLab(MeshLab):
    """A MeshLab whose coord serves a relay map (the NAT tests' regions), so agents run magicsock."""

    def __init__(self, lab: Lab, derp_map_file: str) -> None:
        super().__init__(lab)
        self.derp_map_file = derp_map_file

    def start_coord(self) -> None:
        self.coord = self._service(
            "wiremesh.coord.app",
            "coord",
            f"{self.ctl.address}:{COORD_PORT}",
            ["--replica-id", "coord-0", *COORD_ARGS, "--derp-map", self.derp_map_file],
        )


def peer_status(agent: Agent, name: str) -> dict[str, Any]:
    """The agent's `wiremesh status` entry for the peer called `name` ({} if it has none)."""
    return next((p for p in agent.status()["peers"] if p["name"] == name), {})


def peer_endpoint(agent: Agent, name: str) -> str:
    """The endpoint the agent uses for the peer called `name` ("" if it has none)."""
    return str(peer_status(agent, name).get("endpoint") or "")


@contextlib.contextmanager
def mesh_lab() -> Iterator[MeshLab]:
    with Lab() as lab:
        mesh = MeshLab(lab)
        try:
            mesh.start_services()
            yield mesh
        except BaseException:
            sys.stderr.write(mesh.logs()[-20000:])
            raise


def router_with_pod(lab: Lab, name: str) -> tuple[Router, Host]:
    """A router namespace (forwarding on) with a "pod" host on its LAN, for subnet routes.

    The router's NAT input chain drops new connections from the WAN; the agent's WireGuard
    port is opened in it, as an operator opens a node's firewall for the mesh.
    """
    router = lab.nat_router(name, kind=NatKind.EIM_APDF)
    pod = lab.host(f"{name}-pod", behind=router)
    lab.run(
        router, ["nft", "insert", "rule", "ip", "wmlab", "input", "udp", "dport", str(AGENT_PORT), "accept"]
    )
    return router, pod


PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) received")


def ping(lab: Lab, node: Host | Router, address: str, count: int = 3, wait: float = 2) -> tuple[int, int]:
    """(sent, received) for `count` pings from `node` to `address` (inside the lab)."""
    out = lab.run(
        node,
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", str(wait), address],
        check=False,
        timeout=count * 0.2 + wait + 20,
    ).stdout
    m = PING_RE.search(out)
    return (count, 0) if m is None else (int(m.group(1)), int(m.group(2)))


def pings(lab: Lab, node: Host | Router, address: str, timeout: float = 15) -> bool:
    """True once one ping gets through (the first handshake may eat the first packets)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(lab, node, address, count=1, wait=1)[1]:
            return True
    return False
