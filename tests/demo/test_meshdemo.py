"""`make demo` (wiremesh.lab.meshdemo): the whole mesh runs and its report says what happened.

The smoke test runs the demo's own entry point with the same cast, services and namespaces as
`make demo`, on a shorter schedule and without the iperf3 figure. The pure parts (who must go direct, reading a path out of a status)
are tested on their own.
"""

from __future__ import annotations

import io
import pathlib

import pytest

from wiremesh.lab import meshdemo
from wiremesh.lab.meshdemo import (
    EDM,
    EIM_APDF,
    FULL_AGENTS,
    PUBLIC,
    SAME_NAT,
    UDP_BLOCKED,
    PairResult,
    Report,
    Schedule,
    matrix_lines,
    must_go_direct,
    peer_path,
)

KEY_A = "xsLLadZHyTov3oatUoM0o01cMNEfXVB6KFk+fEhZM30="
KEY_B = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def test_pairs_with_udp_blocked_or_two_symmetric_nats_are_not_expected_direct():
    assert not must_go_direct(PUBLIC, UDP_BLOCKED)
    assert not must_go_direct(EDM, EDM)
    assert must_go_direct(EDM, EIM_APDF)
    assert must_go_direct(SAME_NAT, SAME_NAT)


def test_path_is_read_from_the_magicsock_section_of_a_status():
    status = {
        "peers": [{"node_key": KEY_A, "endpoint": "198.18.0.9:41641"}],
        "magicsock": {"peers": {KEY_A: {"path": "relay", "relay_region": 2, "direct": None}}},
    }
    assert peer_path(status, KEY_A) == ("relay", "2")


def test_path_is_read_from_a_peer_entry_that_carries_its_own_path():
    status = {"peers": [{"node_key": KEY_A, "path": "direct", "direct": "192.168.1.11:41641"}]}
    assert peer_path(status, KEY_A) == ("direct", "192.168.1.11:41641")


def test_path_falls_back_to_the_wireguard_endpoint_a_handshake_used():
    status = {
        "peers": [
            {"node_key": KEY_A, "endpoint": "198.18.0.9:41641", "last_handshake_seconds_ago": 3},
            {"node_key": KEY_B, "endpoint": "relay:1", "last_handshake_seconds_ago": 3},
        ]
    }
    assert peer_path(status, KEY_A) == ("direct", "198.18.0.9:41641")
    assert peer_path(status, KEY_B) == ("relay", "1")


def test_path_of_a_peer_never_heard_from_is_unknown():
    status = {
        "peers": [{"node_key": KEY_A, "endpoint": "198.18.0.9:41641", "last_handshake_seconds_ago": None}]
    }
    assert peer_path(status, KEY_A) == ("?", "")
    assert peer_path({}, KEY_B) == ("?", "")


def pair(a: str, b: str, reached: bool, path: str, detail: str, took: float | None, must: bool) -> PairResult:
    return PairResult(a, b, reached, path, detail, took, must)


def test_report_is_not_ok_when_any_pair_did_not_reach_each_other():
    good = pair("a", "b", True, "direct", "198.18.0.5:41641", 1.0, True)
    bad = pair("a", "c", False, "?", "", None, True)
    assert Report(("a", "b"), (good,), "/tmp/x").ok
    assert not Report(("a", "b", "c"), (good, bad), "/tmp/x").ok


def test_matrix_marks_a_pair_that_never_went_direct_and_one_that_fell_back():
    lines = matrix_lines(
        [
            pair("pub", "home", True, "direct", "198.18.0.5:41641", 2.0, True),
            pair("home", "sym", True, "relay", "region2", None, True),
            pair("sym", "cgnat", True, "relay", "region1", 4.5, True),
            pair("pub", "blocked", True, "relay", "region2", None, False),
        ]
    )
    row = {line.split(" <-> ")[0] + "-" + line.split()[2]: line for line in lines if " <-> " in line}
    assert "(expected direct)" in row["home-sym"]
    assert "(was direct)" in row["sym-cgnat"]
    assert "expected" not in row["pub-blocked"] and "was direct" not in row["pub-blocked"]
    summary = next(line for line in lines if line.startswith("summary:"))
    assert "4/4 pairs reached each other; 1 direct, 3 relayed; 2/3 pairs that can go direct did" in summary
    assert "(1 back on the relay at the end)" in summary


def test_a_birthday_probe_path_is_labelled_as_such():
    lines = matrix_lines(
        [pair("sym", "home", True, "direct", "198.18.0.5:41641 (probe socket 17)", 3.0, True)]
    )
    assert any("direct 198.18.0.5:41641 (birthday)" in line for line in lines)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_demo_reports_every_pair_reached_and_the_pairs_that_can_go_direct_did(tmp_path: pathlib.Path):
    out = io.StringIO()
    schedule = Schedule(join_timeout=40, reach_timeout=25, direct_timeout=20, iperf_seconds=0)
    report = meshdemo.run_demo(FULL_AGENTS, schedule, log_dir=tmp_path / "logs", out=out)
    text = out.getvalue()
    n = len(report.pairs)
    assert n == len(FULL_AGENTS) * (len(FULL_AGENTS) - 1) // 2
    assert report.all_reached, text + _logs(tmp_path / "logs")
    assert f"summary: {n}/{n} pairs reached each other" in text
    assert not report.missing_direct, text
    assert all(p.path == "relay" for p in report.pairs if not p.must_go_direct), text


def _logs(directory: pathlib.Path) -> str:
    parts = []
    for path in sorted(directory.glob("*.log")):
        parts.append(f"\n--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
    return "".join(parts)
