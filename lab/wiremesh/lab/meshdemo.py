"""`make demo`: the whole mesh on one machine, in network namespaces behind NAT routers.

Run as root: ``python -m wiremesh.lab.meshdemo``. It builds a lab internet with

- a control host running nats-server, ``wiremesh-keys`` and ``wiremesh-coord`` (with a relay map
  of two regions and an admin key generated for this run),
- two relay hosts, one per region, each running ``wiremesh-derp`` (admitting the node keys the key
  registry publishes over NATS) and ``wiremesh-stun``,
- agents (``wiremeshd`` in mesh mode) on a public host, behind a home router (EIM, port-restricted),
  two behind one office router (EIM, address-restricted), behind a symmetric NAT, behind a carrier NAT
  plus a home router, behind a router that blocks UDP, and behind a router offering NAT-PMP/PCP,

then creates a pre-auth key with ``wiremesh admin``, joins every agent with it, has every pair ping
each other over the mesh, and prints who reaches whom and by which path (from each agent's local
API, the same data as ``wiremesh status --json``). Exit code 0 when every pair reached each other.

Only public entry points are used: the console scripts and the lab API. Service and agent logs go
to a directory that is kept and printed at the end; keys and state live in the lab's own temp dir
and go away with it.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import dataclasses
import functools
import http.client
import itertools
import json
import os
import pathlib
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from wiremesh.core import busauth
from wiremesh.lab import Host, Lab, LabError, NatKind, Router, support

VENV_BIN = pathlib.Path(sys.executable).parent
NATS_PORT = 4222
KEYS_PORT = 8081
COORD_PORT = 8080
DERP_PORT = 3340
STUN_PORT = 3478
ADMIN_PORT = 9340  # relay and STUN admin (/readyz, /metrics), on loopback inside their host
STUN_ADMIN_PORT = 9341
AGENT_PORT = 41641
SERVICE_TIMEOUT = 30.0

# The kinds of place an agent can sit in; the label is what the matrix prints.
PUBLIC = "public"
EIM_APDF = "home NAT (port-restricted)"
SAME_NAT = "office NAT (shared by two)"
EDM = "symmetric NAT (EDM)"
DOUBLE = "carrier NAT + home NAT"
UDP_BLOCKED = "firewall blocks UDP"
PORTMAP = "home NAT with NAT-PMP"


LEGEND = (
    "legend: direct ADDR   WireGuard goes straight to the peer at ADDR (its LAN address, NAT mapping",
    "                      or port mapping), found by disco pings through the NATs",
    "        relay REGION  through that region's DERP relay; still end-to-end encrypted",
    "        to direct     seconds from starting the agents until both sides of the pair used a direct path",
    "        a pair must use the relay when one side has UDP blocked or both are behind symmetric NATs",
)


@dataclasses.dataclass(frozen=True, slots=True)
class Schedule:
    """How long each phase may take (the smoke test shortens it)."""

    join_timeout: float = 60.0  # every agent Running and seeing all the others
    reach_timeout: float = 30.0  # every pair answered a ping
    direct_timeout: float = 30.0  # pairs that can go direct did
    iperf_seconds: int = 3  # 0: no throughput figure


@dataclasses.dataclass(frozen=True, slots=True)
class AgentSpec:
    name: str
    place: str
    listen_port: int = AGENT_PORT


FULL_AGENTS: tuple[AgentSpec, ...] = (
    AgentSpec("pub", PUBLIC),
    AgentSpec("home", EIM_APDF),
    AgentSpec("office1", SAME_NAT),
    AgentSpec("office2", SAME_NAT),
    AgentSpec("sym", EDM),
    AgentSpec("cgnat", DOUBLE),
    AgentSpec("blocked", UDP_BLOCKED),
    AgentSpec("pmap", PORTMAP),
)


@dataclasses.dataclass
class Agent:
    spec: AgentSpec
    host: Host
    ifname: str
    state_dir: pathlib.Path
    socket_path: str
    log_path: pathlib.Path
    proc: subprocess.Popen[Any] | None = None
    address: str = ""
    node_key: str = ""  # base64, as magicsock reports its peers

    @property
    def name(self) -> str:
        return self.spec.name


@dataclasses.dataclass(frozen=True, slots=True)
class PairResult:
    a: str
    b: str
    reached: bool
    path: str  # "direct", "relay" or "?" (as both sides see it at the end)
    detail: str  # "198.18.0.5:41641" or "region1" or ""
    time_to_direct: float | None  # seconds from the agents' start until both sides were direct
    must_go_direct: bool


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    agents: tuple[str, ...]
    pairs: tuple[PairResult, ...]
    log_dir: str

    @property
    def all_reached(self) -> bool:
        return all(p.reached for p in self.pairs)

    @property
    def missing_direct(self) -> tuple[PairResult, ...]:
        """Pairs that can go direct but never did (both sides direct at once) in the time given."""
        return tuple(p for p in self.pairs if p.must_go_direct and p.time_to_direct is None)

    @property
    def fell_back(self) -> tuple[PairResult, ...]:
        """Pairs that went direct but were on the relay when the matrix was taken."""
        return tuple(p for p in self.pairs if p.path != "direct" and p.time_to_direct is not None)

    @property
    def ok(self) -> bool:
        return self.all_reached


class DemoError(RuntimeError):
    """A phase of the demo could not complete (the message says which and why)."""


def must_go_direct(x: str, y: str) -> bool:
    """Issue 4's expectation: direct unless UDP is blocked on a side or both map per destination."""
    if UDP_BLOCKED in (x, y):
        return False
    return not (x == EDM and y == EDM)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    return support.wait_until(predicate, timeout, what, interval, error=DemoError)


