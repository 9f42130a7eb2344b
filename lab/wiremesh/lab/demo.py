"""`make demo`: two wiremesh agents in namespaces, one behind a NAT router, joined by a static tunnel.

Run as root: ``python -m wiremesh.lab.demo``. It builds the lab, starts ``wiremeshd`` on both
hosts with wg-quick style files, then shows a ping and a short iperf3 figure through the tunnel
and the agents' own counters, and removes everything on the way out.

The helpers here (start a WireGuard endpoint of either implementation in a lab host, scrape its
metrics, ping, iperf3) are also what the interop tests and ``bench/throughput`` use, so that the
demo, the tests and the benchmark build tunnels the same way.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from wiremesh.lab import Host, Lab, NatKind, support

log = logging.getLogger(__name__)

WIREMESH = "wiremesh"
WIREGUARD_GO = "wireguard-go"
TUNNEL_NET = "10.99.0"
TUNNEL_NET6 = "fd99::"
DEFAULT_PORT = 51820
READY_TIMEOUT_S = 15.0


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def keypair() -> tuple[bytes, bytes]:
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
        private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
    )


def unique_ifname(tag: str) -> str:
    """Interface names must be unique machine-wide: wireguard-go's control socket path is global."""
    return f"wm{tag[:3]}{secrets.token_hex(3)}"


@dataclasses.dataclass
class TunnelSide:
    """One WireGuard endpoint running in a lab host."""

    kind: str  # WIREMESH, WIREGUARD_GO, or a path to another wireguard-go binary
    host: Host
    ifname: str
    private_key: bytes
    public_key: bytes
    tunnel_ip: str
    listen_port: int
    tunnel_ip6: str | None = None
    metrics_port: int | None = None
    proc: subprocess.Popen[Any] | None = None
    log_path: str = ""

    @property
    def is_wiremesh(self) -> bool:
        return self.kind == WIREMESH

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""


def wg_quick_text(
    private_key: bytes,
    listen_port: int,
    address: str,
    peer_public_key: bytes,
    allowed_ips: str,
    endpoint: str | None,
    preshared_key: bytes | None,
    keepalive: int,
    mtu: int,
) -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {b64(private_key)}",
        f"ListenPort = {listen_port}",
        f"Address = {address}",
        f"MTU = {mtu}",
        "",
        "[Peer]",
        f"PublicKey = {b64(peer_public_key)}",
        f"AllowedIPs = {allowed_ips}",
    ]
    if preshared_key is not None:
        lines.append(f"PresharedKey = {b64(preshared_key)}")
    if endpoint is not None:
        lines.append(f"Endpoint = {endpoint}")
    if keepalive:
        lines.append(f"PersistentKeepalive = {keepalive}")
    return "\n".join(lines) + "\n"


def interface_up(lab: Lab, host: Host, ifname: str) -> bool:
    out = lab.run(host, ["ip", "-o", "link", "show", "dev", ifname], check=False)
    return out.returncode == 0 and ",UP" in out.stdout


