"""The lab's NAT classifier (ground truth for netcheck) measures what each kind is documented to do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from wiremesh.lab import Lab, NatKind
from wiremesh.lab.__main__ import main
from wiremesh.lab.probe import EXPECTED, classify

pytestmark = pytest.mark.netns


@pytest.mark.parametrize("kind", list(NatKind), ids=lambda k: k.value)
def test_classify_measures_the_documented_behaviour(lab: Lab, kind: NatKind) -> None:
    server1, server2 = lab.host("server1"), lab.host("server2")
    host = lab.device("dev", kind)
    behaviour = classify(lab, host, server1, server2)
    assert (behaviour.mapping, behaviour.filtering) == EXPECTED[kind]
    assert behaviour.udp is (kind is not NatKind.UDP_BLOCKED)


def test_check_command_exits_zero_and_prints_every_kind(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert all(kind.value in out for kind in NatKind)
    assert "UNEXPECTED" not in out


def test_bench_command_reports_throughput_for_each_path(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--seconds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == [
        "public -> public",
        "one NAT -> public",
        "double NAT -> public",
    ]
    assert all("Gbit/s" in line for line in lines)


def test_up_command_builds_a_lab_and_removes_it_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "wiremesh.lab", "up"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("ready"):
                break
        namespaces = [line.split()[3] for line in lines if "ip netns exec" in line]
        assert len(namespaces) == 1 + 2 * (len(NatKind) - 1)
        assert all(os.path.exists(f"/run/netns/{ns}") for ns in namespaces)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not any(os.path.exists(f"/run/netns/{ns}") for ns in namespaces)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