def key_b64(text: str) -> str:
    """A node key as coord writes it (any encoding crypto accepts) -> plain base64."""
    from wiremesh.core import crypto

    try:
        return base64.b64encode(crypto.decode_key(text)).decode()
    except ValueError:
        return text


def nats_server_binary() -> str:
    try:
        return support.nats_server_binary()
    except RuntimeError as exc:
        raise DemoError(str(exc)) from None


def peer_path(status: dict[str, Any], node_key: str) -> tuple[str, str]:
    """("direct", address) / ("relay", region) / ("?", "") for one peer in a local API status.

    Reads magicsock's per-peer path wherever the agent reports it: a ``magicsock`` section keyed
    by node key (as the static backend does) or a ``path`` on the peer entry itself."""
    candidates: list[Any] = []
    ms = status.get("magicsock")
    if isinstance(ms, dict) and isinstance(ms.get("peers"), dict):
        for key, value in ms["peers"].items():
            if key_b64(str(key)) == node_key:
                candidates.append(value)
    for peer in status.get("peers") or []:
        if isinstance(peer, dict) and key_b64(str(peer.get("node_key", ""))) == node_key:
            candidates.append(peer.get("path") if isinstance(peer.get("path"), dict) else peer)
    for info in candidates:
        if not isinstance(info, dict) or info.get("path") not in ("direct", "relay"):
            continue
        if info["path"] == "direct":
            return "direct", str(
                info.get("direct") or info.get("direct_address") or info.get("endpoint") or ""
            )
        region = info.get("relay_region", info.get("region"))
        return "relay", "" if region is None else str(region)
    # No path report on this peer: the WireGuard endpoint tells (magicsock shows "relay:REGION"
    # or the trusted direct address there; without magicsock a handshake means direct).
    for peer in status.get("peers") or []:
        if not isinstance(peer, dict) or key_b64(str(peer.get("node_key", ""))) != node_key:
            continue
        endpoint = peer.get("endpoint")
        if isinstance(endpoint, str) and endpoint.startswith("relay"):
            return "relay", endpoint.partition(":")[2]  # magicsock's endpoint: "relay:REGION"
        if peer.get("last_handshake_seconds_ago") is not None and isinstance(endpoint, str):
            return "direct", endpoint
    return "?", ""