def start_side(
    lab: Lab,
    kind: str,
    host: Host,
    *,
    index: int,
    peer: TunnelSide | None = None,
    peer_public_key: bytes,
    private_key: bytes,
    peer_endpoint: str | None,
    preshared_key: bytes | None = None,
    keepalive: int = 0,
    listen_port: int = DEFAULT_PORT,
    mtu: int = 1420,
    metrics_port: int | None = None,
    inner_ipv6: bool = False,
) -> TunnelSide:
    """Start a WireGuard endpoint of `kind` in `host` with tunnel address 10.99.0.<index>/24."""
    ifname = unique_ifname("m" if kind == WIREMESH else "g")
    tunnel_ip = f"{TUNNEL_NET}.{index}"
    peer_index = 2 if index == 1 else 1
    peer_ip = f"{TUNNEL_NET}.{peer_index}"
    addresses = [f"{tunnel_ip}/24"]
    allowed = [f"{peer_ip}/32"]
    if inner_ipv6:
        addresses.append(f"{TUNNEL_NET6}{index}/64")
        allowed.append(f"{TUNNEL_NET6}{peer_index}/128")
    side = TunnelSide(
        kind=kind,
        host=host,
        ifname=ifname,
        private_key=private_key,
        public_key=X25519PrivateKey.from_private_bytes(private_key)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw),
        tunnel_ip=tunnel_ip,
        tunnel_ip6=f"{TUNNEL_NET6}{index}" if inner_ipv6 else None,
        listen_port=listen_port,
        metrics_port=metrics_port,
        log_path=os.path.join(lab.tmpdir, f"{ifname}.log"),
    )
    logf = open(side.log_path, "wb")  # noqa: SIM115 - handed to the child, closed below
    try:
        if kind == WIREMESH:
            conf = os.path.join(lab.tmpdir, f"{ifname}.conf")
            with open(conf, "w") as f:
                os.fchmod(f.fileno(), 0o600)
                f.write(
                    wg_quick_text(
                        private_key,
                        listen_port,
                        ", ".join(addresses),
                        peer_public_key,
                        ", ".join(allowed),
                        peer_endpoint,
                        preshared_key,
                        keepalive,
                        mtu,
                    )
                )
            argv = [sys.executable, "-m", "wiremesh.agent.daemon", "--tun", ifname, "--wg-config", conf]
            if metrics_port is not None:
                argv += ["--metrics-listen", f"127.0.0.1:{metrics_port}"]
            side.proc = lab.popen(host, argv, stdout=logf, stderr=subprocess.STDOUT)
            support.wait_until(
                lambda: "event=ready" in side.log_text() or side.proc.poll() is not None,  # type: ignore[union-attr]
                READY_TIMEOUT_S,
                f"wiremeshd {ifname} to be ready",
            )
            if side.proc.poll() is not None:
                raise RuntimeError(f"wiremeshd exited {side.proc.returncode}: {side.log_text()[-2000:]}")
        else:
            binary = shutil.which(kind) or kind
            sock = f"/var/run/wireguard/{ifname}.sock"
            side.proc = lab.popen(host, [binary, "-f", ifname], stdout=logf, stderr=subprocess.STDOUT)
            support.wait_until(
                lambda: os.path.exists(sock) or side.proc.poll() is not None,  # type: ignore[union-attr]
                READY_TIMEOUT_S,
                f"{kind} {ifname} control socket",
            )
            if side.proc.poll() is not None:
                raise RuntimeError(f"{kind} exited {side.proc.returncode}: {side.log_text()[-2000:]}")
            keyfile = os.path.join(lab.tmpdir, f"{ifname}.key")
            pskfile = os.path.join(lab.tmpdir, f"{ifname}.psk")
            for path, value in ((keyfile, private_key), (pskfile, preshared_key)):
                if value is not None:
                    with open(path, "w") as f:
                        os.fchmod(f.fileno(), 0o600)
                        f.write(b64(value) + "\n")
            wg = ["wg", "set", ifname, "private-key", keyfile, "listen-port", str(listen_port)]
            wg += ["peer", b64(peer_public_key), "allowed-ips", ",".join(allowed)]
            if preshared_key is not None:
                wg += ["preshared-key", pskfile]
            if peer_endpoint is not None:
                wg += ["endpoint", peer_endpoint]
            if keepalive:
                wg += ["persistent-keepalive", str(keepalive)]
            lab.run(host, wg)
            for address in addresses:
                lab.run(
                    host,
                    ["ip", "addr", "add", address, "dev", ifname, *(["nodad"] if ":" in address else [])],
                )
            lab.run(host, ["ip", "link", "set", ifname, "mtu", str(mtu), "up"])
        support.wait_until(lambda: interface_up(lab, host, ifname), READY_TIMEOUT_S, f"{ifname} up")
    finally:
        logf.close()
    return side


