"""A NAT world for magicsock tests and bench/nat: the lab's internet with two relay regions
(wiremesh-derp + a STUN responder each, on public hosts) and agents (Engine + MagicSock in
static mode, `python -m wiremesh.agent.magicsock`) on hosts behind lab NAT routers.

    with Lab() as lab:
        world = NatWorld(lab)
        a = world.agent("a", lab.device("a", NatKind.EIM_APDF))
        b = world.agent("b", lab.device("b", NatKind.EDM))
        world.start()                       # relays, then every agent
        world.wait_direct(a, b)             # both sides report a trusted direct path
        world.ping(a, b)                    # ICMP over the tunnel
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from nacl.public import PrivateKey

from wiremesh.lab import Host, Lab

DERP_PORT = 3340
STUN_PORT = 3478
START_TIMEOUT = 20.0


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@dataclass
class Agent:
    name: str
    host: Host
    index: int
    private: bytes
    disco_private: bytes
    node_key: bytes
    disco_key: bytes
    tun: str
    socket_path: str = ""
    config_path: str = ""
    log_path: str = ""
    proc: subprocess.Popen[Any] | None = None
    home_region: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def mesh_ip(self) -> str:
        return f"100.64.{self.index // 250}.{self.index % 250 + 1}"


@dataclass
class RelayRegion:
    id: int
    host: Host
    proc: subprocess.Popen[Any] | None = None
    stun_proc: subprocess.Popen[Any] | None = None


class NatWorld:
    def __init__(self, lab: Lab, regions: int = 2, birthday: tuple[int, int] | None = None) -> None:
        self.lab = lab
        self.inet = lab.internet()
        self.regions = {rid: RelayRegion(rid, lab.host(f"relay{rid}")) for rid in range(1, regions + 1)}
        self.agents: dict[str, Agent] = {}
        self.birthday = birthday
        self.suffix = os.urandom(2).hex()
        self.started_at = 0.0
        self.extra_keys: list[bytes] = []  # node keys of agents not started by this world (mesh mode)
        self.netmap_dir = os.path.join(lab.tmpdir, "netmap")
        os.makedirs(self.netmap_dir, exist_ok=True)

    # -- building -------------------------------------------------------------------------

    def agent(self, name: str, host: Host, home_region: int | None = None) -> Agent:
        priv = PrivateKey.generate()
        disco = PrivateKey.generate()
        index = len(self.agents) + 1
        agent = Agent(
            name=name,
            host=host,
            index=index,
            private=bytes(priv),
            disco_private=bytes(disco),
            node_key=bytes(priv.public_key),
            disco_key=bytes(disco.public_key),
            tun=f"wmn{self.suffix}{index:02d}",
            home_region=home_region,
        )
        self.agents[name] = agent
        return agent

    def derp_map(self) -> dict[str, Any]:
        return {
            "regions": {
                str(r.id): {
                    "name": f"region{r.id}",
                    "relay": f"{r.host.address}:{DERP_PORT}",
                    "stun": f"{r.host.address}:{STUN_PORT}",
                }
                for r in self.regions.values()
            }
        }

    # -- relays ---------------------------------------------------------------------------

    def start_relay(self, rid: int) -> None:
        region = self.regions[rid]
        keys = os.path.join(self.lab.tmpdir, "allowed-keys")
        with open(keys, "w") as f:
            f.write(
                "".join(
                    b64(k) + "\n" for k in [*(a.node_key for a in self.agents.values()), *self.extra_keys]
                )
            )
        log = open(os.path.join(self.lab.tmpdir, f"derp{rid}.log"), "a")  # noqa: SIM115 - child keeps it
        region.proc = self.lab.popen(
            region.host,
            [
                sys.executable,
                "-m",
                "wiremesh.derp.server",
                "--listen",
                f"{region.host.address}:{DERP_PORT}",
                "--admin-listen",
                "127.0.0.1:9340",
                "--key-file",
                os.path.join(self.lab.tmpdir, f"derp{rid}.key"),
                "--region",
                f"region{rid}",
                "--allow-keys-file",
                keys,
                "--log-level",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        assert region.proc.stdout is not None
        ready, _, _ = select.select([region.proc.stdout], [], [], START_TIMEOUT)
        line = region.proc.stdout.readline() if ready else ""
        if '"ready": true' not in line:
            raise RuntimeError(f"relay {rid} did not start: {line!r}")
        if region.stun_proc is None:
            sock = self.lab.socket(region.host)
            sock.bind((region.host.address, STUN_PORT))
            region.stun_proc = self.lab.popen(
                region.host,
                [sys.executable, "-m", "wiremesh.lab.stunecho", "--fd", str(sock.fileno())],
                pass_fds=[sock.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            sock.close()

    def stop_relay(self, rid: int) -> None:
        proc = self.regions[rid].proc
        if proc is not None:
            self.lab.stop(proc)
            self.regions[rid].proc = None

    # -- agents ---------------------------------------------------------------------------

    def _config(self, agent: Agent) -> dict[str, Any]:
        peers = [
            {
                "name": other.name,
                "node_key": b64(other.node_key),
                "disco_key": b64(other.disco_key),
                "allowed_ips": [f"{other.mesh_ip}/32"],
                "home_region": other.home_region,
            }
            for other in self.agents.values()
            if other is not agent
        ]
        cfg: dict[str, Any] = {
            "private_key": b64(agent.private),
            "disco_private_key": b64(agent.disco_private),
            "tun": agent.tun,
            "addresses": [f"{agent.mesh_ip}/32"],
            "listen_port": 41641,
            "derp_map": self.derp_map(),
            "socket": agent.socket_path,
            "peers": peers,
            "netmap_dir": self.netmap_dir,
        }
        if self.birthday is not None:
            cfg["birthday_sockets"], cfg["birthday_spray"] = self.birthday
        cfg.update(agent.extra)
        return cfg

    def start_agent(self, agent: Agent) -> None:
        agent.socket_path = os.path.join(self.lab.tmpdir, f"{agent.name}.sock")
        agent.config_path = os.path.join(self.lab.tmpdir, f"{agent.name}.json")
        agent.log_path = os.path.join(self.lab.tmpdir, f"{agent.name}.log")
        with open(agent.config_path, "w") as f:
            json.dump(self._config(agent), f)
        with open(agent.log_path, "a") as log:
            agent.proc = self.lab.popen(
                agent.host,
                [sys.executable, "-m", "wiremesh.agent.magicsock", agent.config_path],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_agent(self, agent: Agent, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert agent.proc is not None
            if agent.proc.poll() is not None:
                raise RuntimeError(f"agent {agent.name} exited:\n{self.log(agent)[-3000:]}")
            if os.path.exists(agent.socket_path):
                try:
                    self.status(agent)
                    return
                except httpx.HTTPError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"agent {agent.name} did not start:\n{self.log(agent)[-3000:]}")

    def start(self) -> None:
        for rid in self.regions:
            self.start_relay(rid)
        self.started_at = time.monotonic()
        for agent in self.agents.values():
            self.start_agent(agent)
        for agent in self.agents.values():
            self.wait_agent(agent)

    def stop_agent(self, agent: Agent) -> None:
        if agent.proc is not None:
            self.lab.stop(agent.proc)
            agent.proc = None

    def log(self, agent: Agent) -> str:
        try:
            with open(agent.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # -- observing ------------------------------------------------------------------------

    def api(self, agent: Agent, method: str, path: str, timeout: float = 10.0) -> Any:
        transport = httpx.HTTPTransport(uds=agent.socket_path)
        with httpx.Client(transport=transport, base_url="http://wiremeshd", timeout=timeout) as client:
            response = client.request(method, f"/v0/{path}")
        response.raise_for_status()
        return response.json()

    def status(self, agent: Agent) -> dict[str, Any]:
        return dict(self.api(agent, "GET", "status"))

    def peer(self, agent: Agent, other: Agent) -> dict[str, Any]:
        return dict(self.status(agent)["magicsock"]["peers"][b64(other.node_key)])

    def path(self, agent: Agent, other: Agent) -> str:
        return str(self.peer(agent, other)["path"])

    def ping(self, a: Agent, b: Agent, count: int = 1, timeout: int = 2) -> bool:
        """ICMP echo over the tunnel from a to b's mesh address."""
        result = self.lab.run(
            a.host, ["ping", "-n", "-c", str(count), "-W", str(timeout), b.mesh_ip], check=False, timeout=30
        )
        return result.returncode == 0

    def ping_until(self, a: Agent, b: Agent, timeout: float = 20.0) -> bool:
        return wait_for(lambda: self.ping(a, b, timeout=1), timeout, interval=0.0)

    def wait_direct(self, a: Agent, b: Agent, timeout: float = 30.0) -> bool:
        return wait_for(lambda: self.path(a, b) == "direct" and self.path(b, a) == "direct", timeout)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def send_from_port(lab: Lab, host: Host, port: int, dest: tuple[str, int]) -> None:
    """One datagram from `host`'s UDP `port` to `dest` (inside the lab), from a throwaway socket.

    Forces a NAT mapping before an agent binds that port: an unanswered datagram leaves a
    conntrack entry for 30 s, which decides which host behind a shared NAT holds which public
    port towards `dest`, and which of a host's mappings its next new destinations reuse.
    """
    lab.ns_of(host)  # the namespace exists: never send outside the lab
    code = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.bind(('0.0.0.0', {port})); s.sendto(b'seed', {dest!r}); s.close()"
    )
    subprocess.run([*lab.exec_prefix(host), sys.executable, "-c", code], check=True, timeout=10)


def lab_socket_ok(lab: Lab, host: Host) -> bool:
    """The host's namespace still exists (checked before traffic is sent into the lab)."""
    try:
        lab.ns_of(host)
    except Exception:
        return False
    return True


__all__ = ["Agent", "NatWorld", "RelayRegion", "lab_socket_ok", "send_from_port", "socket", "wait_for"]
