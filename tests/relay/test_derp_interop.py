"""Interop with Tailscale's own DERP code, built from its published Go module (slow: the first
run downloads and compiles it into bench/.cache, as bench/derp does):

- Tailscale's DERP client package (driven by bench/derp_loadgen) relays through our server;
- our asyncio client relays through Tailscale's derper.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import socket
import subprocess
import time
from pathlib import Path
from types import ModuleType

import pytest
from nacl.public import PrivateKey

from wiremesh.agent.derpclient import DerpClient
from wiremesh.core.derp.connection import PacketReceived

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def bench_module() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("bench_derp", str(ROOT / "bench" / "derp"))
    spec = importlib.util.spec_from_loader("bench_derp", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def go_programs() -> ModuleType:
    bench = bench_module()
    bench.build()  # derper and derp_loadgen into bench/.cache/bin
    return bench


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tailscale_derp_client_relays_through_our_server(go_programs: ModuleType, tmp_path: Path) -> None:
    loadgen = str(go_programs.LOADGEN)
    priv, pub = tmp_path / "keys.priv", tmp_path / "keys.pub"
    subprocess.run([loadgen, "genkeys", "-n", "2", "-priv", str(priv), "-pub", str(pub)], check=True)
    port = free_port()
    relay = subprocess.Popen(
        [
            str(go_programs.VENV_PY), "-m", "wiremesh.derp.server",
            "--listen", f"127.0.0.1:{port}", "--admin-listen", "127.0.0.1:0",
            "--key-file", str(tmp_path / "derp.key"), "--allow-keys-file", str(pub),
            "--allow-unchallenged-clients",  # Tailscale's client does not answer our challenge
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert relay.stdout is not None
        assert json.loads(relay.stdout.readline())["ready"]
        out = subprocess.run(
            [loadgen, "run", "-priv", str(priv), "-url", f"http://127.0.0.1:{port}/derp",
             "-pairs", "1", "-duration", "1s", "-warmup", "200ms"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["received"] > 0
    finally:
        relay.terminate()
        relay.wait(10)


async def test_our_client_relays_through_tailscale_derper(go_programs: ModuleType, tmp_path: Path) -> None:
    port = free_port()
    derper = subprocess.Popen(
        [str(go_programs.DERPER), "-a", f"127.0.0.1:{port}", "-http-port", "-1", "-stun=false",
         "-c", str(tmp_path / "derper.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert derper.poll() is None and time.monotonic() < deadline, "derper did not start"
                time.sleep(0.05)
        a, b = PrivateKey.generate(), PrivateKey.generate()
        ca = await DerpClient.connect("127.0.0.1", port, a)
        cb = await DerpClient.connect("127.0.0.1", port, b)
        await ca.send(bytes(b.public_key), b"through derper")
        event = await cb.recv(5)
        while not isinstance(event, PacketReceived):
            event = await cb.recv(5)
        assert (event.src, event.packet) == (bytes(a.public_key), b"through derper")
        assert await ca.ping() >= 0
        await ca.close()
        await cb.close()
    finally:
        derper.terminate()
        derper.wait(10)
