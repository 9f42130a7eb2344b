"""Faults and fallbacks on real lab NATs and relays: UDP blocked, relayed-to-direct under a TCP
transfer, a dropped direct path, NAT rebinding, and the home relay going away.

One lab for the module (agents start once); each test undoes its fault before it ends.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator

import pytest
from natlab import NatWorld, wait_for

from wiremesh.lab import Lab, NatKind

pytestmark = [pytest.mark.netns]


@pytest.fixture(scope="module")
def world() -> Iterator[NatWorld]:
    with Lab() as lab:
        w = NatWorld(lab)
        w.agent("a", lab.device("a", NatKind.EIM_APDF))
        w.agent("b", lab.device("b", NatKind.EIM_APDF))
        w.agent("c", lab.device("c", NatKind.EIM_ADF))
        w.agent("d", lab.device("d", NatKind.EIM_APDF))
        w.agent("u", lab.device("u", NatKind.UDP_BLOCKED))
        w.start()
        yield w


def reply_gaps(output: str) -> list[float]:
    """Seconds between consecutive echo replies in `ping -D` output."""
    stamps = [float(m) for m in re.findall(r"^\[(\d+\.\d+)\].*bytes from", output, re.M)]
    return [b - a for a, b in itertools.pairwise(stamps)]


def test_udp_blocked_node_talks_over_the_relay_on_tcp(world):
    a, u = world.agents["a"], world.agents["u"]
    assert world.ping_until(u, a, timeout=20)
    assert world.ping(a, u)
    assert world.path(u, a) == "relay"
    netcheck = world.api(u, "POST", "netcheck")
    assert netcheck["udp"] is False
    assert netcheck["preferred_region"] is not None  # chosen by TCP latency to the relays


def test_relayed_pair_moves_to_direct_without_breaking_a_tcp_transfer(world):
    lab = world.lab
    c, d = world.agents["c"], world.agents["d"]
    block = lab.drop_between(c.host.behind, d.host.public_address)
    server = lab.popen(d.host, ["iperf3", "-s", "-1", "-B", d.mesh_ip, "-p", "5299"])
    try:
        assert world.ping_until(c, d, timeout=20)
        assert world.path(c, d) == "relay"
        client = lab.popen(
            c.host,
            [
                "iperf3",
                "-c",
                d.mesh_ip,
                "-p",
                "5299",
                "-t",
                "14",
                "-b",
                "20M",
                "-J",
                "--connect-timeout",
                "5000",
            ],
            stdout=-1,
            text=True,
        )
        time.sleep(3)  # the transfer is running over the relay
        assert world.path(c, d) == "relay"
        lab.remove_rule(block)
        block = None
        assert wait_for(lambda: world.path(c, d) == "direct", 11.0), world.peer(c, d)
        out, _ = client.communicate(timeout=40)
        report = json.loads(out)
        assert client.returncode == 0, report.get("error")
        assert "error" not in report
        assert report["end"]["sum_received"]["bytes"] > 0
    finally:
        if block is not None:
            lab.remove_rule(block)
        lab.stop(server)


def test_dropped_direct_path_falls_back_to_the_relay_within_three_seconds_and_returns(world):
    lab = world.lab
    a, b = world.agents["a"], world.agents["b"]
    assert world.ping_until(a, b, timeout=20)
    assert world.wait_direct(a, b, timeout=20)
    pinger = lab.popen(
        a.host, ["ping", "-n", "-D", "-i", "0.1", "-W", "1", "-w", "9", b.mesh_ip], stdout=-1, text=True
    )
    time.sleep(2)
    block = lab.drop_between(a.host.behind, b.host.public_address)
    try:
        assert wait_for(lambda: world.path(a, b) == "relay", 3.5)
        out, _ = pinger.communicate(timeout=20)
        gaps = reply_gaps(out)
        assert gaps, out
        assert max(gaps) <= 3.0, f"longest silence {max(gaps):.2f} s"
    finally:
        lab.remove_rule(block)
    assert wait_for(lambda: world.ping(a, b, timeout=1) and world.path(a, b) == "direct", 25.0), world.peer(
        a, b
    )


def test_direct_path_comes_back_after_nat_rebinding(world):
    lab = world.lab
    a, b = world.agents["a"], world.agents["b"]
    assert world.ping_until(a, b, timeout=20)
    assert world.wait_direct(a, b, timeout=20)
    lab.flush_conntrack(a.host.behind)
    lab.flush_conntrack(b.host.behind)
    assert world.ping_until(a, b, timeout=10)
    assert wait_for(lambda: world.ping(a, b, timeout=1) and world.wait_direct(a, b, timeout=0.5), 45.0)


def test_losing_the_direct_path_to_a_rebinding_finds_the_new_public_port_at_once(world):
    """The NAT moves a's mapping to another public port: a learns it when the direct path is
    lost (not at the next periodic netcheck, 20 s later), and direct comes back in seconds."""
    lab = world.lab
    a, b = world.agents["a"], world.agents["b"]
    assert world.ping_until(a, b, timeout=20)
    assert world.wait_direct(a, b, timeout=20)
    before = world.status(a)["magicsock"]["netcheck"]["public_address"]
    pinger = lab.popen(a.host, ["ping", "-n", "-q", "-i", "0.2", "-w", "30", b.mesh_ip])
    handle = lab.rebind(a.host.behind)
    try:
        assert wait_for(lambda: world.path(a, b) == "relay", 10.0)
        lost = time.monotonic()

        def direct_again() -> bool:
            return world.path(a, b) == "direct" and world.path(b, a) == "direct"

        # A generous bound for a loaded machine; without re-discovery it takes up to 20 s more.
        assert wait_for(direct_again, 9.0, interval=0.2), (world.peer(a, b), time.monotonic() - lost)
        after = world.status(a)["magicsock"]["netcheck"]["public_address"]
        assert after != before and 20000 <= int(after.rsplit(":", 1)[1]) <= 29999
    finally:
        lab.stop(pinger)
        lab.remove_rule(handle)
        lab.flush_conntrack(a.host.behind)


def test_agents_move_to_the_other_region_when_the_home_relay_stops(world):
    a, b, u = world.agents["a"], world.agents["b"], world.agents["u"]
    homes = {name: world.status(world.agents[name])["magicsock"]["home_region"] for name in ("a", "b", "u")}
    gone = homes["u"]
    other = 2 if gone == 1 else 1
    world.stop_relay(gone)
    try:
        for agent in (a, b, u):
            moved = wait_for(
                lambda agent=agent: world.status(agent)["magicsock"]["home_region"] == other, 15.0
            )
            assert moved, (agent.name, gone)
        # u has no UDP: it reaches a only through the remaining relay.
        assert world.ping_until(u, a, timeout=20)
    finally:
        world.start_relay(gone)
