"""NAT behaviours as nftables rulesets (pure text generation, no I/O).

Every NAT router gets one table, ``ip wmlab``, in its own namespace. The chains:

- ``input``: new connections arriving on the WAN side never reach the router itself. Without this
  a peer's early hole-punching packet creates a local conntrack entry on the router and the LAN
  host's outbound mapping is then moved to another port (see LAB.md).
- ``forward``: from the WAN only established/related traffic and explicitly DNAT-ed traffic
  (port mappings, address-dependent filtering) is forwarded inwards.
- ``faults``: an empty chain hooked before ``forward``; fault injection (drop rules) lands here
  so it never disturbs the NAT's own rules.
- ``postrouting``: the source NAT itself (masquerade, optionally with random ports).
- EIM_ADF only: ``adf_learn`` remembers (mapped port, remote address) -> (inside address, port)
  for every outbound UDP packet, and ``prerouting`` DNATs an inbound UDP packet whose
  (destination port, source address) is in that map to the inside host, so any port of an
  address the inside host has sent to gets through, while other addresses do not.

Every drop rule the lab adds (NAT filtering, UDP blocking, fault injection) also counts into the
table's named counter ``drops``, so tests can wait for a drop to happen. With IPv6 enabled a second
table, ``ip6 wmlab``, holds the router's stateful IPv6 firewall (no NAT66).
"""

from __future__ import annotations

import enum

TABLE = "wmlab"
FAULTS_CHAIN = "faults"
FORWARD_CHAIN = "forward"
ADF_MAP = "adf"
EIM_MAP = "eim"  # hairpinning: mapped port -> inside address and port
DROPS_COUNTER = "drops"  # every packet the NAT itself drops (not fault injection), per family
# How long an address-dependent filter entry lives after the last outbound packet. Matches
# the kernel's UDP conntrack timeout for a flow that has seen replies (nf_conntrack_udp_timeout_stream).
ADF_TIMEOUT_S = 120


class NatKind(enum.Enum):
    """How a router maps and filters, in RFC 4787 terms."""

    NONE = "none"  # a public address, no router in front
    EIM_APDF = "eim-apdf"  # endpoint-independent mapping, address-and-port-dependent filtering
    EIM_ADF = "eim-adf"  # endpoint-independent mapping, address-dependent filtering
    EDM = "edm"  # endpoint-dependent mapping ("symmetric"): a new port per destination
    UDP_BLOCKED = "udp-blocked"  # EIM_APDF for TCP, no UDP leaves at all
    PORTMAP = "portmap"  # EIM_APDF plus miniupnpd offering NAT-PMP, PCP and UPnP IGD to the LAN

    @property
    def is_router(self) -> bool:
        return self is not NatKind.NONE


HAIRPIN_KINDS = frozenset({NatKind.EIM_APDF, NatKind.EIM_ADF, NatKind.PORTMAP})


