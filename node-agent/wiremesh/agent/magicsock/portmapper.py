"""Port mapping on the default gateway, the I/O half: sends the requests that
wiremesh.core.portmap builds and hands it the answers. Blocking (NATPMP_TIMEOUT per exchange at
most); the adapter runs these in an executor."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from wiremesh.agent import bypass
from wiremesh.core import portmap

NATPMP_TIMEOUT = 0.5


def default_gateway() -> str | None:
    """The IPv4 default gateway of this namespace, from /proc/net/route."""
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return str(ipaddress.IPv4Address(struct.pack("<I", int(fields[2], 16))))
    except (OSError, ValueError, StopIteration):
        return None
    return None


def pcp_map(
    gateway: str, internal_port: int, lifetime: int = portmap.DEFAULT_LIFETIME
) -> tuple[str, int] | None:
    """Ask the gateway for a UDP mapping with PCP (RFC 6887 MAP): (public IP, port) or None."""
    nonce = os.urandom(portmap.PCP_NONCE_LEN)
    with bypass.mark(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
        sock.settimeout(NATPMP_TIMEOUT)
        try:
            sock.connect((gateway, portmap.PORT))
            client_ip = sock.getsockname()[0]
            sock.send(portmap.pcp_map_request(client_ip, internal_port, lifetime, nonce))
            answer = sock.recv(1100)
        except OSError:
            return None
    return portmap.parse_pcp_map_response(answer, nonce)


def natpmp_map(
    gateway: str, internal_port: int, lifetime: int = portmap.DEFAULT_LIFETIME
) -> tuple[str, int] | None:
    """Ask the gateway for a UDP mapping to `internal_port` (RFC 6886): (public IP, port) or None."""
    with bypass.mark(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) as sock:
        sock.settimeout(NATPMP_TIMEOUT)
        try:
            sock.sendto(portmap.natpmp_address_request(), (gateway, portmap.PORT))
            public_ip = portmap.parse_natpmp_address(sock.recvfrom(64)[0])
            if public_ip is None:
                return None
            sock.sendto(portmap.natpmp_map_request(internal_port, lifetime), (gateway, portmap.PORT))
            external = portmap.parse_natpmp_map(sock.recvfrom(64)[0], internal_port)
        except OSError:
            return None
    return None if external is None else (public_ip, external)
