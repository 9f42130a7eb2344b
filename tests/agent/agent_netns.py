"""Test helpers: a throwaway network namespace and running code inside it from a thread."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unique(prefix: str) -> str:
    """A name unique enough for namespaces and interfaces shared with other engineers' tests."""
    return f"{prefix}{secrets.token_hex(3)}"


@contextlib.contextmanager
def namespace(prefix: str = "wmt") -> Iterator[str]:
    name = unique(prefix)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """Run fn on a thread that joined namespace ns (setns is per thread); threads it starts stay there."""
    out: list[T] = []
    err: list[BaseException] = []

    def target() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
        finally:
            os.close(fd)
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


def send_tcp_stream(
    client_ns: str, server_ns: str, server_ip: str, data: bytes, timeout: float = 20
) -> bytes:
    """Send `data` over one TCP connection from client_ns to a listener on server_ip in server_ns;
    return what the listener received (compare it with `data`)."""
    server = call_in(server_ns, lambda: socket.create_server((server_ip, 0)))
    port = server.getsockname()[1]
    received = bytearray()

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(timeout)
            while chunk := conn.recv(1 << 16):
                received.extend(chunk)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        client = call_in(client_ns, lambda: socket.create_connection((server_ip, port), timeout=timeout))
        with client:
            client.sendall(data)
    finally:
        thread.join(timeout + 10)
        server.close()
    return bytes(received)


def ping(ns: str, addr: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    """ping from inside namespace `ns`; the completed process (returncode 0 when replies came)."""
    return subprocess.run(
        ["ip", "netns", "exec", ns, "ping", "-c", str(count), "-i", "0.2", "-W", "2", addr],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
