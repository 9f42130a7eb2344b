"""wiremeshd --workers 1 (a receive worker process) interoperates with Debian's wireguard-go.

The lab starts wiremeshd with the environment of this process, and wiremeshd takes its --workers
default from $WIREMESH_WORKERS, so each test sets it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from wiremesh.lab import Lab
from wiremesh.lab.demo import (
    WIREGUARD_GO,
    WIREMESH,
    TunnelSide,
    iperf3,
    metric_sum,
    ping,
    scrape,
    static_tunnel,
)

pytestmark = pytest.mark.netns

METRICS_PORT = 9586


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    monkeypatch.setenv("WIREMESH_WORKERS", "1")
    with Lab() as the_lab:
        yield the_lab


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def worker_pid(side: TunnelSide) -> int:
    assert side.proc is not None
    kids = children(side.proc.pid)
    assert len(kids) == 1, f"expected one receive worker, found {kids}"
    with open(f"/proc/{kids[0]}/cmdline", "rb") as f:
        assert b"wiremesh.agent.rxworker" in f.read()
    return kids[0]


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return not alive(pid)


@pytest.mark.parametrize("initiator", ["a", "b"], ids=["wiremesh_initiates", "wireguard_go_initiates"])
def test_handshake_and_ping_both_ways_with_a_receive_worker(lab: Lab, initiator: str) -> None:
    ours, theirs = static_tunnel(
        lab,
        WIREMESH,
        lab.host("a"),
        WIREGUARD_GO,
        lab.host("b"),
        initiator=initiator,
        metrics_ports=(METRICS_PORT, None),
    )
    worker_pid(ours)
    first, second = (ours, theirs) if initiator == "a" else (theirs, ours)
    assert ping(lab, first.host, second.tunnel_ip, count=3).received >= 2, ours.log_text()[-3000:]
    assert ping(lab, second.host, first.tunnel_ip, count=3).received >= 2
    metrics = scrape(lab, ours)
    assert metric_sum(metrics, "wiremesh_peer_handshakes_completed_total") >= 1
    assert metric_sum(metrics, "wiremesh_peer_rx_packets_total") >= 5


def test_iperf3_both_directions_with_a_receive_worker_and_metrics_count_it(lab: Lab) -> None:
    ours, theirs = static_tunnel(
        lab,
        WIREMESH,
        lab.host("a"),
        WIREGUARD_GO,
        lab.host("b"),
        initiator="a",
        metrics_ports=(METRICS_PORT, None),
    )
    assert ping(lab, ours.host, theirs.tunnel_ip, count=2).ok
    before = scrape(lab, ours)
    up = iperf3(lab, ours.host, theirs.host, theirs.tunnel_ip, seconds=5)
    down = iperf3(lab, ours.host, theirs.host, theirs.tunnel_ip, seconds=5, reverse=True)
    assert up.bytes > 1_000_000 and down.bytes > 1_000_000
    after = scrape(lab, ours)

    def grew(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert grew("wiremesh_peer_tx_bytes_total") >= up.bytes
    # Decrypted in the worker, counted in the main process's Device through the worker's stats.
    assert grew("wiremesh_peer_rx_bytes_total") >= down.bytes
    assert grew("wiremesh_io_total", op="udp_receives") > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_orphan_worker_after_the_daemon_is_signalled(lab: Lab, sig: signal.Signals) -> None:
    ours, theirs = static_tunnel(lab, WIREMESH, lab.host("a"), WIREGUARD_GO, lab.host("b"), initiator="a")
    assert ping(lab, ours.host, theirs.tunnel_ip, count=2).ok
    pid = worker_pid(ours)
    assert ours.proc is not None
    os.kill(ours.proc.pid, sig)
    ours.proc.wait(timeout=15)
    # SIGTERM: the engine stops its worker; SIGKILL: the worker sees its control pair close.
    assert wait_gone(pid), f"receive worker {pid} outlived wiremeshd"


def test_workers_0_keeps_everything_in_one_process_and_interoperates(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WIREMESH_WORKERS", "0")
    ours, theirs = static_tunnel(
        lab,
        WIREMESH,
        lab.host("a"),
        WIREGUARD_GO,
        lab.host("b"),
        initiator="b",
        metrics_ports=(METRICS_PORT, None),
    )
    assert ours.proc is not None and children(ours.proc.pid) == []
    assert ping(lab, theirs.host, ours.tunnel_ip, count=3).received >= 2, ours.log_text()[-3000:]
    down = iperf3(lab, ours.host, theirs.host, theirs.tunnel_ip, seconds=3, reverse=True)
    assert down.bytes > 1_000_000
    assert metric_sum(scrape(lab, ours), "wiremesh_peer_rx_bytes_total") >= down.bytes
