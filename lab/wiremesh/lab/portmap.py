"""miniupnpd (NAT-PMP, PCP, UPnP IGD) inside a lab router namespace.

Debian's miniupnpd (nftables backend) adds its DNAT and accept rules to chains it is told about;
``upnp_ruleset`` creates them in a table of their own (``inet wmupnp``) hooked next to the lab's
NAT table. miniupnpd will not forward ports while its WAN address is reserved (198.18.0.0/15 is),
so it is pointed at the lab's STUN responder (``wiremesh.lab.stunecho``) on the internet gateway:
when STUN says the WAN address is reachable as-is, miniupnpd uses it as the public address.
Behind a carrier NAT the same check (correctly) finds a restrictive NAT and mappings are refused.
"""

from __future__ import annotations

import secrets
import socket
import struct
import uuid

UPNP_TABLE = "wmupnp"
NATPMP_PORT = 5351
STUN_PORT = 3478
STUN_ALT_PORT = 3479


def upnp_ruleset() -> str:
    """The chains miniupnpd fills in, each hooked by a base chain that jumps to it."""
    return (
        "\n".join(
            [
                f"table inet {UPNP_TABLE} {{",
                "  chain forward {",
                "    type filter hook forward priority 1; policy accept;",
                "    jump miniupnpd",
                "  }",
                "  chain miniupnpd {",
                "  }",
                "  chain prerouting {",
                "    type nat hook prerouting priority dstnat; policy accept;",
                "    jump prerouting_miniupnpd",
                "  }",
                "  chain prerouting_miniupnpd {",
                "  }",
                "  chain postrouting {",
                "    type nat hook postrouting priority srcnat - 1; policy accept;",
                "    jump postrouting_miniupnpd",
                "  }",
                "  chain postrouting_miniupnpd {",
                "  }",
                "}",
            ]
        )
        + "\n"
    )


def miniupnpd_config(
    *, wan: str, lan: str, lan_subnet: str, stun_host: str, lease_file: str, stun_port: int = STUN_PORT
) -> str:
    """miniupnpd.conf for a lab router: NAT-PMP/PCP and UPnP on the LAN, own-address mappings only."""
    return "\n".join(
        [
            f"ext_ifname={wan}",
            f"listening_ip={lan}",
            "http_port=0",
            "enable_natpmp=yes",
            "enable_upnp=yes",
            "secure_mode=yes",
            "system_uptime=yes",
            "ext_perform_stun=yes",
            f"ext_stun_host={stun_host}",
            f"ext_stun_port={stun_port}",
            f"upnp_table_name={UPNP_TABLE}",
            f"upnp_nat_table_name={UPNP_TABLE}",
            "upnp_forward_chain=miniupnpd",
            "upnp_nat_chain=prerouting_miniupnpd",
            "upnp_nat_postrouting_chain=postrouting_miniupnpd",
            f"lease_file={lease_file}",
            f"uuid={uuid.uuid4()}",
            f"serial={secrets.token_hex(4)}",
            "min_lifetime=120",
            "max_lifetime=86400",
            f"allow 1024-65535 {lan_subnet} 1024-65535",
            "deny 0-65535 0.0.0.0/0 0-65535",
            "",
        ]
    )


def natpmp_public_address(sock: socket.socket, gateway: str, timeout: float) -> tuple[int, str] | None:
    """One NAT-PMP external-address request (RFC 6886 opcode 0): (result code, address) or None."""
    sock.settimeout(timeout)
    sock.sendto(struct.pack("!BB", 0, 0), (gateway, NATPMP_PORT))
    try:
        data, _ = sock.recvfrom(64)
    except TimeoutError:
        return None
    if len(data) < 12 or data[0] != 0 or data[1] != 128:
        return None
    (result,) = struct.unpack_from("!H", data, 2)
    return result, socket.inet_ntoa(data[8:12])
