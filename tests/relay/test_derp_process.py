"""wiremesh-derp as a process: refuses to run open to everyone, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)


def test_relay_refuses_to_start_without_a_source_of_allowed_keys(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wiremesh.derp.server",
            "--listen",
            "127.0.0.1:0",
            "--key-file",
            str(tmp_path / "k"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "no source of allowed node keys" in result.stderr


def test_sigterm_stops_the_relay_cleanly(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wiremesh.derp.server",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--key-file",
            str(tmp_path / "k"),
            "--allow-keys-file",
            str(keys),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ready"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        assert "relay stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
