"""wiremeshd interoperates with Debian's wireguard-go (a stock WireGuard peer), over real namespaces.

Who initiates is forced by configuration: only the initiator is given the other's Endpoint, so the
responder can only answer (and learns the initiator's address from its authenticated packets).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from wiremesh.lab import Lab, NatKind
from wiremesh.lab.demo import WIREGUARD_GO, WIREMESH, iperf3, metric_sum, ping, scrape, static_tunnel

pytestmark = pytest.mark.netns


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as the_lab:
        yield the_lab


METRICS_PORT = 9586


def build(lab: Lab, topology: str, wiremesh_side: str, initiator: str, psk: bool):
    """Return (wiremesh side, wireguard-go side). topology 'direct' or 'nat' (side a behind NAT)."""
    if topology == "nat":
        nat = lab.nat_router("nat", kind=NatKind.EIM_APDF)
        host_a = lab.host("a", behind=nat)
    else:
        host_a = lab.host("a")
    host_b = lab.host("b")
    kinds = (WIREMESH, WIREGUARD_GO) if wiremesh_side == "a" else (WIREGUARD_GO, WIREMESH)
    ports = (METRICS_PORT, None) if wiremesh_side == "a" else (None, METRICS_PORT)
    a, b = static_tunnel(
        lab, kinds[0], host_a, kinds[1], host_b, initiator=initiator, psk=psk, metrics_ports=ports
    )
    return (a, b) if wiremesh_side == "a" else (b, a)


# (topology, which side runs wiremesh, who initiates, preshared key). Behind NAT only side a can
# initiate (b cannot reach a's private address), so the NAT rows put each implementation there.
MATRIX = [
    ("direct", "a", "a", False),
    ("direct", "a", "b", True),
    ("direct", "a", "a", True),
    ("direct", "a", "b", False),
    ("nat", "a", "a", True),
    ("nat", "b", "a", False),
]


@pytest.mark.parametrize(
    ("topology", "wiremesh_side", "initiator", "psk"),
    MATRIX,
    ids=[f"{t}-wiremesh_{w}-init_{i}-{'psk' if p else 'nopsk'}" for t, w, i, p in MATRIX],
)
def test_handshake_and_ping_both_ways(
    lab: Lab, topology: str, wiremesh_side: str, initiator: str, psk: bool
) -> None:
    ours, theirs = build(lab, topology, wiremesh_side, initiator, psk)
    first, second = (ours, theirs) if wiremesh_side == initiator else (theirs, ours)
    # The initiator's first packet triggers the handshake; then both directions must work.
    assert ping(lab, first.host, second.tunnel_ip, count=3).received >= 2, ours.log_text()
    assert ping(lab, second.host, first.tunnel_ip, count=3).received >= 2
    metrics = scrape(lab, ours)
    assert metric_sum(metrics, "wiremesh_peer_handshakes_completed_total") >= 1
    assert metric_sum(metrics, "wiremesh_peer_rx_packets_total") >= 5


@pytest.mark.parametrize("topology", ["direct", "nat"])
def test_iperf3_tcp_both_directions(lab: Lab, topology: str) -> None:
    ours, theirs = build(lab, topology, "a", "a", psk=topology == "nat")
    assert ping(lab, ours.host, theirs.tunnel_ip, count=2).ok
    before = scrape(lab, ours)
    up = iperf3(lab, ours.host, theirs.host, theirs.tunnel_ip, seconds=10)
    down = iperf3(lab, ours.host, theirs.host, theirs.tunnel_ip, seconds=10, reverse=True)
    after = scrape(lab, ours)
    assert up.bytes > 1_000_000 and down.bytes > 1_000_000
    grew_tx = metric_sum(after, "wiremesh_peer_tx_bytes_total") - metric_sum(
        before, "wiremesh_peer_tx_bytes_total"
    )
    grew_rx = metric_sum(after, "wiremesh_peer_rx_bytes_total") - metric_sum(
        before, "wiremesh_peer_rx_bytes_total"
    )
    assert grew_tx >= up.bytes
    assert grew_rx >= down.bytes


@pytest.mark.parametrize("initiator", ["a", "b"], ids=["wiremesh_initiates", "wireguard_go_initiates"])
def test_ipv6_endpoints_and_ipv6_inside_the_tunnel(initiator: str) -> None:
    with Lab(ipv6=True) as lab6:
        ours, theirs = static_tunnel(
            lab6,
            WIREMESH,
            lab6.host("a"),
            WIREGUARD_GO,
            lab6.host("b"),
            initiator=initiator,
            ipv6=True,
            metrics_ports=(METRICS_PORT, None),
        )
        first, second = (ours, theirs) if initiator == "a" else (theirs, ours)
        assert second.tunnel_ip6 is not None and first.tunnel_ip6 is not None
        assert ping(lab6, first.host, second.tunnel_ip6, count=3).received >= 2, ours.log_text()
        assert ping(lab6, second.host, first.tunnel_ip, count=3).received >= 2
        assert ping(lab6, second.host, first.tunnel_ip6, count=3).received >= 2
        status = scrape(lab6, ours)
        assert metric_sum(status, "wiremesh_peer_handshakes_completed_total") >= 1