class MeshDemo:
    """The lab, the services and the agents, one phase per method; `run_demo()` drives them."""

    def __init__(
        self,
        lab: Lab,
        log_dir: pathlib.Path,
        agents: Sequence[AgentSpec] = FULL_AGENTS,
        schedule: Schedule = Schedule(),
        out: TextIO | None = None,
    ) -> None:
        self.lab = lab
        self.log_dir = log_dir
        self.state = pathlib.Path(lab.tmpdir)
        self.specs = tuple(agents)
        self.schedule = schedule
        self.out = out or sys.stdout
        self.started = time.monotonic()
        self.admin_key = "adm-" + secrets.token_hex(16)
        self.admin_key_file = self.state / "admin.key"
        self.admin_key_file.write_text(self.admin_key)
        self.admin_key_file.chmod(0o600)
        self.agents: dict[str, Agent] = {}
        self.region_names: dict[str, str] = {}
        self.suffix = secrets.token_hex(2)
        self._office_router: Router | None = None
        self.lock = threading.Lock()
        self.direct_at: dict[tuple[str, str], float] = {}  # pair -> seconds from the agents' start
        self.now_direct: set[tuple[str, str]] = set()  # pairs direct on both sides in the last look
        self.last_statuses: dict[str, dict[str, Any]] = {}  # that look: agent name -> status
        self.agents_started = time.monotonic()
        self.watch_stop = threading.Event()
        self.watcher = threading.Thread(target=self._watch_paths, name="demo-paths", daemon=True)

    # ---------------------------------------------------------------- output

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self.started:5.1f}s] {text}")

    # ---------------------------------------------------------------- processes

    def _popen(self, node: Host, name: str, argv: list[str], env: dict[str, str] | None = None) -> Any:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            return self.lab.popen(
                node, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )

    def _http_status(self, node: Host, host: str, port: int, path: str) -> int:
        """The HTTP status of GET path, from a socket inside node's namespace (0: no answer)."""
        sock = self.lab.socket(node, socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(2)
            sock.connect((host, port))
            conn = http.client.HTTPConnection(host, port, timeout=2)
            conn.sock = sock
            conn.request("GET", path)
            return conn.getresponse().status
        except OSError:
            return 0
        finally:
            sock.close()

    def _wait_ready(self, node: Host, host: str, port: int, path: str, what: str, proc: Any) -> None:
        def ready() -> bool:
            if proc.poll() is not None:
                raise DemoError(f"{what} exited (see {self.log_dir})")
            return self._http_status(node, host, port, path) == 200

        wait_until(ready, SERVICE_TIMEOUT, what, interval=0.2)

    # ---------------------------------------------------------------- building

    def build(self) -> None:
        self.lab.internet()
        self.control = self.lab.host("control")
        self.relays = [self.lab.host("relay1"), self.lab.host("relay2")]
        builders: dict[str, Callable[[str], Host]] = {
            PUBLIC: lambda name: self.lab.host(name),
            EIM_APDF: lambda name: self.lab.device(name, NatKind.EIM_APDF),
            SAME_NAT: lambda name: self.lab.host(name, behind=self._office()),
            EDM: lambda name: self.lab.device(name, NatKind.EDM),
            DOUBLE: self._double_nat,
            UDP_BLOCKED: lambda name: self.lab.device(name, NatKind.UDP_BLOCKED),
            PORTMAP: lambda name: self.lab.device(name, NatKind.PORTMAP),
        }
        for spec in self.specs:
            host = builders[spec.place](spec.name)
            self.agents[spec.name] = Agent(
                spec=spec,
                host=host,
                ifname=f"wd{spec.name[:4]}{self.suffix}{len(self.agents):02d}",
                state_dir=self.state / f"state-{spec.name}",
                socket_path=str(self.state / f"{spec.name}.sock"),
                log_path=self.log_dir / f"agent-{spec.name}.log",
            )

    def _office(self) -> Router:
        if self._office_router is None:
            self._office_router = self.lab.nat_router("office", NatKind.EIM_ADF)
        return self._office_router

    def _double_nat(self, name: str) -> Host:
        carrier = self.lab.nat_router(f"{name}-cg", NatKind.EIM_APDF, cgnat=True)
        home = self.lab.nat_router(f"{name}-home", NatKind.EIM_APDF, behind=carrier)
        return self.lab.host(name, behind=home)

    def derp_map(self) -> dict[str, Any]:
        regions = {}
        for rid, relay in enumerate(self.relays, start=1):
            regions[str(rid)] = {
                "name": f"region{rid}",
                "relay": f"{relay.address}:{DERP_PORT}",
                "stun": f"{relay.address}:{STUN_PORT}",
            }
            self.region_names[str(rid)] = f"region{rid}"
        return {"regions": regions}

    # ---------------------------------------------------------------- services

    def start_services(self) -> None:
        ctl = self.control
        # The relays reach NATS across the lab network, so it admits only the service roles, each
        # with its own NKey and only the subjects its role needs (wiremesh.core.busauth).
        bus = busauth.write_bus(self.state / "bus", listen=f"{ctl.address}:{NATS_PORT}")
        nats = self._popen(ctl, "nats", [nats_server_binary(), "-c", str(bus.config)])
        nats_url = f"nats://{ctl.address}:{NATS_PORT}"
        wait_until(lambda: self._tcp_open(ctl, ctl.address, NATS_PORT, nats), SERVICE_TIMEOUT, "nats-server")

        def service(name: str, listen: str, extra: list[str]) -> Any:
            state = self.state / name
            state.mkdir(exist_ok=True)
            argv = [str(VENV_BIN / f"wiremesh-{name}"), "--listen", listen, "--nats-url", nats_url]
            argv += ["--nats-credentials", str(bus.credentials[name])]
            argv += ["--state-dir", str(state), "--admin-key-file", str(self.admin_key_file)]
            argv += ["--log-format", "text", *extra]
            return self._popen(ctl, name, argv)

        keys = service("keys", f"127.0.0.1:{KEYS_PORT}", [])
        derp_map_file = self.state / "derp-map.json"
        derp_map_file.write_text(json.dumps(self.derp_map()))
        coord = service(
            "coord",
            f"{ctl.address}:{COORD_PORT}",
            ["--replica-id", "coord-0", "--derp-map", str(derp_map_file), "--heartbeat-interval", "2"],
        )
        self._wait_ready(ctl, "127.0.0.1", KEYS_PORT, "/readyz", "wiremesh-keys", keys)
        self._wait_ready(ctl, ctl.address, COORD_PORT, "/readyz", "wiremesh-coord", coord)
        self.step(f"control {ctl.address}: nats-server, wiremesh-keys, wiremesh-coord :{COORD_PORT}")

        relay_procs = []
        for rid, relay in enumerate(self.relays, start=1):
            derp = self._popen(
                relay,
                f"derp{rid}",
                [
                    str(VENV_BIN / "wiremesh-derp"),
                    "--listen", f"{relay.address}:{DERP_PORT}",
                    "--admin-listen", f"127.0.0.1:{ADMIN_PORT}",
                    "--key-file", str(self.state / f"derp{rid}.key"),
                    "--nats", nats_url,
                    "--nats-credentials", str(bus.credentials["derp"]),
                    "--region", f"region{rid}",
                    "--replica-id", f"region{rid}-a",
                    "--log-level", "info",
                ],
            )  # fmt: skip
            stun = self._popen(
                relay,
                f"stun{rid}",
                [
                    str(VENV_BIN / "wiremesh-stun"),
                    "--listen", f"{relay.address}:{STUN_PORT}",
                    "--admin-listen", f"127.0.0.1:{STUN_ADMIN_PORT}",
                ],
            )  # fmt: skip
            relay_procs.append((relay, rid, derp, stun))
        for relay, rid, derp, stun in relay_procs:
            self._wait_ready(relay, "127.0.0.1", ADMIN_PORT, "/readyz", f"wiremesh-derp region{rid}", derp)
            self._wait_ready(
                relay, "127.0.0.1", STUN_ADMIN_PORT, "/healthz", f"wiremesh-stun region{rid}", stun
            )
            self.step(f"region{rid} {relay.address}: wiremesh-derp :{DERP_PORT}, wiremesh-stun :{STUN_PORT}")

    def _tcp_open(self, node: Host, host: str, port: int, proc: Any) -> bool:
        if proc.poll() is not None:
            raise DemoError(f"process {proc.args[0]} exited (see {self.log_dir})")
        with contextlib.closing(self.lab.socket(node, socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.settimeout(0.5)
            return s.connect_ex((host, port)) == 0

    def admin(self, *args: str) -> Any:
        """`wiremesh admin --json ARGS` from the control host; the parsed answer."""
        argv = [
            str(VENV_BIN / "wiremesh"),
            "admin",
            "--server",
            f"http://{self.control.address}:{COORD_PORT}",
        ]
        argv += ["--admin-key-file", str(self.admin_key_file), "--json", *args]
        result = self.lab.run(self.control, argv, check=False, timeout=30)
        if result.returncode != 0:
            raise DemoError(f"wiremesh admin {' '.join(args)} failed: {result.stderr.strip()[-500:]}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    # ---------------------------------------------------------------- agents

    def start_agents(self) -> None:
        created = self.admin("authkeys", "create", "--user", "demo", "--reusable", "--expiration", "1h")
        key_file = self.state / "authkey"
        key_file.write_text(str(created["key"]))
        key_file.chmod(0o600)
        self.step(
            "pre-auth key created with `wiremesh admin authkeys create --reusable`; it ends with"
            " coord's key fingerprint, so agents pin coord's key over plain http://"
        )
        for agent in self.agents.values():
            argv = [
                str(VENV_BIN / "wiremeshd"),
                "--login-server",
                f"http://{self.control.address}:{COORD_PORT}",
            ]
            argv += ["--auth-key", f"file:{key_file}", "--state-dir", str(agent.state_dir)]
            argv += [
                "--tun",
                agent.ifname,
                "--hostname",
                agent.name,
                "--listen-port",
                str(agent.spec.listen_port),
            ]
            argv += ["--socket", agent.socket_path]
            with agent.log_path.open("ab") as log:
                agent.proc = self.lab.popen(
                    agent.host, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
                )
        self.agents_started = time.monotonic()
        self.watcher.start()
        want = len(self.agents) - 1

        def joined(agent: Agent) -> bool:
            if agent.proc is not None and agent.proc.poll() is not None:
                raise DemoError(f"wiremeshd {agent.name} exited: see {agent.log_path}")
            status = self.status(agent)
            if not status or status.get("backend_state") != "Running" or not status.get("netmap_version"):
                return False
            if len(status.get("peers") or []) < want:
                return False
            agent.address = next(a for a in status["self"]["addresses"] if ":" not in a)
            agent.node_key = key_b64(str(status["self"]["node_key"]))
            return True

        deadline = time.monotonic() + self.schedule.join_timeout
        for agent in self.agents.values():
            wait_until(
                functools.partial(joined, agent),
                max(deadline - time.monotonic(), 0.1),
                f"{agent.name} to join",
            )
        self.step(
            f"{len(self.agents)} agents Running, each sees the other {want}; what `wiremesh netcheck` says:"
        )
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(self.agents)) as pool:
            reports = dict(zip(self.agents, pool.map(self.netcheck, self.agents.values()), strict=True))
        self.say()
        self.say(
            f"{'agent':<8} {'mesh ip':<11} {'where':<27} {'udp':<4} {'public address':<19} {'varies':<7} home"
        )
        for agent in self.agents.values():
            nc = reports[agent.name]

            def yes(value: Any) -> str:
                return "?" if value is None else ("yes" if value else "no")

            public = nc.get("port_mapped_address") or nc.get("public_address") or "-"
            if nc.get("port_mapped_address"):
                public += "*"
            home = nc.get("preferred_region")
            self.say(
                f"{agent.name:<8} {agent.address:<11} {agent.spec.place:<27} {yes(nc.get('udp')):<4} "
                f"{public:<19} {yes(nc.get('mapping_varies_by_destination')):<7} "
                f"{self.region_names.get(str(home), '-') if home is not None else '-'}"
            )
        self.say("(varies: the NAT maps each destination to a new port; * a port mapped with NAT-PMP/PCP)")
        self.say()

    def netcheck(self, agent: Agent) -> dict[str, Any]:
        """The agent's `wiremesh netcheck --json` report ({} if it has none)."""
        from wiremesh.agent.cli.local import LocalAPIUnavailable, call

        try:
            code, payload = call(agent.socket_path, "POST", "netcheck")
        except (LocalAPIUnavailable, OSError, ValueError):
            return {}
        return dict(payload) if code == 200 and isinstance(payload, dict) else {}

    def _watch_paths(self) -> None:
        """Note when both sides of each pair first report a direct path (from the agents' start)."""
        pairs = list(itertools.combinations(self.agents.values(), 2))
        while not self.watch_stop.is_set():
            statuses = {a.name: self.status(a) or {} for a in self.agents.values()}
            now = time.monotonic()
            keys = {
                name: key_b64(str((st.get("self") or {}).get("node_key", "")))
                for name, st in statuses.items()
            }
            now_direct = set()
            for a, b in pairs:
                if not keys[a.name] or not keys[b.name]:
                    continue
                if (
                    peer_path(statuses[a.name], keys[b.name])[0] == "direct"
                    and peer_path(statuses[b.name], keys[a.name])[0] == "direct"
                ):
                    now_direct.add((a.name, b.name))
            with self.lock:
                for pair in now_direct:
                    self.direct_at.setdefault(pair, now - self.agents_started)
                self.now_direct = now_direct
                self.last_statuses = statuses
            self.watch_stop.wait(0.3)

    def stop_watching(self) -> None:
        self.watch_stop.set()
        if self.watcher.ident is not None:
            self.watcher.join(10)

    def status(self, agent: Agent) -> dict[str, Any] | None:
        """The agent's local API status (what `wiremesh status --json` prints), None if not up."""
        from wiremesh.agent.cli.local import LocalAPIUnavailable, call

        if not os.path.exists(agent.socket_path):
            return None
        try:
            code, payload = call(agent.socket_path, "GET", "status")
        except (LocalAPIUnavailable, OSError, ValueError):
            return None
        return dict(payload) if code == 200 and isinstance(payload, dict) else None

    # ---------------------------------------------------------------- the matrix

    def ping_once(self, src: Agent, dst: Agent) -> bool:
        with contextlib.suppress(Exception):
            self.lab.ns_of(src.host)  # the namespace still exists: never send outside the lab
            result = self.lab.run(
                src.host, ["ping", "-n", "-q", "-c", "1", "-W", "1", dst.address], check=False, timeout=10
            )
            return result.returncode == 0
        return False

    def probe(self) -> list[PairResult]:
        pairs = list(itertools.combinations(self.agents.values(), 2))
        self.step(f"every agent pings every other ({len(pairs)} pairs, both ways, concurrently)")
        first_ping = time.monotonic()
        reached: dict[tuple[str, str], bool] = {}
        direct_at = self.direct_at
        lock = self.lock
        stop = threading.Event()
        settled: dict[str, dict[str, Any]] = {}

        def reach(a: Agent, b: Agent) -> None:
            deadline = first_ping + self.schedule.reach_timeout
            ok_ab = ok_ba = False
            while time.monotonic() < deadline and not (ok_ab and ok_ba) and not stop.is_set():
                ok_ab = ok_ab or self.ping_once(a, b)
                ok_ba = ok_ba or self.ping_once(b, a)
            with lock:
                reached[(a.name, b.name)] = ok_ab and ok_ba

        # One worker per pair (pings are light), so every pair gets the whole reach window.
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(len(pairs), 32)))
        try:
            list(pool.map(lambda p: reach(*p), pairs))
            n_reached = sum(reached.values())
            self.step(f"{n_reached}/{len(pairs)} pairs reached each other")

            def want_direct(a: Agent, b: Agent) -> bool:
                return must_go_direct(a.spec.place, b.spec.place) and reached.get((a.name, b.name), False)

            wanted = [(a, b) for a, b in pairs if want_direct(a, b)]
            deadline = first_ping + self.schedule.reach_timeout + self.schedule.direct_timeout
            while time.monotonic() < deadline:
                with lock:
                    # Wait until they are direct at the same time, so the matrix shows settled
                    # paths rather than one caught in a fallback and re-probe.
                    pending = [(a, b) for a, b in wanted if (a.name, b.name) not in self.now_direct]
                    settled = dict(self.last_statuses)
                if not pending:
                    break
                list(pool.map(lambda p: self.ping_once(*p), pending))
                time.sleep(0.2)
        finally:
            # Also on Ctrl-C: the workers see `stop` and return, so teardown is not held up.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self.stop_watching()

        results = []
        # The matrix shows the look the wait above ended on.
        final = settled
        for agent in self.agents.values():
            if not final.get(agent.name):
                final[agent.name] = self.status(agent) or {}
        for a, b in pairs:
            path, detail = peer_path(final[a.name], b.node_key)
            back, back_detail = peer_path(final[b.name], a.node_key)
            if path == "direct" and back != "direct":
                # Direct only when both sides say so; otherwise show the side still relaying.
                path, detail = back, back_detail
            if path == "relay":
                detail = self.region_names.get(detail, detail)
            results.append(
                PairResult(
                    a=a.name,
                    b=b.name,
                    reached=reached.get((a.name, b.name), False),
                    path=path,
                    detail=detail,
                    time_to_direct=direct_at.get((a.name, b.name)),
                    must_go_direct=must_go_direct(a.spec.place, b.spec.place),
                )
            )
        return results

    def cli_examples(self, results: list[PairResult]) -> None:
        """`wiremesh ping` for one direct and one relayed pair, as a user would run it."""
        direct = next((r for r in results if r.path == "direct"), None)
        relayed = next((r for r in results if r.path == "relay"), None)
        for r, count in ((direct, 1), (relayed, 2)):
            if r is None:
                continue
            src = self.agents[r.a]
            argv = [str(VENV_BIN / "wiremesh"), "ping", "--socket", src.socket_path, "-c", str(count), r.b]
            result = self.lab.run(src.host, argv, check=False, timeout=30)
            self.say(f"{src.name}$ wiremesh ping -c {count} {r.b}")
            for line in (result.stdout + result.stderr).strip().splitlines()[:6]:
                self.say(f"  {line}")

    def iperf(self, results: list[PairResult]) -> None:
        if self.schedule.iperf_seconds <= 0:
            return
        direct = [r for r in results if r.path == "direct"]
        if not direct:
            return
        pick = direct[0]
        server, client = self.agents[pick.a], self.agents[pick.b]
        srv = self.lab.popen(
            server.host,
            ["iperf3", "-s", "-1", "-B", server.address],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            out = ""

            def run_client() -> bool:
                nonlocal out
                result = self.lab.run(
                    client.host,
                    ["iperf3", "-J", "-c", server.address, "-t", str(self.schedule.iperf_seconds)],
                    check=False,
                    timeout=self.schedule.iperf_seconds + 20,
                )
                out = result.stdout
                return result.returncode == 0

            wait_until(run_client, 10, "iperf3 server", interval=0.3)
            bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
            self.step(
                f"iperf3 {client.name} -> {server.name} over the direct path: {bps / 1e6:.0f} Mbit/s "
                f"(TCP, {self.schedule.iperf_seconds} s)"
            )
        except (DemoError, ValueError, KeyError) as exc:
            self.step(f"iperf3 {client.name} -> {server.name}: no figure ({exc})")
        finally:
            self.lab.stop(srv)

    # ---------------------------------------------------------------- report

    def print_matrix(self, results: list[PairResult]) -> None:
        self.say()
        for line in matrix_lines(results):
            self.say(line)


def matrix_lines(results: Sequence[PairResult]) -> list[str]:
    """The matrix, a summary line and the legend, as the demo prints them."""
    lines = []
    lines.append(f"{'pair':<20} {'reached':<8} {'path':<40} {'to direct':>9}")
    for r in results:
        if r.path == "direct":
            # A symmetric side that got through from one of its birthday probe sockets.
            path = "direct " + re.sub(r" \(probe socket \d+\)", " (birthday)", r.detail)
        elif r.path == "relay":
            path = f"relay {r.detail}".strip()
        else:
            path = "unknown"
        if r.path != "direct" and r.time_to_direct is not None:
            path += "  (was direct)"
        elif r.must_go_direct and r.path != "direct":
            path += "  (expected direct)"
        took = "-" if r.time_to_direct is None else f"{r.time_to_direct:.1f} s"
        lines.append(f"{r.a + ' <-> ' + r.b:<20} {'yes' if r.reached else 'NO':<8} {path:<40} {took:>9}")
    n = len(results)
    reached = sum(r.reached for r in results)
    direct = sum(r.path == "direct" for r in results)
    relayed = sum(r.path == "relay" for r in results)
    should = sum(r.must_go_direct for r in results)
    direct_ok = sum(r.must_go_direct and r.time_to_direct is not None for r in results)
    fell_back = sum(r.path != "direct" and r.time_to_direct is not None for r in results)
    lines.append("")
    lines.append(
        f"summary: {reached}/{n} pairs reached each other; {direct} direct, {relayed} relayed; "
        f"{direct_ok}/{should} pairs that can go direct did"
        + (f" ({fell_back} back on the relay at the end)" if fell_back else "")
    )
    lines += LEGEND
    return lines


def run_demo(
    agents: Sequence[AgentSpec] = FULL_AGENTS,
    schedule: Schedule = Schedule(),
    log_dir: pathlib.Path | None = None,
    out: TextIO | None = None,
) -> Report:
    """Build the lab, run the whole mesh, tear it down; the report of who reached whom."""
    log_dir = log_dir or pathlib.Path(tempfile.mkdtemp(prefix="wiremesh-demo-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    with Lab() as lab:
        demo = MeshDemo(lab, log_dir, agents, schedule, out)
        try:
            demo.step("building the lab: internet, control host, two relay regions, NAT routers")
            demo.build()
            demo.start_services()
            demo.start_agents()
            results = demo.probe()
            demo.print_matrix(results)
            demo.say()
            demo.cli_examples(results)
            demo.iperf(results)
            demo.step("tearing down")
        finally:
            demo.stop_watching()
    return Report(tuple(a.name for a in agents), tuple(results), str(log_dir))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m wiremesh.lab.meshdemo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--small", action="store_true", help="public, EIM, EDM, UDP-blocked, same-NAT only")
    parser.add_argument("--no-iperf", action="store_true", help="skip the throughput figure")
    parser.add_argument(
        "--log-dir", type=pathlib.Path, default=None, help="where logs go (default: a temp dir)"
    )
    return parser.parse_args(argv)


SMALL_AGENTS: tuple[AgentSpec, ...] = (
    AgentSpec("pub", PUBLIC),
    AgentSpec("home", EIM_APDF),
    AgentSpec("office1", SAME_NAT),
    AgentSpec("office2", SAME_NAT),
    AgentSpec("sym", EDM),
    AgentSpec("blocked", UDP_BLOCKED),
)


@contextlib.contextmanager
def _quiet_interrupt() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted: the lab was torn down\n")
        raise SystemExit(130) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("the demo needs root (network namespaces, TUN devices, nftables)\n")
        return 2
    log_dir = args.log_dir or pathlib.Path(tempfile.mkdtemp(prefix="wiremesh-demo-"))
    schedule = Schedule(iperf_seconds=0) if args.no_iperf else Schedule()
    with _quiet_interrupt():
        try:
            report = run_demo(SMALL_AGENTS if args.small else FULL_AGENTS, schedule, log_dir)
        except (DemoError, LabError) as exc:
            sys.stderr.write(f"demo failed: {exc}\nlogs: {log_dir}\n")
            return 1
    sys.stdout.write(f"logs: {report.log_dir}\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
