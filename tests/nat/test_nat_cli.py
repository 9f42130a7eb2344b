"""`wiremesh netcheck` and `wiremesh ping PEER` against running agents in the NAT lab."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from natlab import NatWorld, wait_for

from wiremesh.agent.cli.net import best_reply, format_netcheck, format_reply
from wiremesh.lab import Lab, NatKind

pytestmark = [pytest.mark.netns]


@pytest.fixture(scope="module")
def world() -> Iterator[NatWorld]:
    with Lab() as lab:
        w = NatWorld(lab)
        w.agent("e", lab.device("e", NatKind.EDM))
        w.agent("p", lab.device("p", NatKind.PORTMAP))
        w.start()
        yield w


def wiremesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from wiremesh.agent.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_netcheck_reports_udp_public_address_and_relay_latency(world):
    p = world.agents["p"]
    out = wiremesh("netcheck", "--socket", p.socket_path, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["udp"] is True
    assert report["public_address"].startswith(p.host.public_address + ":")
    assert set(report["region_latency_ms"]) == {"1", "2"}
    assert report["preferred_region"] in (1, 2)


def test_netcheck_sees_that_a_symmetric_nat_maps_per_destination(world):
    out = wiremesh("netcheck", "--socket", world.agents["e"].socket_path, "--json")
    assert json.loads(out.stdout)["mapping_varies_by_destination"] is True


def test_netcheck_finds_the_routers_port_mapping(world):
    p = world.agents["p"]
    report = json.loads(wiremesh("netcheck", "--socket", p.socket_path, "--json").stdout)
    assert report["port_mapping"] == "pcp"  # tried first; NAT-PMP is the fallback
    assert report["port_mapped_address"].startswith(p.host.public_address + ":")


def test_netcheck_prints_a_readable_report(world):
    out = wiremesh("netcheck", "--socket", world.agents["p"].socket_path)
    assert "UDP: yes" in out.stdout
    assert "Preferred relay: region" in out.stdout


def _reply_lines(stdout: str) -> list[str]:
    return [line for line in stdout.strip().splitlines() if line.startswith(("pong from", "timeout"))]


def test_ping_prints_one_line_per_round_until_a_direct_answer(world):
    e, p = world.agents["e"], world.agents["p"]
    out = wiremesh("ping", "p", "--socket", e.socket_path, "-c", "15")
    assert out.returncode == 0, out.stderr
    lines = _reply_lines(out.stdout)
    assert 1 <= len(lines) <= 15, out.stdout
    assert lines[-1].startswith(f"pong from p via {p.host.public_address}:"), out.stdout
    assert all("via relay region" in line or line.startswith("timeout") for line in lines[:-1]), out.stdout


def test_ping_round_answered_by_both_paths_prints_only_the_direct_one(world):
    e, p = world.agents["e"], world.agents["p"]
    assert world.wait_direct(e, p), (world.path(e, p), world.path(p, e))
    # With a direct path each round pings the relay too; both answer, one line is printed.
    out = wiremesh("ping", "p", "--socket", e.socket_path, "-c", "1", "--no-until-direct")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    assert lines[0].startswith(f"pong from p via {p.host.public_address}:"), out.stdout


def test_ping_json_keeps_every_reply_of_the_round(world):
    e, p = world.agents["e"], world.agents["p"]
    assert world.wait_direct(e, p)

    def both_paths_answered() -> bool:
        out = wiremesh("ping", "p", "--socket", e.socket_path, "-c", "1", "--json", "--no-until-direct")
        rounds = [json.loads(line) for line in out.stdout.splitlines()]
        assert len(rounds) == 1, out.stdout
        return {r["via"] for r in rounds[0]["replies"]} == {"direct", "relay"}

    # A round pings the relay and every direct candidate; --json shows each answer, the text
    # output only the best one.
    assert wait_for(both_paths_answered, 30.0, interval=0.0)


def test_ping_of_an_unknown_peer_is_a_clear_error(world):
    out = wiremesh("ping", "nobody", "--socket", world.agents["e"].socket_path, "-c", "1")
    assert out.returncode == 1
    assert "no such peer" in out.stderr


def test_status_shows_each_peers_current_path(world):
    e, p = world.agents["e"], world.agents["p"]
    assert world.ping_until(e, p)
    peer = world.peer(e, p)
    assert peer["path"] in ("direct", "relay")
    assert peer["relay_region"] in (1, 2)


def test_formatters_render_relay_and_direct_replies():
    assert (
        format_reply("b", {"via": "relay", "region": 2, "latency_ms": 3.2})
        == "pong from b via relay region 2 in 3.2 ms"
    )
    assert (
        format_reply("b", {"via": "direct", "address": "1.2.3.4:5", "latency_ms": 1})
        == "pong from b via 1.2.3.4:5 in 1.0 ms"
    )
    assert "Preferred relay: none" in format_netcheck({})


def test_formatter_names_the_peers_mesh_address_when_known():
    reply = {"via": "relay", "region": 1, "latency_ms": 2}
    assert format_reply("b", reply, "100.64.0.2") == "pong from b (100.64.0.2) via relay region 1 in 2.0 ms"


def test_best_reply_prefers_a_direct_answer_even_when_the_relay_was_faster():
    relay = {"via": "relay", "region": 1, "latency_ms": 0.5}
    direct = {"via": "direct", "address": "1.2.3.4:5", "latency_ms": 3.0}
    assert best_reply([relay, direct]) is direct


def test_best_reply_takes_the_fastest_of_the_same_kind():
    slow = {"via": "relay", "region": 1, "latency_ms": 9.0}
    fast = {"via": "relay", "region": 2, "latency_ms": 1.0}
    assert best_reply([slow, fast]) is fast


def test_best_reply_of_a_silent_round_is_none():
    assert best_reply([]) is None
