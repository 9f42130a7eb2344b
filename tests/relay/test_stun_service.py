"""wiremesh-stun as a real UDP service: a third-party client behind a NAT in the lab,
IPv6, bad datagrams, metrics and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from wiremesh.core import stun
from wiremesh.lab import Lab, NatKind
from wiremesh.stun.server import StunService, build_parser

pytestmark = pytest.mark.timeout(90)


def start_stun_in(lab: Lab, node, *listen: str) -> subprocess.Popen[str]:  # type: ignore[no-untyped-def]
    argv = [sys.executable, "-m", "wiremesh.stun.server", "--admin-listen", "127.0.0.1:0"]
    for address in listen:
        argv += ["--listen", address]
    proc = lab.popen(node, argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready = json.loads(proc.stdout.readline())
    assert ready["ready"]
    return proc


@pytest.fixture
def nat_lab() -> Iterator[Lab]:
    with Lab(ipv6=True) as lab:
        yield lab


@pytest.mark.netns
def test_debian_stun_client_behind_nat_learns_the_nat_wan_address(nat_lab: Lab) -> None:
    nat = nat_lab.nat_router("n", kind=NatKind.EIM_APDF)
    inside = nat_lab.host("h", behind=nat)
    pub = nat_lab.host("pub")
    start_stun_in(nat_lab, pub, f"{pub.address}:3478")
    # Test 1 of Debian's stun client (stun-client 0.97): one Binding request, print the answer.
    result = nat_lab.run(inside, ["stun", pub.address, "1", "-v"], check=False, timeout=30)
    output = result.stdout + result.stderr  # -v details go to stderr
    match = re.search(r"MappedAddress = ([0-9.]+):(\d+)", output)
    assert match, output
    assert match.group(1) == nat.wan_address
    assert match.group(1) != inside.address
    assert "ok=1" in output


@pytest.mark.netns
def test_ipv6_binding_request_is_answered_with_the_sender_ipv6_address(nat_lab: Lab) -> None:
    pub, other = nat_lab.host("pub"), nat_lab.host("other")
    assert pub.address6 and other.address6
    start_stun_in(nat_lab, pub, f"{pub.address}:3478", f"[{pub.address6}]:3478")
    sock = nat_lab.socket(other, socket.AF_INET6)
    sock.bind((other.address6, 0))
    sock.settimeout(5)
    request = stun.binding_request()
    sock.sendto(bytes(request), (pub.address6, 3478))
    reply = stun.parse_message(sock.recv(2048))
    assert reply.transaction_id == request.transaction_id
    assert reply.get(stun.AttributeType.XOR_MAPPED_ADDRESS) == (other.address6, sock.getsockname()[1])


async def test_malformed_datagrams_are_counted_and_dropped_and_service_keeps_answering() -> None:
    args = build_parser().parse_args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
    service = StunService(args)
    await service.start()
    try:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        target = ("127.0.0.1", service.ports[0])
        for garbage in (b"", b"\xff" * 40, b"\x00\x01\x00\x08" + stun.MAGIC_COOKIE_BYTES + bytes(12)):
            await loop.sock_sendto(sock, garbage, target)
        request = stun.binding_request()
        await loop.sock_sendto(sock, bytes(request), target)
        reply = stun.parse_message(await asyncio.wait_for(loop.sock_recv(sock, 2048), 5))
        assert reply.get(stun.AttributeType.XOR_MAPPED_ADDRESS) == sock.getsockname()
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{service.admin_port}/metrics")).text
        assert 'stun_dropped_total{reason="malformed"} 3.0' in text
        assert 'stun_binding_requests_total{family="ipv4"} 1.0' in text
        sock.close()
    finally:
        await service.stop()


def test_sigterm_stops_the_stun_server_cleanly() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wiremesh.stun.server",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ready"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
