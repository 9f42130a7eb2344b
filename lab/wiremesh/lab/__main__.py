"""``python -m wiremesh.lab check``: build one device per NAT kind and print what each NAT does.

A self-check of the lab on this machine (needs root), and a quick way to see the zoo.
"""

from __future__ import annotations

import argparse
import sys
import time

from wiremesh.lab import Lab, NatKind
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wiremesh.lab", description="wiremesh network lab")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="build one device per NAT kind and print the measured behaviour")
    args = parser.parse_args(argv)
    if args.command == "check":
        return check()
    return 2


if __name__ == "__main__":
    sys.exit(main())