def router_ruleset(kind: NatKind, wan: str, lan: str, hairpin: tuple[str, str] | None = None) -> str:
    """The nftables ruleset (for ``nft -f``) that makes a namespace a NAT router of ``kind``.

    ``wan`` and ``lan`` are the interface names on the outside and inside. ``hairpin`` =
    (WAN address, LAN subnet) adds UDP hairpinning (RFC 4787 REQ-9): a LAN host sending to the
    public mapping of another LAN host reaches it, seen from its own public mapping.
    """
    if not kind.is_router:
        raise ValueError(f"{kind} has no router")
    if hairpin is not None and kind not in HAIRPIN_KINDS:
        raise ValueError(f"hairpinning needs an endpoint-independent mapping, not {kind}")
    masquerade = "masquerade fully-random" if kind is NatKind.EDM else "masquerade"
    forward_rules = []
    if kind is NatKind.UDP_BLOCKED:
        forward_rules.append(f'oifname "{wan}" meta l4proto udp counter name {DROPS_COUNTER} drop')
    forward_rules += [
        f'iifname "{wan}" ct state established,related accept',
        f'iifname "{wan}" ct status dnat accept',
        f'iifname "{wan}" counter name {DROPS_COUNTER} drop',
    ]
    lines = [
        f"table ip {TABLE} {{",
        f"  counter {DROPS_COUNTER} {{",
        "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        f'    iifname "{wan}" ct state new counter name {DROPS_COUNTER} drop',
        "  }",
        f"  chain {FAULTS_CHAIN} {{",
        "    type filter hook forward priority -10; policy accept;",
        "  }",
        f"  chain {FORWARD_CHAIN} {{",
        "    type filter hook forward priority 0; policy accept;",
        *(f"    {rule}" for rule in forward_rules),
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f'    oifname "{wan}" {masquerade}',
        "  }",
    ]
    if kind is NatKind.EIM_ADF:
        lines += [
            f"  map {ADF_MAP} {{",
            "    type inet_service . ipv4_addr : ipv4_addr . inet_service",
            "    flags dynamic,timeout",
            f"    timeout {ADF_TIMEOUT_S}s",
            "  }",
            "  chain adf_learn {",
            # After srcnat, so the conntrack reply tuple already holds the mapped port.
            "    type filter hook postrouting priority srcnat + 10; policy accept;",
            f'    oifname "{wan}" meta l4proto udp update @{ADF_MAP} '
            "{ ct reply proto-dst . ip daddr : ct original ip saddr . ct original proto-src }",
            "  }",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f'    iifname "{wan}" meta l4proto udp dnat ip to udp dport . ip saddr map @{ADF_MAP}',
            "  }",
        ]
    if hairpin is not None:
        wan_address, lan_subnet = hairpin
        lines += [
            f"  map {EIM_MAP} {{",
            "    type inet_service : ipv4_addr . inet_service",
            "    flags dynamic,timeout",
            f"    timeout {ADF_TIMEOUT_S}s",
            "  }",
            "  chain eim_learn {",
            "    type filter hook postrouting priority srcnat + 10; policy accept;",
            f'    oifname "{wan}" meta l4proto udp update @{EIM_MAP} '
            "{ ct reply proto-dst : ct original ip saddr . ct original proto-src }",
            "  }",
            "  chain hairpin_in {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f'    iifname "{lan}" ip daddr {wan_address} meta l4proto udp dnat ip to udp dport map @{EIM_MAP}',
            "  }",
            "  chain hairpin_out {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f'    oifname "{lan}" ct status dnat ip saddr {lan_subnet} snat ip to {wan_address}',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def host_ruleset() -> str:
    """A table with empty fault chains (and the drops counter) for a public host."""
    lines = [
        f"table ip {TABLE} {{",
        f"  counter {DROPS_COUNTER} {{",
        "  }",
        f"  chain {FAULTS_CHAIN}_in {{",
        "    type filter hook input priority -10; policy accept;",
        "  }",
        f"  chain {FAULTS_CHAIN}_out {{",
        "    type filter hook output priority -10; policy accept;",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def router_ruleset6(kind: NatKind, wan: str) -> str:
    """The IPv6 side of a router (``table ip6 wmlab``): no NAT, a stateful firewall.

    IPv6 LAN hosts have public addresses, so every kind maps endpoint-independently (no
    translation) and filters like a home router: only replies and related traffic come in.
    UDP_BLOCKED drops UDP here too. Neighbour discovery is untracked by conntrack and passes.
    """
    if not kind.is_router:
        raise ValueError(f"{kind} has no router")
    drop = f"counter name {DROPS_COUNTER} drop"
    forward_rules = []
    if kind is NatKind.UDP_BLOCKED:
        forward_rules.append(f'oifname "{wan}" meta l4proto udp {drop}')
    forward_rules += [
        f'iifname "{wan}" ct state established,related accept',
        f'iifname "{wan}" meta l4proto ipv6-icmp icmpv6 type echo-request {drop}',
        f'iifname "{wan}" meta l4proto ipv6-icmp accept',
        f'iifname "{wan}" {drop}',
    ]
    lines = [
        f"table ip6 {TABLE} {{",
        f"  counter {DROPS_COUNTER} {{",
        "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
        f'    iifname "{wan}" meta l4proto {{ tcp, udp }} ct state new {drop}',
        "  }",
        f"  chain {FAULTS_CHAIN} {{",
        "    type filter hook forward priority -10; policy accept;",
        "  }",
        f"  chain {FORWARD_CHAIN} {{",
        "    type filter hook forward priority 0; policy accept;",
        *(f"    {rule}" for rule in forward_rules),
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def host_ruleset6() -> str:
    """The IPv6 twin of ``host_ruleset``: empty fault chains on a public host."""
    return host_ruleset().replace(f"table ip {TABLE}", f"table ip6 {TABLE}", 1)