def static_tunnel(
    lab: Lab,
    kind_a: str,
    host_a: Host,
    kind_b: str,
    host_b: Host,
    *,
    initiator: str = "a",
    psk: bool = False,
    keepalive: int = 0,
    metrics_ports: tuple[int | None, int | None] = (None, None),
    listen_port: int = DEFAULT_PORT,
    ipv6: bool = False,
) -> tuple[TunnelSide, TunnelSide]:
    """Two endpoints with 10.99.0.1 (a) and 10.99.0.2 (b).

    Only the `initiator` ("a", "b" or "both") is told the other's endpoint, so only it can start
    the handshake; the other learns the initiator's address from its authenticated packets.
    `host_b` must be reachable at `host_b.public_address` when a initiates, and vice versa.
    With `ipv6` the endpoints are the hosts' IPv6 addresses (a Lab(ipv6=True)) and the tunnel
    carries fd99::1 and fd99::2 as well.
    """
    priv_a, pub_a = keypair()
    priv_b, pub_b = keypair()
    preshared = secrets.token_bytes(32) if psk else None

    def endpoint(host: Host) -> str:
        if ipv6:
            if host.address6 is None:
                raise ValueError(f"{host.name} has no IPv6 address: use Lab(ipv6=True)")
            return f"[{host.address6}]:{listen_port}"
        return f"{host.public_address}:{listen_port}"

    ep_b = endpoint(host_b) if initiator in ("a", "both") else None
    ep_a = endpoint(host_a) if initiator in ("b", "both") else None

    def start_a() -> TunnelSide:
        return start_side(
            lab,
            kind_a,
            host_a,
            index=1,
            private_key=priv_a,
            peer_public_key=pub_b,
            peer_endpoint=ep_b,
            preshared_key=preshared,
            keepalive=keepalive if ep_b else 0,
            metrics_port=metrics_ports[0],
            listen_port=listen_port,
            inner_ipv6=ipv6,
        )

    def start_b() -> TunnelSide:
        return start_side(
            lab,
            kind_b,
            host_b,
            index=2,
            private_key=priv_b,
            peer_public_key=pub_a,
            peer_endpoint=ep_a,
            preshared_key=preshared,
            keepalive=keepalive if ep_a else 0,
            metrics_port=metrics_ports[1],
            listen_port=listen_port,
            inner_ipv6=ipv6,
        )

    # Start the responder first: an initiation sent before it listens is lost and only retried
    # after REKEY_TIMEOUT (5 s).
    if initiator == "a":
        b = start_b()
        a = start_a()
    else:
        a = start_a()
        b = start_b()
    return a, b


def stop_side(lab: Lab, side: TunnelSide) -> None:
    if side.proc is not None:
        lab.stop(side.proc)


# ------------------------------------------------------------------------------- measurements


