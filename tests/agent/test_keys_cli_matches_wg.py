"""`wiremesh genkey` / `wiremesh pubkey` behave like `wg genkey` / `wg pubkey`."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

WIREMESH = [str(Path(sys.executable).with_name("wiremesh"))]


def run(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30, check=False)


def test_pubkey_of_a_wg_generated_key_equals_wgs_answer() -> None:
    private = run(["wg", "genkey"]).stdout
    ours = run([*WIREMESH, "pubkey"], private)
    theirs = run(["wg", "pubkey"], private)
    assert ours.returncode == 0
    assert ours.stdout == theirs.stdout


def test_wg_accepts_our_genkey_output_and_agrees_on_its_pubkey() -> None:
    private = run([*WIREMESH, "genkey"]).stdout
    assert len(base64.b64decode(private.strip(), validate=True)) == 32
    theirs = run(["wg", "pubkey"], private)
    assert theirs.returncode == 0
    assert run([*WIREMESH, "pubkey"], private).stdout == theirs.stdout


def test_pubkey_rejects_bad_input_with_a_message_and_nonzero_exit() -> None:
    for bad in ["", "not base64 at all", base64.b64encode(b"short").decode()]:
        ours = run([*WIREMESH, "pubkey"], bad)
        assert run(["wg", "pubkey"], bad).returncode != 0
        assert ours.returncode != 0
        assert "key" in ours.stderr.lower()
        assert ours.stdout == ""
