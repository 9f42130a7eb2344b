"""magicsock's counters and per-peer paths on wiremeshd's /metrics (and `wiremesh ping`'s line
naming the peer's mesh address, which needs mesh mode's status).

Two mesh-mode agents behind NATs (coord serves the relay map, as in test_nat_mesh_mode) go
direct; agent a serves /metrics on loopback inside its namespace. The pure mapping from
`MagicSock.status()` to metric families is tested on its own below.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from natlab import NatWorld, wait_for
from prometheus_client.parser import text_string_to_metric_families

from wiremesh.agent.metrics import MagicsockCollector, magicsock_families
from wiremesh.agent.state import StateDir
from wiremesh.core import crypto
from wiremesh.lab import Lab, NatKind

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "mesh"))
from mesh_kit import VENV_BIN, Agent, RelayMapMeshLab, peer_status, pings

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


class Mesh:
    def __init__(self, m: RelayMapMeshLab, a: Agent, b: Agent) -> None:
        self.m, self.a, self.b = m, a, b
        self.b_key = str(peer_status(a, "b")["node_key"])
        self.b_ip = b.address()

    def scrape(self) -> Samples:
        return _samples(self.m.scrape(self.a))

    def eventually(self, predicate: Any, timeout: float = 30.0) -> bool:
        """Whether `predicate(samples)` comes true while a pings b (counters move with traffic:
        the peer's discovery and heartbeat pings reach us only once our NAT has opened to it)."""

        def check() -> bool:
            if predicate(self.scrape()):
                return True
            pings(self.m.lab, self.a.node, self.b_ip, timeout=2)
            return False

        return wait_for(check, timeout)


def _positive(name: str, **labels: str) -> Any:
    return lambda samples: (_value(samples, name, **labels) or 0) > 0


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with Lab() as lab:
        world = NatWorld(lab)
        derp_map = Path(lab.tmpdir) / "derp-map.json"
        derp_map.write_text(json.dumps(world.derp_map()))
        m = RelayMapMeshLab(lab, str(derp_map))
        try:
            hosts = {"a": lab.device("a", NatKind.EIM_APDF), "b": lab.device("b", NatKind.EIM_ADF)}
            for name in hosts:
                keys = StateDir(m.dir / f"state-{name}").load_or_create_keys()
                world.extra_keys.append(crypto.public_key(keys.node))
            for rid in world.regions:
                world.start_relay(rid)
            m.start_services()
            key = m.auth_key("--reusable")
            a = m.agent("a", hosts["a"], key, wait=False, metrics=True)
            b = m.agent("b", hosts["b"], key, wait=False)
            m.wait_running(a)
            m.wait_running(b)
            assert pings(lab, a.node, b.address(), timeout=30), a.log_text()[-3000:]
            mesh = Mesh(m, a, b)
            # magicsock's own view (the Engine's endpoint text also shows a raw address the
            # Device roamed to before any Pong proved it).
            direct = mesh.eventually(
                lambda s: _value(s, "wiremesh_magicsock_peer_path", peer=mesh.b_key, path="direct") == 1.0,
                45.0,
            )
            assert direct, (peer_status(a, "b"), a.log_text()[-3000:])
            yield mesh
        except BaseException:
            sys.stderr.write(m.logs()[-20000:])
            raise


# ---------------------------------------------------------------------- against running agents

DISCO = "wiremesh_magicsock_disco_messages_total"


@pytest.mark.netns
def test_metrics_count_disco_pings_sent(mesh):
    assert mesh.eventually(_positive(DISCO, direction="sent", type="ping"))


@pytest.mark.netns
def test_metrics_count_disco_pongs_received(mesh):
    assert mesh.eventually(_positive(DISCO, direction="received", type="pong"))


@pytest.mark.netns
def test_metrics_count_the_peers_pings_and_our_pongs(mesh):
    assert mesh.eventually(
        lambda s: (
            _positive(DISCO, direction="received", type="ping")(s)
            and _positive(DISCO, direction="sent", type="pong")(s)
        )
    )


@pytest.mark.netns
def test_metrics_count_the_switch_to_a_direct_path(mesh):
    assert mesh.eventually(_positive("wiremesh_magicsock_path_switches_total", to="direct"))


@pytest.mark.netns
def test_metrics_export_call_me_maybe_in_both_directions(mesh):
    # Whether a CallMeMaybe was needed depends on who pinged first (a peer's ping can open the
    # path before our first discovery round knows a relay), so only the series are required.
    samples = mesh.scrape()
    for direction in ("sent", "received"):
        assert _value(samples, DISCO, direction=direction, type="call_me_maybe") is not None


@pytest.mark.netns
def test_metrics_count_discovery_rounds(mesh):
    assert mesh.eventually(_positive("wiremesh_magicsock_discovery_rounds_total"))


@pytest.mark.netns
def test_metrics_count_relay_connections(mesh):
    samples = mesh.scrape()
    assert (_value(samples, "wiremesh_magicsock_relay_connects_total") or 0) >= 1
    assert (_value(samples, "wiremesh_magicsock_relays_connected") or 0) >= 1


@pytest.mark.netns
def test_metrics_show_the_home_region(mesh):
    assert _value(mesh.scrape(), "wiremesh_magicsock_home_region") in (1.0, 2.0)


@pytest.mark.netns
def test_peer_path_gauge_marks_direct_and_not_relay_for_the_peer(mesh):
    def direct(samples: Samples) -> bool:
        path = "wiremesh_magicsock_peer_path"
        return (
            _value(samples, path, peer=mesh.b_key, path="direct") == 1.0
            and _value(samples, path, peer=mesh.b_key, path="relay") == 0.0
        )

    assert mesh.eventually(direct)


@pytest.mark.netns
def test_peer_path_labels_carry_no_addresses(mesh):
    samples = mesh.scrape()
    peers = {dict(labels)["peer"] for (name, labels) in samples if name == "wiremesh_magicsock_peer_path"}
    assert peers == {mesh.b_key}


@pytest.mark.netns
def test_ping_names_the_peers_mesh_address_on_its_one_line_per_round(mesh):
    argv = [str(VENV_BIN / "wiremesh"), "ping", "b", "--socket", mesh.a.socket_path, "-c", "1"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    lines = out.stdout.strip().splitlines()
    assert lines and lines[0].startswith(f"pong from b ({mesh.b_ip}) via "), out.stdout + out.stderr


@pytest.mark.netns
def test_every_agent_metric_the_grafana_dashboard_queries_is_served(mesh):
    dashboard = json.loads((ROOT / "charts" / "wiremesh" / "files" / "grafana-dashboard.json").read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    wanted = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for name in re.findall(r"\bwiremesh_[a-z0-9_]+", queries)
        if not name.startswith(("wiremesh_coord_", "wiremesh_keys_"))
    }
    served = {family.name for family in text_string_to_metric_families(mesh.m.scrape(mesh.a))}
    assert wanted and wanted <= served, sorted(wanted - served)


# ---------------------------------------------------------------------- the pure mapping


STATUS = {
    "home_region": 2,
    "relays_connected": [1, 2],
    "peers": {
        "KEY-B": {"path": "direct", "latency_ms": 1.5},
        "KEY-C": {"path": "relay", "latency_ms": None},
    },
    "drops": {"disco_unknown_sender": 3},
    "counters": {"ping_sent": 7, "pong_received": 5, "path_direct": 2, "path_lost": 1, "brand_new": 4},
    "probe_sockets": 0,
}


def _families_samples(status: dict[str, Any]) -> Samples:
    out: Samples = {}
    for family in magicsock_families(status):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def test_families_map_counters_to_labelled_series():
    samples = _families_samples(STATUS)
    name = "wiremesh_magicsock_disco_messages_total"
    assert _value(samples, name, direction="sent", type="ping") == 7
    assert _value(samples, name, direction="sent", type="pong") == 0
    assert _value(samples, "wiremesh_magicsock_path_switches_total", to="relay") == 1


def test_families_keep_an_unknown_counter_under_its_own_name():
    samples = _families_samples(STATUS)
    assert _value(samples, "wiremesh_magicsock_events_total", event="brand_new") == 4


def test_families_mark_exactly_one_path_per_peer():
    samples = _families_samples(STATUS)
    marked = {
        (dict(labels)["peer"], dict(labels)["path"])
        for (name, labels), value in samples.items()
        if name == "wiremesh_magicsock_peer_path" and value == 1.0
    }
    assert marked == {("KEY-B", "direct"), ("KEY-C", "relay")}


def test_families_give_latency_only_for_direct_peers():
    samples = _families_samples(STATUS)
    latency = {
        dict(labels)["peer"]: value
        for (name, labels), value in samples.items()
        if name == "wiremesh_magicsock_peer_direct_latency_seconds"
    }
    assert latency == {"KEY-B": 0.0015}


def test_families_of_an_idle_magicsock_have_no_home_region_sample():
    samples = _families_samples({})
    assert not [key for key in samples if key[0] == "wiremesh_magicsock_home_region"]
    assert _value(samples, "wiremesh_magicsock_relays_connected") == 0


class _ResizedOnce:
    """Stands in for a MagicSock whose status() hits a dict another thread is resizing (a race
    a real one cannot be made to lose on demand)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def status(self) -> dict[str, Any]:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("dictionary changed size during iteration")
        return STATUS


def test_collector_retries_a_status_read_that_raced_the_magicsock_thread():
    names = {family.name for family in MagicsockCollector(_ResizedOnce(1)).collect()}
    assert "wiremesh_magicsock_peer_path" in names


def test_collector_skips_its_families_rather_than_failing_the_scrape():
    assert list(MagicsockCollector(_ResizedOnce(10)).collect()) == []
