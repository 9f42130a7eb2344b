"""A minimal STUN Binding responder the lab runs on its internet gateway, for miniupnpd.

miniupnpd refuses port forwarding when its WAN address is in a reserved range (the lab's
198.18.0.0/16 is one), unless it learns its public address by STUN (``ext_perform_stun``).
Its check sends four Binding requests carrying RFC 3489 CHANGE-REQUEST flags from four sockets
and counts the NAT as unrestricted when all four answers report the socket's own address and port.
This responder answers every Binding request from the address it was sent to, ignoring
CHANGE-REQUEST (it has one address), with MAPPED-ADDRESS and XOR-MAPPED-ADDRESS (RFC 8489).

It is lab plumbing, not the project's STUN server (that is ``wiremesh.stun``). Run with
``python -m wiremesh.lab.stunecho --fd N`` on an already bound UDP socket.
"""

from __future__ import annotations

import argparse
import logging
import socket
import struct
import sys

log = logging.getLogger(__name__)

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
HEADER = struct.Struct("!HHI12s")
MAX_REQUEST = 548  # RFC 8489: a Binding request over UDP stays well under this


def binding_response(request: bytes, source: tuple[str, int]) -> bytes | None:
    """The Binding success response for ``request`` seen from ``source``, or None to drop it."""
    if len(request) < HEADER.size or len(request) > MAX_REQUEST:
        return None
    msg_type, length, cookie, txid = HEADER.unpack_from(request)
    if msg_type != BINDING_REQUEST or length != len(request) - HEADER.size or length % 4:
        return None
    try:
        addr = socket.inet_aton(source[0])
    except OSError:
        return None
    port = source[1]
    mapped = struct.pack("!HHBBH4s", ATTR_MAPPED_ADDRESS, 8, 0, 1, port, addr)
    xaddr = bytes(a ^ b for a, b in zip(addr, struct.pack("!I", MAGIC_COOKIE), strict=True))
    xport = port ^ (MAGIC_COOKIE >> 16)
    xor_mapped = struct.pack("!HHBBH4s", ATTR_XOR_MAPPED_ADDRESS, 8, 0, 1, xport, xaddr)
    body = mapped + xor_mapped if cookie == MAGIC_COOKIE else mapped
    return HEADER.pack(BINDING_SUCCESS, len(body), cookie, txid) + body


def serve(sock: socket.socket) -> None:
    while True:
        data, source = sock.recvfrom(2048)
        response = binding_response(data, (source[0], source[1]))
        if response is None:
            log.debug("dropped %d bytes from %s", len(data), source)
            continue
        sock.sendto(response, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, help="an inherited, bound UDP socket")
    parser.add_argument("--port", type=int, default=3478, help="bind 0.0.0.0:PORT when --fd is not given")
    args = parser.parse_args(argv)
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", args.port))
    try:
        serve(sock)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
