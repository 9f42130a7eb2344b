"""PORTMAP routers: miniupnpd in the router namespace answers NAT-PMP (RFC 6886) from the LAN."""

from __future__ import annotations

import os
import re
import socket
import struct
import urllib.parse
import urllib.request

import pytest

from wiremesh.lab import Lab, NatKind
from wiremesh.lab.probe import first_arrival, recv, udp_socket

pytestmark = pytest.mark.netns

NATPMP_PORT = 5351
OP_PUBLIC_ADDRESS, OP_MAP_UDP = 0, 1


def natpmp_map_udp(sock: socket.socket, gateway: str, internal: int, external: int, lifetime: int = 600):
    """RFC 6886 section 3.3: version 0, opcode 1, reserved, internal port, suggested external port, lifetime."""
    sock.sendto(
        struct.pack("!BBHHHI", 0, OP_MAP_UDP, 0, internal, external, lifetime), (gateway, NATPMP_PORT)
    )
    data, src = recv(sock)
    version, opcode, result, _epoch, got_internal, got_external, got_lifetime = struct.unpack(
        "!BBHIHHI", data
    )
    assert (version, opcode, src) == (0, 128 + OP_MAP_UDP, (gateway, NATPMP_PORT))
    return result, got_internal, got_external, got_lifetime


def natpmp_public_address(sock: socket.socket, gateway: str):
    sock.sendto(struct.pack("!BB", 0, OP_PUBLIC_ADDRESS), (gateway, NATPMP_PORT))
    data, _ = recv(sock)
    version, opcode, result, _epoch = struct.unpack_from("!BBHI", data)
    assert (version, opcode) == (0, 128 + OP_PUBLIC_ADDRESS)
    return result, socket.inet_ntoa(data[8:12])


