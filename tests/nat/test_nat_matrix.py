"""The NAT matrix: every pair of NAT kinds, each pair reaches the other and goes direct exactly
when it should (birthday probing included), all agents in one lab, pairs probed concurrently.

Prints the matrix: direct / relayed and the time from the first packet to a direct path.
"""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from natlab import Agent, NatWorld, wait_for

from wiremesh.lab import Lab, NatKind

pytestmark = [pytest.mark.netns, pytest.mark.slow]

KINDS = ["none", "eim-apdf", "eim-adf", "edm", "udp-blocked", "portmap", "double"]
DIRECT_TIMEOUT = 50.0


def expected_direct(x: str, y: str) -> bool:
    if "udp-blocked" in (x, y):
        return False
    return not (x == "edm" and y == "edm")


def make_host(lab: Lab, name: str, kind: str):
    if kind == "none":
        return lab.host(name)
    if kind == "double":
        carrier = lab.nat_router(f"{name}-cg", NatKind.EIM_APDF, cgnat=True)
        home = lab.nat_router(f"{name}-home", NatKind.EIM_APDF, behind=carrier)
        return lab.host(name, behind=home)
    return lab.device(name, NatKind(kind))


def probe_pair(world: NatWorld, a: Agent, b: Agent, result: dict) -> None:
    started = time.monotonic()
    result["reach"] = world.ping_until(a, b, timeout=30) and world.ping_until(b, a, timeout=10)
    result["reach_s"] = time.monotonic() - started
    deadline = started + DIRECT_TIMEOUT

    def direct() -> bool:
        world.ping(a, b, timeout=1)  # keep traffic flowing: discovery runs while the peer is active
        return world.path(a, b) == "direct" and world.path(b, a) == "direct"

    result["direct"] = wait_for(direct, max(deadline - time.monotonic(), 0.0), interval=0.3)
    result["direct_s"] = time.monotonic() - started if result["direct"] else None
    result["via"] = world.peer(a, b).get("direct")


def test_every_nat_pair_reaches_each_other_and_goes_direct_when_it_should():
    with Lab() as lab:
        world = NatWorld(lab)
        agents: dict[str, Agent] = {}
        for kind in KINDS:
            short = kind.replace("eim-", "").replace("udp-blocked", "udpb")
            agents[kind] = world.agent(f"{short}1", make_host(lab, f"{short}1", kind))
            agents[kind + "#2"] = world.agent(f"{short}2", make_host(lab, f"{short}2", kind))
        shared = lab.nat_router("shared", NatKind.EIM_APDF)
        agents["lan-a"] = world.agent("lan1", lab.host("lan1", behind=shared))
        agents["lan-b"] = world.agent("lan2", lab.host("lan2", behind=shared))
        world.start()

        pairs = [(x, y) for x, y in itertools.combinations(KINDS, 2)]
        pairs += [(k, k + "#2") for k in KINDS]
        pairs.append(("lan-a", "lan-b"))
        results: dict[tuple[str, str], dict] = {p: {} for p in pairs}
        threads = [
            threading.Thread(target=probe_pair, args=(world, agents[x], agents[y], results[(x, y)]))
            for x, y in pairs
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DIRECT_TIMEOUT + 60)

        failures = []
        lines = [f"{'pair':<32} {'reach':<6} {'path':<8} {'to direct':<10} via"]
        for (x, y), r in results.items():
            kx, ky = x.split("#")[0], y.split("#")[0]
            want = True if x == "lan-a" else expected_direct(kx, ky)
            path = "direct" if r.get("direct") else "relayed"
            took = f"{r['direct_s']:.1f} s" if r.get("direct_s") is not None else "-"
            lines.append(
                f"{x + ' <-> ' + y:<32} {'yes' if r.get('reach') else 'NO':<6} {path:<8} {took:<10} {r.get('via') or ''}"
            )
            if not r.get("reach"):
                failures.append(f"{x}<->{y} unreachable")
            if bool(r.get("direct")) != want:
                failures.append(f"{x}<->{y} {path}, expected {'direct' if want else 'relayed'}")
            if (x, y) == ("edm", "portmap") and "probe socket" in str(r.get("via")):
                # The NAT-PMP mapping, not birthday probing, must be what lets the EDM side in.
                failures.append(f"edm<->portmap needed birthday probing: {r.get('via')}")
            if x == "lan-a" and r.get("via") and not str(r["via"]).startswith("192.168."):
                failures.append(f"same-NAT pair went direct over {r['via']}, not the LAN")
        print("\nNAT matrix (agents started at once, pairs probed concurrently)\n" + "\n".join(lines))
        if failures:
            for name in ("edm1", "apdf1"):
                print(f"--- log {name}\n" + world.log(world.agents[name])[-4000:])
        assert not failures, failures
