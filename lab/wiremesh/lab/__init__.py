"""Network lab: an "internet", NAT routers and hosts in network namespaces on one machine.

Used by the tests, ``make demo`` and the benchmarks. Needs root. Everything a ``Lab`` creates
(namespaces, links, nftables rules, processes, sockets, temp files) is removed when the ``with``
block exits, even after an error; an atexit hook and a SIGTERM handler are the safety net.

    from wiremesh.lab import Lab, NatKind

    with Lab() as lab:
        inet = lab.internet()                      # public segment: bridge in namespace <prefix>inet
        pub = lab.host("pub")                      # public host, pub.address in 198.18.0.0/16
        nat = lab.nat_router("home", kind=NatKind.EIM_APDF)   # WAN on the internet, LAN 192.168.n.0/24
        a = lab.host("a", behind=nat)              # a.address = 192.168.n.10, default via nat.lan_address
        b = lab.host("b", behind=nat)              # a second device behind the same NAT
        cg = lab.nat_router("carrier", kind=NatKind.EIM_APDF, cgnat=True)   # LAN 100.127.n.0/24
        home2 = lab.nat_router("home2", kind=NatKind.EIM_ADF, behind=cg)    # double NAT
        c = lab.device("c", NatKind.EDM)           # shortcut: router "c-nat" plus host "c" behind it

        lab.run(a, ["ping", "-c1", pub.address])   # CompletedProcess (text); raises LabError if check
        p = lab.popen(a, ["iperf3", "-s"])         # Popen; its process group is killed at exit
        s = lab.socket(a)                          # a UDP socket living in a's namespace (in-process)
        a.ns                                       # namespace name, for `ip netns exec` yourself
        lab.exec_prefix(a)                         # ["ip", "netns", "exec", a.ns]

        lab.call_in(a, fn)                         # run fn on a thread inside a's namespace
        lab.tmpdir                                 # private temp dir, removed at exit

        lab.flush_conntrack(nat)                   # forget NAT mappings (rebinding)
        lab.set_udp_timeouts(nat, unreplied=2, replied=5)   # mappings expire fast
        lab.conntrack_entries(nat)                 # `conntrack -L -p udp` lines
        n = lab.drops(nat)                         # packets dropped by lab rules so far (counter)
        lab.wait_drops(nat, n)                     # wait for "it was dropped", no sleeping
        h = lab.block_udp(nat)                     # drop all UDP through the router ...
        lab.remove_rule(h)                         # ... and undo it (or lab.unblock_udp(nat))
        h = lab.drop_between(nat, pub.address)     # drop everything between nat's LAN and an address
        lab.remove_rule(h)                         # (on a public host: drop_between(pub, addr))

    from wiremesh.lab.probe import classify, udp_socket, observed_source
    classify(lab, a, server1, server2)             # measured mapping/filtering (netcheck ground truth)

    python -m wiremesh.lab check                   # one device per kind, prints what each NAT does
    python -m wiremesh.lab up [--ipv6]             # build the zoo, print `ip netns exec` lines, wait
    python -m wiremesh.lab bench                   # iperf3 through the lab's NAT paths

Names: every namespace is ``<prefix><name>``, the prefix random per lab (``wm3f9a-``), so many labs
can run at once. Interfaces are created directly inside lab namespaces (never in the root one) and
carry fixed short names there: ``eth0`` on hosts, ``wan0`` and bridge ``lan0`` on routers, bridge
``br0`` in the internet namespace.

Addresses: the internet is 198.18.0.0/16 (gateway 198.18.0.1, RFC 2544 benchmark range); a LAN
behind a router is 192.168.n.0/24 (router .1, hosts from .10); a carrier NAT's inside is
100.127.n.0/24. The root namespace never gets a lab address or route, and ``run``/``popen``/
``socket`` refuse namespaces this lab did not create or that are gone.

NAT kinds (see ``wiremesh.lab.nat`` for the exact nftables rules): NONE (public host),
EIM_APDF, EIM_ADF, EDM (symmetric), UDP_BLOCKED, PORTMAP (EIM_APDF plus miniupnpd answering
NAT-PMP, PCP and UPnP IGD on the LAN; ``lab.miniupnpd_log(router)`` shows its log). Every router
drops new inbound connections on its WAN side before they reach the router itself (LAB.md).
Routers do not hairpin unless built with ``nat_router(..., hairpin=True)`` (EIM kinds, UDP only):
then a LAN host reaches a neighbour at its public mapping and is seen from its own.
No latency or loss emulation: this kernel has no netem qdisc (tbf/htb rate limits do exist).
The internet namespace also holds 198.18.0.1 and 198.18.0.2, where the lab's own STUN responder
(for miniupnpd, ports 3478 and 3479) answers once a PORTMAP router exists.

IPv6 is opt-in: ``Lab(ipv6=True)`` gives the internet 2001:2::/64 (RFC 5180; gateway 2001:2::1)
and router n's LAN 2001:2:0:n::/64 (routed by the internet namespace), as ``host.address6``,
``router.wan_address6``/``lan_subnet6``. No NAT66: routers filter IPv6 statefully (replies only),
UDP_BLOCKED blocks IPv6 UDP too. Carrier NATs are IPv4-only, so nothing behind one gets IPv6.

Cleanup: each lab claims its prefix in /run/wiremesh-lab; a new lab removes the namespaces of labs
whose process died (SIGKILL) and never touches namespaces it cannot prove orphaned.
"""

from wiremesh.lab.lab import Host, Internet, Lab, LabError, Node, Router, RuleHandle
from wiremesh.lab.nat import NatKind

__all__ = ["Host", "Internet", "Lab", "LabError", "NatKind", "Node", "Router", "RuleHandle"]
