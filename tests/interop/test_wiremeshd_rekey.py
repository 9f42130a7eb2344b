"""A wiremeshd <-> wireguard-go session survives REKEY_AFTER_TIME (120 s) with steady traffic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wiremesh.lab import Lab
from wiremesh.lab.demo import WIREGUARD_GO, WIREMESH, metric_sum, ping, scrape, static_tunnel

pytestmark = pytest.mark.netns

REKEY_AFTER_TIME = 120


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ping_continues_across_rekey_with_wireguard_go(lab: Lab) -> None:
    ours, theirs = static_tunnel(
        lab, WIREMESH, lab.host("a"), WIREGUARD_GO, lab.host("b"), initiator="a", metrics_ports=(9586, None)
    )
    # 0.25 s apart for REKEY_AFTER_TIME + 15 s: the session is replaced at least once mid-stream.
    count = int((REKEY_AFTER_TIME + 15) / 0.25)
    result = ping(lab, ours.host, theirs.tunnel_ip, count=count, interval=0.25, wait=1)
    metrics = scrape(lab, ours)
    assert metric_sum(metrics, "wiremesh_peer_handshakes_completed_total") >= 2, ours.log_text()[-3000:]
    assert result.loss <= 0.02, f"{result.sent - result.received} of {result.sent} pings lost"
