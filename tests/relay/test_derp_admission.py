"""Relay admission against a real wiremesh-derp process: replayed handshakes, unchallenged
clients, connections per source address, control-frame floods and the default rate limit.

Each test speaks DERP over a plain socket with the sans-I/O client core, so it can capture
and replay bytes the way an attacker on the path would.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nacl.public import Box, PrivateKey, PublicKey

from wiremesh.core.derp import frames
from wiremesh.core.derp.connection import ClientConnection, Connected, State
from wiremesh.core.derp.frames import FrameReader, FrameType

pytestmark = pytest.mark.timeout(120)
UPGRADE = b"GET /derp HTTP/1.1\r\nHost: relay\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"


@dataclass
class RelayProcess:
    proc: subprocess.Popen[str]
    port: int
    admin_port: int

    def metric(self, name: str, reason: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        match = re.search(rf'^{name}_total{{reason="{reason}"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0


@pytest.fixture
def start_relay(tmp_path: Path) -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def start(*allowed: PrivateKey, extra: tuple[str, ...] = ()) -> RelayProcess:
        keys = tmp_path / f"allowed{len(started)}"
        keys.write_text("".join(base64.b64encode(bytes(k.public_key)).decode() + "\n" for k in allowed))
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "wiremesh.derp.server",
                "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                "--key-file", str(tmp_path / f"derp{len(started)}.key"),
                "--allow-keys-file", str(keys), "--log-level", "info", *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"derp{len(started)}.log", "w"),  # noqa: SIM115
            text=True,
        )  # fmt: skip
        started.append(proc)
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        return RelayProcess(proc, ready["derp_ports"][0], ready["admin_port"])

    try:
        yield start
    finally:
        for proc in started:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def upgraded(port: int) -> socket.socket:
    """A TCP connection past the HTTP upgrade (the 101 response read and discarded)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "relay closed during the upgrade"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def read_frames(sock: socket.socket, reader: FrameReader, want: int = 1) -> list[tuple[int, bytes]]:
    """At least `want` frames, or fewer if the relay closes the connection first."""
    got: list[tuple[int, bytes]] = []
    while len(got) < want:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += reader.feed(chunk)
    return got


def handshake(port: int, key: PrivateKey) -> tuple[socket.socket, ClientConnection, bytes, Connected]:
    """A legitimate client: returns the socket, its core, the ClientInfo bytes it sent, and Connected."""
    sock = upgraded(port)
    conn = ClientConnection(key, now=time.monotonic())
    events: list[object] = []
    client_info = b""
    while not any(isinstance(e, Connected) for e in events):
        chunk = sock.recv(65536)
        assert chunk, "relay closed the handshake"
        events += conn.receive_data(chunk, time.monotonic())
        out = conn.data_to_send()
        if out:
            client_info = client_info or out
            sock.sendall(out)
    connected = next(e for e in events if isinstance(e, Connected))
    return sock, conn, client_info, connected


def closed_without_server_info(sock: socket.socket) -> bool:
    """True if the relay closes the connection, False as soon as it sends ServerInfo (admitted)."""
    reader = FrameReader(1 << 20)
    while chunk := sock.recv(65536):
        if any(t == FrameType.SERVER_INFO for t, _ in reader.feed(chunk)):
            return False
    return True


def test_a_captured_client_info_replayed_on_a_new_connection_is_refused(start_relay) -> None:  # type: ignore[no-untyped-def]
    victim = PrivateKey.generate()
    relay = start_relay(victim)
    victim_sock, victim_conn, captured, _ = handshake(relay.port, victim)

    attacker = upgraded(relay.port)
    server_key = read_frames(attacker, FrameReader(1 << 20))
    assert server_key and server_key[0][0] == FrameType.SERVER_KEY
    attacker.sendall(captured)  # the victim's ClientInfo, byte for byte

    assert closed_without_server_info(attacker)
    assert relay.metric("derp_connections_refused", "challenge_failed") == 1
    # The victim was not displaced by the replay: its connection still answers a Ping.
    victim_conn.send_frame(frames.Ping(b"12345678"), time.monotonic())
    victim_sock.sendall(victim_conn.data_to_send())
    victim_sock.settimeout(10)
    replies = read_frames(victim_sock, FrameReader(1 << 20))
    assert (FrameType.PONG, b"12345678") in replies
    victim_sock.close()
    attacker.close()


def unchallenged_client_info(key: PrivateKey, server_key_payload: bytes) -> bytes:
    """A ClientInfo as Tailscale's client writes it: no answer to the challenge."""
    server_key = server_key_payload[len(frames.MAGIC) : len(frames.MAGIC) + frames.KEY_LEN]
    box = Box(key, PublicKey(server_key))
    sealed = box.encrypt(b'{"version":2}', b"\x01" * frames.NONCE_LEN)
    return frames.encode_frame(FrameType.CLIENT_INFO, bytes(key.public_key) + sealed)


