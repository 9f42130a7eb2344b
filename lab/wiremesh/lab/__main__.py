"""Lab self-checks (need root).

``python -m wiremesh.lab check``: build one device per NAT kind and print what each NAT does.
``python -m wiremesh.lab bench``: iperf3 TCP throughput through the lab's paths (public to public,
through one NAT, through a double NAT), to show the lab is not what limits a data-plane benchmark.
``python -m wiremesh.lab up``: build a public host and one device per NAT kind, print how to enter
each namespace, and keep it all until Ctrl-C / SIGTERM (for poking around by hand).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time

from wiremesh.lab import Host, Lab, NatKind, Router
from wiremesh.lab.probe import EXPECTED, classify


def check() -> int:
    started = time.monotonic()
    rows: list[tuple[str, str, str, str, str, float]] = []
    ok = True
    with Lab() as lab:
        server1, server2 = lab.host("server1"), lab.host("server2")
        built = time.monotonic()
        for kind in NatKind:
            t0 = time.monotonic()
            host = lab.device(kind.value, kind)
            setup = time.monotonic() - t0
            behaviour = classify(lab, host, server1, server2)
            good = (behaviour.mapping, behaviour.filtering) == EXPECTED[kind]
            ok &= good
            public = f"{behaviour.public[0]}:{behaviour.public[1]}" if behaviour.public else "-"
            rows.append(
                (
                    kind.value,
                    "yes" if behaviour.udp else "no",
                    behaviour.mapping,
                    behaviour.filtering,
                    public,
                    setup,
                )
            )
            if not good:
                rows[-1] = (*rows[-1][:4], public + "  UNEXPECTED", setup)
        namespaces = len(lab.namespaces)
        closing = time.monotonic()
    closed = time.monotonic()
    header = ("kind", "udp", "mapping", "filtering", "public address", "setup s")
    widths = [max(len(str(r[i])) if i < 5 else 7 for r in [*rows, header]) for i in range(6)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        cells = [*map(str, row[:5]), f"{row[5]:.3f}"]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)))
    print(
        f"\n{namespaces} namespaces; internet + 2 servers {built - started:.3f} s, "
        f"whole check {closing - started:.3f} s, teardown {closed - closing:.3f} s"
    )
    return 0 if ok else 1


def _iperf3_gbits(lab: Lab, client: Host, server: Host, seconds: int) -> float:
    srv = lab.popen(
        server, ["iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while ":5201 " not in lab.run(server, ["ss", "-Hltn"]).stdout:
            if time.monotonic() > deadline:
                raise RuntimeError("iperf3 server did not start listening")
            time.sleep(0.02)
        argv = ["iperf3", "-c", server.address, "-p", "5201", "-t", str(seconds), "-J"]
        out = lab.run(client, argv, timeout=seconds + 30).stdout
        return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        lab.stop(srv)


def bench(seconds: int) -> int:
    with Lab() as lab:
        pub, pub2 = lab.host("pub"), lab.host("pub2")
        behind_nat = lab.device("a", NatKind.EIM_APDF)
        carrier = lab.nat_router("carrier", NatKind.EIM_APDF, cgnat=True)
        double = lab.host("d", behind=lab.nat_router("home", NatKind.EIM_APDF, behind=carrier))
        for label, client in [
            ("public -> public", pub2),
            ("one NAT -> public", behind_nat),
            ("double NAT -> public", double),
        ]:
            print(
                f"{label:22} {_iperf3_gbits(lab, client, pub, seconds):6.2f} Gbit/s (iperf3 TCP, {seconds} s)"
            )
    return 0


def up(ipv6: bool) -> int:
    with Lab(ipv6=ipv6) as lab:
        nodes: list[Host | Router] = [lab.host("pub")]
        for kind in NatKind:
            if kind.is_router:
                host = lab.device(kind.value, kind)
                assert host.behind is not None
                nodes += [host.behind, host]
        for node in nodes:
            if isinstance(node, Router):
                print(
                    f"router {node.name:16} {node.kind.value:12} wan {node.wan_address:15} lan {node.lan_subnet}"
                )
            else:
                print(
                    f"host   {node.name:16} {node.kind.value:12} addr {node.address:15} public {node.public_address}"
                )
            print(f"       ip netns exec {node.ns} bash")
        # The handler goes in before "ready" is printed: a Ctrl-C that arrives while the line is
        # still being written must tear the lab down too, not raise in the middle of print.
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print("ready; Ctrl-C tears it down", flush=True)
        while not stop.wait(1):
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wiremesh.lab", description="wiremesh network lab")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="build one device per NAT kind and print the measured behaviour")
    bench_parser = sub.add_parser("bench", help="iperf3 throughput through the lab's NAT paths")
    bench_parser.add_argument("--seconds", type=int, default=3)
    up_parser = sub.add_parser("up", help="build a lab and keep it until Ctrl-C")
    up_parser.add_argument("--ipv6", action="store_true")
    args = parser.parse_args(argv)
    if args.command == "up":
        return up(args.ipv6)
    if args.command == "check":
        return check()
    if args.command == "bench":
        return bench(args.seconds)
    return 2


if __name__ == "__main__":
    sys.exit(main())
