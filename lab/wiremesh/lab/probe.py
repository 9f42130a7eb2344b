"""Tiny UDP/TCP probes for checking what a lab NAT does, using sockets that live in lab namespaces.

Negative checks ("this packet must not arrive") use a marker: send the packet that should be
dropped, then one that must arrive over the same last hop; if the first had got through, it would
have been received first. That keeps tests free of "wait and see" sleeps.
"""

from __future__ import annotations

import dataclasses
import socket
import time

from wiremesh.lab.lab import Host, Lab
from wiremesh.lab.nat import NatKind

Addr = tuple[str, int]
DEFAULT_TIMEOUT_S = 5.0  # generous: only reached when something is wrong (or the box is loaded)
MAX_DATAGRAM = 2048


def udp_socket(lab: Lab, node: Host, port: int = 0, family: int = socket.AF_INET) -> socket.socket:
    """A UDP socket in ``node``'s namespace bound to the wildcard address, ``port`` (0 = any)."""
    sock = lab.socket(node, family, socket.SOCK_DGRAM)
    sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    return sock


def recv(sock: socket.socket, timeout: float = DEFAULT_TIMEOUT_S) -> tuple[bytes, Addr]:
    """The next datagram and its source; raises TimeoutError if none arrives in time."""
    sock.settimeout(timeout)
    data, addr = sock.recvfrom(MAX_DATAGRAM)
    return data, (str(addr[0]), int(addr[1]))


def observed_source(
    sender: socket.socket,
    receiver: socket.socket,
    dest: Addr,
    payload: bytes = b"probe",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> Addr:
    """Send from ``sender`` to ``dest`` (where ``receiver`` listens); return the source it saw."""
    sender.sendto(payload, dest)
    deadline = time.monotonic() + timeout
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


@dataclasses.dataclass(frozen=True, slots=True)
class NatBehaviour:
    """What a host's NAT does, measured from outside (RFC 4787 terms)."""

    udp: bool  # UDP reaches the internet at all
    mapping: str  # "endpoint-independent" | "endpoint-dependent" | "none" (no translation) | "-"
    filtering: str  # "endpoint-independent" | "address-dependent" | "address-and-port-dependent" | "-"
    public: Addr | None  # the mapping the first server saw


# (mapping, filtering) that ``classify`` should measure for a host of each kind.
EXPECTED: dict[NatKind, tuple[str, str]] = {
    NatKind.NONE: ("none", "endpoint-independent"),
    NatKind.EIM_APDF: ("endpoint-independent", "address-and-port-dependent"),
    NatKind.EIM_ADF: ("endpoint-independent", "address-dependent"),
    NatKind.EDM: ("endpoint-dependent", "address-and-port-dependent"),
    NatKind.UDP_BLOCKED: ("-", "-"),
    NatKind.PORTMAP: ("endpoint-independent", "address-and-port-dependent"),
}


def classify(
    lab: Lab,
    host: Host,
    server1: Host,
    server2: Host,
    port: int = 3478,
    udp_timeout: float = DEFAULT_TIMEOUT_S,
) -> NatBehaviour:
    """Measure ``host``'s NAT with two public hosts (``server1`` listens on two ports).

    ``udp_timeout`` is how long the first probe may take before UDP counts as blocked: as long
    as any other probe, since a first packet through fresh namespaces and conntrack can take over
    a second on a busy machine (1 s made `python -m wiremesh.lab check` flaky at load ~13).
    """
    inside = udp_socket(lab, host)
    s1, s1b, s2 = (
        udp_socket(lab, server1, port),
        udp_socket(lab, server1, port + 1),
        udp_socket(lab, server2, port),
    )
    try:
        try:
            first = observed_source(inside, s1, (server1.address, port), timeout=udp_timeout)
        except TimeoutError:
            return NatBehaviour(udp=False, mapping="-", filtering="-", public=None)
        other_port = observed_source(inside, s1b, (server1.address, port + 1))
        other_host = observed_source(inside, s2, (server2.address, port))
        if first[0] == host.address and first[1] == inside.getsockname()[1]:
            mapping = "none"
        elif first == other_port == other_host:
            mapping = "endpoint-independent"
        else:
            mapping = "endpoint-dependent"
        # Filtering, towards a fresh mapping that has only talked to server1:port.
        fresh = udp_socket(lab, host)
        try:
            mapped = observed_source(fresh, s1, (server1.address, port))
            s2.sendto(b"other-address", mapped)
            s1b.sendto(b"other-port", mapped)
            s1.sendto(b"marker", mapped)
            seen = set()
            while (data := first_arrival(fresh)) != b"marker":
                seen.add(data)
        finally:
            fresh.close()
        if b"other-address" in seen:
            filtering = "endpoint-independent"
        elif b"other-port" in seen:
            filtering = "address-dependent"
        else:
            filtering = "address-and-port-dependent"
        return NatBehaviour(udp=True, mapping=mapping, filtering=filtering, public=first)
    finally:
        for sock in (inside, s1, s1b, s2):
            sock.close()
