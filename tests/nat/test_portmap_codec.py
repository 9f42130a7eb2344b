"""PCP and NAT-PMP, sans-I/O: requests as the RFCs lay them out, answers parsed or refused."""

from __future__ import annotations

import ipaddress
import struct

from wiremesh.core import portmap

NONCE = bytes(range(12))


def pcp_answer(result: int = 0, nonce: bytes = NONCE, port: int = 41641, ip: str = "203.0.113.7") -> bytes:
    header = struct.pack("!BBBBII12x", 2, 0x80 | 1, 0, result, 7200, 1)
    mapped = ipaddress.IPv6Address(f"::ffff:{ip}").packed
    return header + nonce + struct.pack("!B3xHH", 17, 41641, port) + mapped


def test_a_pcp_map_request_is_60_bytes_for_udp_with_an_ipv4_mapped_client() -> None:
    request = portmap.pcp_map_request("192.168.1.10", 41641, 7200, NONCE)
    assert len(request) == 60 and request[:2] == b"\x02\x01"
    assert request[8:24] == ipaddress.IPv6Address("::ffff:192.168.1.10").packed
    assert request[24:36] == NONCE and request[36] == 17
    assert struct.unpack_from("!HH", request, 40) == (41641, 41641)


def test_a_pcp_answer_gives_the_public_address_and_port() -> None:
    assert portmap.parse_pcp_map_response(pcp_answer(), NONCE) == ("203.0.113.7", 41641)


def test_a_pcp_answer_for_another_nonce_or_with_an_error_is_refused() -> None:
    assert portmap.parse_pcp_map_response(pcp_answer(nonce=bytes(12)), NONCE) is None
    assert portmap.parse_pcp_map_response(pcp_answer(result=2), NONCE) is None
    assert portmap.parse_pcp_map_response(pcp_answer()[:40], NONCE) is None


def test_natpmp_requests_and_answers() -> None:
    assert portmap.natpmp_address_request() == b"\x00\x00"
    assert portmap.natpmp_map_request(41641, 7200) == struct.pack("!BBHHHI", 0, 1, 0, 41641, 41641, 7200)
    address = struct.pack("!BBHI", 0, 128, 0, 1) + ipaddress.IPv4Address("198.51.100.4").packed
    assert portmap.parse_natpmp_address(address) == "198.51.100.4"
    mapped = struct.pack("!BBHIHHI", 0, 129, 0, 1, 41641, 50000, 7200)
    assert portmap.parse_natpmp_map(mapped, 41641) == 50000
    assert portmap.parse_natpmp_map(mapped, 41642) is None  # someone else's mapping
    assert portmap.parse_natpmp_map(mapped[:10], 41641) is None