@pytest.mark.parametrize(("extra", "admitted"), [((), False), (("--allow-unchallenged-clients",), True)])
def test_clients_that_ignore_the_challenge_are_admitted_only_when_allowed(
    start_relay,  # type: ignore[no-untyped-def]
    extra: tuple[str, ...],
    admitted: bool,
) -> None:
    key = PrivateKey.generate()
    relay = start_relay(key, extra=extra)
    sock = upgraded(relay.port)
    reader = FrameReader(1 << 20)
    (frame_type, payload), *_ = read_frames(sock, reader)
    assert frame_type == FrameType.SERVER_KEY
    assert len(payload) == len(frames.MAGIC) + frames.KEY_LEN + frames.CHALLENGE_LEN
    sock.sendall(unchallenged_client_info(key, payload))
    assert closed_without_server_info(sock) is not admitted
    sock.close()


def test_connections_per_source_address_are_capped(start_relay) -> None:  # type: ignore[no-untyped-def]
    relay = start_relay(extra=("--max-connections-per-ip", "3"))
    held = [upgraded(relay.port) for _ in range(3)]
    refused = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    try:
        refused.sendall(UPGRADE)
        assert refused.recv(1024) == b""
    except ConnectionResetError:
        pass  # aborted: as refused as an orderly close
    refused.close()
    assert relay.metric("derp_connections_refused", "too_many_connections_from_address") == 1
    held.pop().close()
    deadline = time.monotonic() + 10
    while True:  # the relay notices the close, then the address has room again
        try:
            held.append(upgraded(relay.port))
            break
        except (AssertionError, ConnectionError):
            assert time.monotonic() < deadline, "a freed slot was never reusable"
            time.sleep(0.05)
    for sock in held:
        sock.close()


def test_a_client_flooding_pings_without_reading_is_no_longer_read(start_relay) -> None:  # type: ignore[no-untyped-def]
    """Every Ping owes a Pong: a client that never reads them must stop being read, not grow the
    relay's buffers. Our sends stall once the relay stops reading (rate limit off, to be sure
    which bound acts)."""
    key = PrivateKey.generate()
    relay = start_relay(key, extra=("--rate-bytes-per-second", "0", "--max-queue-bytes", "65536"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", relay.port))
    sock.sendall(UPGRADE)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    conn = ClientConnection(key, now=time.monotonic())
    conn.receive_data(head.partition(b"\r\n\r\n")[2], time.monotonic())  # ServerKey may be here
    while True:
        sock.sendall(conn.data_to_send())  # ClientInfo once ServerKey is in
        if conn.state is State.ESTABLISHED:
            break  # ServerInfo arrived: from here on, nothing is read
        conn.receive_data(sock.recv(4096), time.monotonic())
    pings = frames.encode(frames.Ping(b"p" * 8)) * 80_000  # ~1 MB of Pings per send
    sock.settimeout(5)
    sent = 0
    limit = 64 << 20  # well past every socket buffer on the way; the old relay read it all
    with pytest.raises(TimeoutError):
        while sent < limit:
            sock.sendall(pings)
            sent += len(pings)
    assert relay.metric("derp_packets_dropped", "write_blocked_pause") >= 1
    sock.close()


def test_the_relay_rate_limits_clients_by_default(start_relay) -> None:  # type: ignore[no-untyped-def]
    key = PrivateKey.generate()
    relay = start_relay(key)
    sock, _conn, _info, connected = handshake(relay.port, key)
    assert connected.info.get("TokenBucketBytesPerSecond") == 12_500_000
    # The burst in force (one second's worth), never 0: Tailscale's client limits its own sends
    # with these two numbers, and a burst of 0 made it send nothing at all.
    assert connected.info.get("TokenBucketBytesBurst") == 12_500_000
    sock.close()


@pytest.mark.parametrize("sent", [b"GET /derp HTTP/1.1\r\nHost: relay\r\n", b"", UPGRADE])
def test_a_client_too_slow_to_upgrade_or_shake_hands_is_disconnected(start_relay, sent: bytes) -> None:  # type: ignore[no-untyped-def]
    relay = start_relay(extra=("--handshake-timeout", "1"))
    with socket.create_connection(("127.0.0.1", relay.port), timeout=20) as sock:
        sock.sendall(sent)  # a head that never ends, nothing at all, or an upgrade with no ClientInfo
        started = time.monotonic()
        while sock.recv(4096):
            pass
        assert time.monotonic() - started < 15
    assert relay.metric("derp_connections_closed", "handshake_timeout") == 1
