"""The agent's init step (wiremesh.operator.agentkey) with the API server replaced by a function:
waiting for the node's Secret, giving up cleanly, and refusing malformed contents. The real
API server and RBAC are exercised in tests/charts/test_helm_install.py."""

from __future__ import annotations

import argparse
import pathlib

from wiremesh.operator import agentkey

SECRET = {"authkey": "wmauth-abc", "hostname": "worker-1", "advertise-routes": "10.244.1.0/24"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.5)


def args_for(tmp_path: pathlib.Path, wait: float = 30.0) -> argparse.Namespace:
    token = tmp_path / "token"
    token.write_text("tok\n")
    return agentkey.parse_args(
        [
            "--api-url", "https://127.0.0.1:1", "--token-file", str(token), "--namespace", "keys",
            "--secret", "meshnode-worker-1-authkey", "--default-hostname", "Worker-1.example",
            "--out", str(tmp_path / "out"), "--wait", str(wait), "--interval", "1",
        ]
    )  # fmt: skip


def read(tmp_path: pathlib.Path) -> dict[str, str]:
    return {
        n: (tmp_path / "out" / n).read_text().strip() for n in ("authkey", "hostname", "advertise-routes")
    }


def test_secret_that_appears_later_is_waited_for(tmp_path):
    answers = [None, {}, SECRET]
    clock = FakeClock()
    code = agentkey.run(args_for(tmp_path), lambda *a: answers.pop(0), clock, clock.sleep)
    assert code == 0 and not answers
    assert read(tmp_path) == SECRET


def test_secret_that_never_comes_leaves_an_empty_key_and_the_node_name(tmp_path):
    clock = FakeClock()
    code = agentkey.run(args_for(tmp_path, wait=5), lambda *a: None, clock, clock.sleep)
    assert code == 0
    assert read(tmp_path) == {"authkey": "", "hostname": "Worker-1.example", "advertise-routes": ""}


def test_refusal_by_the_api_server_fails_at_once_without_writing(tmp_path):
    def refuse(*_a: object) -> None:
        raise agentkey.FetchError("refused (403)", retry=False)

    clock = FakeClock()
    assert agentkey.run(args_for(tmp_path), refuse, clock, clock.sleep) == 1
    assert clock.now == 0.0 and not (tmp_path / "out").exists()


def test_unreachable_api_server_is_retried_until_the_deadline_then_fails(tmp_path):
    calls = []

    def down(*_a: object) -> None:
        calls.append(1)
        raise agentkey.FetchError("unreachable", retry=True)

    clock = FakeClock()
    assert agentkey.run(args_for(tmp_path, wait=5), down, clock, clock.sleep) == 1
    assert len(calls) > 1


def test_malformed_fields_in_the_secret_are_dropped():
    files = agentkey.agent_files(
        {"authkey": "x" * 300, "hostname": "Bad Name!", "advertise-routes": "10.0.0.0/8; rm -rf /"}, "node-a"
    )
    assert files == {"authkey": "", "hostname": "node-a", "advertise-routes": ""}


def test_key_file_is_readable_by_its_owner_only(tmp_path):
    agentkey.write_files(tmp_path, agentkey.agent_files(SECRET, "n"))
    assert (tmp_path / "authkey").stat().st_mode & 0o077 == 0
