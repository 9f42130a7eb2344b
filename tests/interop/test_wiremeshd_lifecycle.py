"""wiremeshd as a process: it removes its interface on SIGTERM and refuses bad configuration clearly."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from wiremesh.lab import Lab
from wiremesh.lab.demo import WIREMESH, interface_up, static_tunnel
from wiremesh.lab.support import wait_until as wait_for

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


def test_sigterm_removes_the_interface_and_exits_zero(lab: Lab) -> None:
    a, _b = static_tunnel(lab, WIREMESH, lab.host("a"), WIREMESH, lab.host("b"))
    assert interface_up(lab, a.host, a.ifname)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=10) == 0
    out = lab.run(a.host, ["ip", "link", "show", "dev", a.ifname], check=False)
    assert out.returncode != 0, out.stdout
    assert "shutting_down signal=SIGTERM" in a.log_text()


def test_sigint_also_shuts_down_cleanly(lab: Lab) -> None:
    a, _b = static_tunnel(lab, WIREMESH, lab.host("a"), WIREMESH, lab.host("b"))
    assert a.proc is not None
    a.proc.send_signal(signal.SIGINT)
    assert a.proc.wait(timeout=10) == 0
    wait_for(lambda: not interface_up(lab, a.host, a.ifname), 5, "interface gone")


def test_invalid_config_exits_2_naming_the_line(lab: Lab, tmp_path) -> None:
    host = lab.host("a")
    conf = tmp_path / "bad.conf"
    conf.write_text("[Interface]\nPrivateKey = AAAA\n")
    out = lab.run(
        host,
        [sys.executable, "-m", "wiremesh.agent.daemon", "--tun", "wmbadcfg0", "--wg-config", str(conf)],
        check=False,
    )
    assert out.returncode == 2
    assert "bad.conf:2:" in out.stderr
    assert lab.run(host, ["ip", "link", "show", "dev", "wmbadcfg0"], check=False).returncode != 0


def test_missing_mode_is_a_usage_error() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "wiremesh.agent.daemon", "--tun", "wmx0"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2
    assert "--wg-config" in out.stderr
