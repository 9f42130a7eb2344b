"""`wiremesh policy check FILE`: exit codes and messages."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from wiremesh.agent.cli import main

RUN_CLI = "import sys; from wiremesh.agent.cli import main; sys.exit(main())"
EXAMPLE = pathlib.Path(__file__).parent / "examples" / "tailscale_docs_acls.hujson"


def write(tmp_path: pathlib.Path, text: str) -> str:
    path = tmp_path / "policy.hujson"
    path.write_text(text)
    return str(path)


def test_valid_policy_with_passing_tests_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(EXAMPLE)]) == 0
    assert "9 tests passed" in capsys.readouterr().out


def test_invalid_policy_exits_nonzero_with_file_line_col(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '{\n  "acls": [\n    {"action": "accept", "src": ["group:nope"], "dst": ["*:*"]},\n  ],\n}\n',
    )
    assert main(["policy", "check", path]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3:34: error: group 'group:nope' is not defined in groups" in err


def test_failing_test_exits_nonzero_and_names_the_test(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '{"acls": [{"action": "accept", "src": ["a@x.com"], "dst": ["b@x.com:22"]}],\n'
        ' "tests": [{"src": "a@x.com", "accept": ["b@x.com:80"]}]}\n',
    )
    assert main(["policy", "check", path]) == 1
    err = capsys.readouterr().err
    assert "tests[0] a@x.com -> b@x.com:80 (tcp, udp or icmp): expected accept, but it is denied" in err
    assert f"{path}:2:" in err
    assert "1 of 1 tests failed" in err


def test_warnings_do_not_fail_the_check(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, '{"ssh": [], "acls": []}')
    assert main(["policy", "check", path]) == 0
    assert "warning: section 'ssh'" in capsys.readouterr().err


def test_missing_file_exits_with_a_clear_error(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["policy", "check", str(tmp_path / "absent.hujson")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_command_line_entry_point_reports_exit_code(tmp_path: pathlib.Path) -> None:
    path = write(tmp_path, '{"acls": [{"action": "deny", "src": ["*"], "dst": ["*:*"]}]}')
    result = subprocess.run(
        [sys.executable, "-c", RUN_CLI, "policy", "check", path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "unsupported action 'deny'" in result.stderr
