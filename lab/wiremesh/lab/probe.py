"""Tiny UDP/TCP probes for checking what a lab NAT does, using sockets that live in lab namespaces.

Negative checks ("this packet must not arrive") use a marker: send the packet that should be
dropped, then one that must arrive over the same last hop; if the first had got through, it would
have been received first. That keeps tests free of "wait and see" sleeps.
"""

from __future__ import annotations

import socket
import time

from wiremesh.lab.lab import Host, Lab

Addr = tuple[str, int]
DEFAULT_TIMEOUT_S = 3.0
MAX_DATAGRAM = 2048


def udp_socket(lab: Lab, node: Host, port: int = 0) -> socket.socket:
    """A UDP socket in ``node``'s namespace bound to 0.0.0.0:``port`` (0 = any free port)."""
    sock = lab.socket(node, socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    return sock


def recv(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bytes, Addr]:
    """The next datagram and its source; raises TimeoutError if none arrives in time."""
    sock.settimeout(timeout)
    data, addr = sock.recvfrom(MAX_DATAGRAM)
    return data, (str(addr[0]), int(addr[1]))


def observed_source(
    sender: socket.socket, receiver: socket.socket, dest: Addr, payload: bytes = b"probe"
) -> Addr:
    """Send from ``sender`` to ``dest`` (where ``receiver`` listens); return the source it saw."""
    sender.sendto(payload, dest)
    deadline = time.monotonic() + DEFAULT_TIMEOUT_S
    while True:
        data, src = recv(receiver, max(0.01, deadline - time.monotonic()))
        if data == payload:
            return src


def first_arrival(receiver: socket.socket, timeout: float = DEFAULT_TIMEOUT_S) -> bytes:
    """The payload of the first datagram to arrive at ``receiver``."""
    return recv(receiver, timeout)[0]


def tcp_connects(lab: Lab, node: Host, dest: Addr, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether a TCP connection from ``node`` to ``dest`` is accepted (refused or timed out: False)."""
    sock = lab.socket(node, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(dest)
        return True
    except OSError:
        return False
    finally:
        sock.close()