def scrape(lab: Lab, side: TunnelSide) -> dict[str, float]:
    """Fetch a wiremeshd's /metrics from inside its namespace: {'name{label=...}': value}."""
    if side.metrics_port is None:
        raise ValueError("this side was started without a metrics port")
    sock = lab.socket(side.host, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(("127.0.0.1", side.metrics_port))
        sock.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    body = b"".join(chunks).split(b"\r\n\r\n", 1)[-1].decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in metrics.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


@dataclasses.dataclass(frozen=True)
class PingResult:
    sent: int
    received: int
    rtt_avg_ms: float | None

    @property
    def ok(self) -> bool:
        return self.received > 0

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0


def ping(
    lab: Lab, host: Host, address: str, count: int = 3, interval: float = 0.2, wait: float = 2
) -> PingResult:
    out = lab.run(
        host,
        ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", str(wait), address],
        check=False,
        timeout=count * interval + wait + 30,
    ).stdout
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", out)
    if m is None:
        return PingResult(count, 0, None)
    return PingResult(int(m.group(1)), int(m.group(2)), float(rtt.group(1)) if rtt else None)


@dataclasses.dataclass(frozen=True)
class IperfResult:
    bits_per_second: float
    bytes: int


def iperf3(
    lab: Lab, client: Host, server: Host, server_address: str, seconds: int = 10, reverse: bool = False
) -> IperfResult:
    """One TCP stream from client to server (server to client with `reverse`)."""
    port = 5201 + secrets.randbelow(500)
    srv = lab.popen(
        server,
        ["iperf3", "-s", "-1", "-B", server_address, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        support.wait_until(
            lambda: f":{port} " in lab.run(server, ["ss", "-Hltn"], check=False).stdout,
            10,
            "iperf3 server to listen",
        )
        argv = ["iperf3", "-c", server_address, "-p", str(port), "-t", str(seconds), "-J"]
        if reverse:
            argv.append("-R")
        out = lab.run(client, argv, check=False, timeout=seconds + 40)
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError as exc:
            raise RuntimeError(f"iperf3 failed: {out.stderr.strip() or out.stdout[:500]}") from exc
        if "error" in data:
            raise RuntimeError(f"iperf3 failed: {data['error']}")
        received = data["end"]["sum_received"]
        return IperfResult(float(received["bits_per_second"]), int(received["bytes"]))
    finally:
        lab.stop(srv)


# ------------------------------------------------------------------------------- the demo


@contextlib.contextmanager
def demo_lab() -> Iterator[tuple[Lab, TunnelSide, TunnelSide]]:
    with Lab() as lab:
        home = lab.nat_router("home", kind=NatKind.EIM_APDF)
        laptop = lab.host("laptop", behind=home)
        server = lab.host("server")
        a, b = static_tunnel(
            lab, WIREMESH, laptop, WIREMESH, server, initiator="a", keepalive=25, metrics_ports=(9586, 9586)
        )
        yield lab, a, b


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    if os.geteuid() != 0:
        sys.stderr.write("make demo needs root (network namespaces, TUN devices, nftables)\n")
        return 1
    with demo_lab() as (lab, a, b):
        say = sys.stdout.write
        say("wiremesh demo: two agents with a static WireGuard tunnel\n")
        say(
            f"  laptop  {a.host.address} behind NAT router (public {a.host.public_address}), tunnel {a.tunnel_ip}\n"
        )
        say(f"  server  {b.host.address} on the internet, tunnel {b.tunnel_ip}\n\n")
        p = ping(lab, a.host, b.tunnel_ip, count=5)
        say(
            f"ping laptop -> server through the tunnel: {p.received}/{p.sent} replies, avg rtt {p.rtt_avg_ms} ms\n"
        )
        p = ping(lab, b.host, a.tunnel_ip, count=5)
        say(
            f"ping server -> laptop through the tunnel: {p.received}/{p.sent} replies, avg rtt {p.rtt_avg_ms} ms\n"
        )
        up = iperf3(lab, a.host, b.host, b.tunnel_ip, seconds=3)
        down = iperf3(lab, a.host, b.host, b.tunnel_ip, seconds=3, reverse=True)
        say(f"iperf3 TCP 3 s: laptop -> server {up.bits_per_second / 1e6:.0f} Mbit/s, ")
        say(f"server -> laptop {down.bits_per_second / 1e6:.0f} Mbit/s\n")
        m = scrape(lab, b)
        say(
            "server agent metrics: "
            f"rx {metric_sum(m, 'wiremesh_peer_rx_bytes_total') / 1e6:.1f} MB, "
            f"tx {metric_sum(m, 'wiremesh_peer_tx_bytes_total') / 1e6:.1f} MB, "
            f"handshakes {metric_sum(m, 'wiremesh_peer_handshakes_completed_total'):.0f}\n"
        )
        ok = p.ok and up.bytes > 0 and down.bytes > 0
        say("\ncleaning up (namespaces, interfaces, processes)\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