def test_natpmp_reports_the_router_wan_address_as_public_address(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    assert natpmp_public_address(udp_socket(lab, a), nat.lan_address) == (0, nat.wan_address)


def test_natpmp_udp_mapping_request_succeeds(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    sock = udp_socket(lab, a, 41641)
    result, internal, external, lifetime = natpmp_map_udp(sock, nat.lan_address, 41641, 41641)
    assert (result, internal) == (0, 41641)
    assert external > 0
    assert 0 < lifetime <= 600


def test_natpmp_mapped_port_forwards_unsolicited_inbound_udp(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    stranger = lab.host("stranger")
    sock = udp_socket(lab, a, 41641)
    _, _, external, _ = natpmp_map_udp(sock, nat.lan_address, 41641, 42000)
    udp_socket(lab, stranger).sendto(b"inbound", (nat.wan_address, external))
    data, src = recv(sock)
    assert (data, src[0]) == (b"inbound", stranger.address)


def test_unmapped_port_of_a_portmap_router_stays_closed(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    pub = lab.host("pub")
    sock = udp_socket(lab, a, 41641)
    _, _, external, _ = natpmp_map_udp(sock, nat.lan_address, 41641, 42000)
    outside = udp_socket(lab, pub)
    before = lab.drops(nat)
    outside.sendto(b"wrong-port", (nat.wan_address, external + 1))
    lab.wait_drops(nat, before)
    outside.sendto(b"marker", (nat.wan_address, external))
    assert first_arrival(sock) == b"marker"


def test_natpmp_refuses_a_mapping_for_another_lan_host(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    # NAT-PMP can only map the requester's own address; a second host mapping the same
    # external port must not steal a's mapping.
    b = lab.host("b", behind=nat)
    sa, sb = udp_socket(lab, a, 41641), udp_socket(lab, b, 41641)
    _, _, ext_a, _ = natpmp_map_udp(sa, nat.lan_address, 41641, 42000)
    result_b, _, ext_b, _ = natpmp_map_udp(sb, nat.lan_address, 41641, 42000)
    assert result_b != 0 or ext_b != ext_a


def pcp_map_udp(
    sock: socket.socket, gateway: str, client: str, internal: int, external: int, lifetime: int = 600
):
    """RFC 6887 MAP request (version 2, opcode 1) for UDP; returns (result, external port, external address)."""
    nonce = os.urandom(12)
    mapped_client = b"\0" * 10 + b"\xff\xff" + socket.inet_aton(client)
    header = struct.pack("!BBHI16s", 2, 1, 0, lifetime, mapped_client)
    body = struct.pack("!12sB3xHH16s", nonce, 17, internal, external, b"\0" * 10 + b"\xff\xff" + b"\0" * 4)
    sock.sendto(header + body, (gateway, NATPMP_PORT))
    data, _ = recv(sock)
    version, opcode, result, _lifetime, _epoch = struct.unpack_from("!BBxBII", data)
    got_nonce, protocol, got_internal, got_external, ext_addr = struct.unpack_from("!12sB3xHH16s", data, 24)
    assert (version, opcode, got_nonce, protocol, got_internal) == (2, 0x81, nonce, 17, internal)
    return result, got_external, socket.inet_ntoa(ext_addr[12:])


def test_pcp_map_request_opens_a_port_on_the_public_address(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    stranger = lab.host("stranger")
    sock = udp_socket(lab, a, 41641)
    result, external, address = pcp_map_udp(sock, nat.lan_address, a.address, 41641, 43000)
    assert (result, address) == (0, nat.wan_address)
    udp_socket(lab, stranger).sendto(b"inbound", (address, external))
    assert recv(sock)[0] == b"inbound"


SSDP_SEARCH = (
    b'M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: "ssdp:discover"\r\nMX: 1\r\n'
    b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
)
ADD_PORT_MAPPING = """<?xml version="1.0"?>
<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"
 s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>
<u:AddPortMapping xmlns:u="{service}">
<NewRemoteHost></NewRemoteHost><NewExternalPort>{external}</NewExternalPort><NewProtocol>UDP</NewProtocol>
<NewInternalPort>{internal}</NewInternalPort><NewInternalClient>{client}</NewInternalClient>
<NewEnabled>1</NewEnabled><NewPortMappingDescription>lab</NewPortMappingDescription>
<NewLeaseDuration>600</NewLeaseDuration></u:AddPortMapping></s:Body></s:Envelope>"""


def igd_location(lab: Lab, host) -> str:
    sock = udp_socket(lab, host)
    sock.sendto(SSDP_SEARCH, ("239.255.255.250", 1900))
    data, _ = recv(sock)
    headers = dict(line.split(": ", 1) for line in data.decode().split("\r\n")[1:] if ": " in line)
    return headers["LOCATION"]


def test_upnp_igd_answers_ssdp_search_from_the_lan(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    assert igd_location(lab, a).startswith(f"http://{nat.lan_address}:")


def test_upnp_add_port_mapping_forwards_inbound_udp(lab: Lab) -> None:
    nat = lab.nat_router("home", NatKind.PORTMAP)
    a = lab.host("a", behind=nat)
    stranger = lab.host("stranger")
    location = igd_location(lab, a)
    description = lab.call_in(a, lambda: urllib.request.urlopen(location, timeout=5).read().decode())
    # The control URL follows the WANIPConnection serviceType (v1 or v2) in the device description.
    found = re.search(
        r"<serviceType>(urn:schemas-upnp-org:service:WANIPConnection:\d)</serviceType>.*?"
        r"<controlURL>([^<]+)</controlURL>",
        description,
        re.S,
    )
    assert found is not None
    service, url = found.group(1), urllib.parse.urljoin(location, found.group(2))
    body = ADD_PORT_MAPPING.format(service=service, external=44000, internal=41641, client=a.address)
    request = urllib.request.Request(
        url,
        data=body.encode(),
        headers={"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service}#AddPortMapping"'},
    )
    status = lab.call_in(a, lambda: urllib.request.urlopen(request, timeout=5).status)
    assert status == 200
    sock = udp_socket(lab, a, 41641)
    udp_socket(lab, stranger).sendto(b"inbound", (nat.wan_address, 44000))
    assert recv(sock)[0] == b"inbound"


@pytest.mark.slow
def test_portmap_router_behind_a_carrier_nat_refuses_mappings(lab: Lab) -> None:
    """miniupnpd's STUN check sees the carrier NAT filter, so it must not promise a mapping.

    Slow (~9 s): miniupnpd waits out three 3 s rounds for the answers the carrier filters.
    """
    carrier = lab.nat_router("carrier", NatKind.EIM_APDF, cgnat=True)
    nat = lab.nat_router("home", NatKind.PORTMAP, behind=carrier)
    a = lab.host("a", behind=nat)
    result, _, _, _ = natpmp_map_udp(udp_socket(lab, a, 41641), nat.lan_address, 41641, 42000)
    assert result != 0
