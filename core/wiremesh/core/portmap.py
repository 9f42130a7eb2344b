"""Port-mapping requests to the default gateway, sans-I/O: PCP (RFC 6887 MAP) and NAT-PMP
(RFC 6886). Build the request bytes, parse the answer bytes; the agent sends and waits.

    request = pcp_map_request(client_ip, internal_port, lifetime, nonce)
    mapped = parse_pcp_map_response(answer, nonce)          # (public IP, port) or None
    natpmp_address_request(); parse_natpmp_address(answer)  # public IP or None
    natpmp_map_request(internal_port, lifetime); parse_natpmp_map(answer, internal_port)

A malformed, refused or foreign answer is None, never an exception.
"""

from __future__ import annotations

import ipaddress
import struct

PORT = 5351  # both protocols' server port on the gateway
DEFAULT_LIFETIME = 7200
PROTO_UDP = 17

PCP_VERSION = 2
PCP_OPCODE_MAP = 1
PCP_NONCE_LEN = 12
# Common request header + MAP opcode body (60 bytes): version, opcode, reserved, lifetime,
# client address (IPv4-mapped), nonce, protocol, 3 reserved, internal port, suggested external
# port, suggested external address.
_PCP_MAP = struct.Struct("!BBHI16s12sB3xHH16s")
PCP_RESPONSE_MIN = 60

NATPMP_VERSION = 0
NATPMP_OP_ADDRESS = 0
NATPMP_OP_MAP_UDP = 1
NATPMP_RESPONSE = 128  # added to the opcode in answers
_NATPMP_MAP = struct.Struct("!BBHHHI")
_NATPMP_MAP_ANSWER = struct.Struct("!HIHHI")  # result, epoch, internal, external, lifetime


def _v4_mapped(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ipaddress.IPv4Address(ip)}").packed


def pcp_map_request(client_ip: str, internal_port: int, lifetime: int, nonce: bytes) -> bytes:
    """A PCP MAP request for UDP `internal_port` of `client_ip` (our address towards the gateway)."""
    if len(nonce) != PCP_NONCE_LEN:
        raise ValueError("PCP nonce must be 12 bytes")
    return _PCP_MAP.pack(
        PCP_VERSION, PCP_OPCODE_MAP, 0, lifetime, _v4_mapped(client_ip), nonce,
        PROTO_UDP, internal_port, internal_port, bytes(16),
    )  # fmt: skip


def parse_pcp_map_response(data: bytes, nonce: bytes) -> tuple[str, int] | None:
    """(public IPv4, external port) from a successful answer to our request with `nonce`."""
    # version, R|opcode, reserved, result code, lifetime, epoch, 12 reserved, then the MAP body.
    if len(data) < PCP_RESPONSE_MIN or data[0] != PCP_VERSION or data[1] != 0x80 | PCP_OPCODE_MAP:
        return None
    if data[3] != 0 or data[24:36] != nonce:
        return None
    (external_port,) = struct.unpack_from("!H", data, 42)
    ip = ipaddress.IPv6Address(data[44:60]).ipv4_mapped
    if ip is None or external_port == 0:
        return None
    return str(ip), external_port


def natpmp_address_request() -> bytes:
    return bytes((NATPMP_VERSION, NATPMP_OP_ADDRESS))


def parse_natpmp_address(data: bytes) -> str | None:
    """The gateway's public IPv4 address from a successful external-address answer."""
    if len(data) < 12 or data[0] != NATPMP_VERSION or data[1] != NATPMP_RESPONSE + NATPMP_OP_ADDRESS:
        return None
    if struct.unpack_from("!H", data, 2)[0] != 0:
        return None
    return str(ipaddress.IPv4Address(data[8:12]))


def natpmp_map_request(internal_port: int, lifetime: int) -> bytes:
    return _NATPMP_MAP.pack(NATPMP_VERSION, NATPMP_OP_MAP_UDP, 0, internal_port, internal_port, lifetime)


def parse_natpmp_map(data: bytes, internal_port: int) -> int | None:
    """The external port of a successful UDP mapping answer for `internal_port`."""
    if len(data) < 16 or data[0] != NATPMP_VERSION or data[1] != NATPMP_RESPONSE + NATPMP_OP_MAP_UDP:
        return None
    result, _epoch, internal, external, _life = _NATPMP_MAP_ANSWER.unpack_from(data, 2)
    if result != 0 or internal != internal_port or external == 0:
        return None
    return int(external)
