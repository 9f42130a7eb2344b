"""A minimal RFC 3489-style STUN Binding responder the lab runs on its internet gateway, for miniupnpd.

miniupnpd refuses port forwarding when its WAN address is in a reserved range (the lab's
198.18.0.0/16 is one), unless it learns its public address by STUN (``ext_perform_stun``).
Its check sends four Binding requests, with the four combinations of the CHANGE-REQUEST flags
(RFC 3489: answer from the other address and/or port), and counts the NAT as unrestricted only when
all four answers arrive and report the socket's own address and port. So this responder listens on
two addresses times two ports and honours CHANGE-REQUEST: a router directly on the lab internet
passes, one behind a filtering (carrier) NAT correctly does not. Answers carry MAPPED-ADDRESS and,
for RFC 5389+ requests, XOR-MAPPED-ADDRESS.

It is lab plumbing, not the project's STUN server (that is ``wiremesh.stun``). Run with
``python -m wiremesh.lab.stunecho --fds A,B,C,D`` on four bound UDP sockets, in the order
(ip1, port1), (ip1, port2), (ip2, port1), (ip2, port2).
"""

from __future__ import annotations

import argparse
import logging
import select
import socket
import struct
import sys

log = logging.getLogger(__name__)

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
ATTR_MAPPED_ADDRESS = 0x0001
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_CHANGE_REQUEST = 0x0003
CHANGE_IP = 0x4
CHANGE_PORT = 0x2
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


def change_request(request: bytes) -> tuple[bool, bool]:
    """(change IP, change port) asked for by a well-formed request's CHANGE-REQUEST attribute."""
    pos = HEADER.size
    while pos + 4 <= len(request):
        kind, length = struct.unpack_from("!HH", request, pos)
        if kind == ATTR_CHANGE_REQUEST and length == 4 and pos + 8 <= len(request):
            (flags,) = struct.unpack_from("!I", request, pos + 4)
            return bool(flags & CHANGE_IP), bool(flags & CHANGE_PORT)
        pos += 4 + length + (-length % 4)
    return False, False


def serve(socks: list[socket.socket]) -> None:
    """Answer on ``socks`` = [(ip1, p1), (ip1, p2), (ip2, p1), (ip2, p2)] (or just one socket)."""
    while True:
        ready, _, _ = select.select(socks, [], [])
        for sock in ready:
            data, source = sock.recvfrom(2048)
            response = binding_response(data, (source[0], source[1]))
            if response is None:
                log.debug("dropped %d bytes from %s", len(data), source)
                continue
            index = socks.index(sock)
            if len(socks) == 4:
                change_ip, change_port = change_request(data)
                index ^= (2 if change_ip else 0) | (1 if change_port else 0)
            socks[index].sendto(response, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fds", help="inherited, bound UDP sockets: one, or four (see the module doc)")
    parser.add_argument("--port", type=int, default=3478, help="bind 0.0.0.0:PORT when --fds is not given")
    args = parser.parse_args(argv)
    if args.fds:
        socks = [socket.socket(fileno=int(fd)) for fd in args.fds.split(",")]
        if len(socks) not in (1, 4):
            parser.error("--fds takes one or four descriptors")
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", args.port))
        socks = [sock]
    try:
        serve(socks)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
