"""The Grafana dashboard's queries against the real services' /metrics: coord, keys, a DERP relay
and a STUN server run on loopback (with NATS), and every coord/keys/derp/stun metric the dashboard
names must be a family one of them serves. (The agent's are checked against a live wiremeshd in
tests/nat/test_nat_metrics.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures_services import free_port, stop_process
from prometheus_client.parser import text_string_to_metric_families

from wiremesh.lab.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "wiremesh" / "files" / "grafana-dashboard.json"
SERVICE_PREFIXES = ("wiremesh_coord_", "wiremesh_keys_", "derp_", "stun_")


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode())
    except (urllib.error.URLError, OSError):
        return None


@pytest.fixture(scope="module")
def relay_admin_urls(control_plane, tmp_path_factory) -> Iterator[list[str]]:
    """wiremesh-derp (on the control plane's NATS) and wiremesh-stun; their admin base URLs."""
    tmp = tmp_path_factory.mktemp("relays")
    derp_admin, stun_admin = free_port(), free_port()
    derp = ["-m", "wiremesh.derp.server", "--listen", f"127.0.0.1:{free_port()}", "--region", "r1"]
    derp += ["--admin-listen", f"127.0.0.1:{derp_admin}", *control_plane.nats.args("derp")]
    derp += ["--key-file", str(tmp / "derp.key"), "--log-level", "warning"]
    stun = ["-m", "wiremesh.stun.server", "--listen", f"127.0.0.1:{free_port()}"]
    stun += ["--admin-listen", f"127.0.0.1:{stun_admin}", "--log-level", "warning"]
    argvs = [derp, stun]
    procs = []
    try:
        for argv in argvs:
            with open(tmp / f"{argv[1]}.log", "ab") as log:
                procs.append(subprocess.Popen([sys.executable, *argv], stdout=log, stderr=log))
        urls = [f"http://127.0.0.1:{derp_admin}", f"http://127.0.0.1:{stun_admin}"]
        for url in urls:
            wait_until(lambda url=url: _get(f"{url}/healthz") is not None, 30, f"{url}/healthz")
        yield urls
    finally:
        for proc in procs:
            stop_process(proc)


def _families(url: str) -> set[str]:
    text = _get(f"{url}/metrics")
    assert text is not None, url
    return {family.name for family in text_string_to_metric_families(text)}


def test_every_service_metric_the_dashboard_queries_is_served(control_plane, relay_admin_urls):
    served: set[str] = set()
    for url in (control_plane.coord.url, control_plane.keys.url, *relay_admin_urls):
        served |= _families(url)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    wanted = {
        re.sub(r"_(total|bucket|sum|count)$", "", name)
        for name in re.findall(r"\b(?:wiremesh|derp|stun)_[a-z0-9_]+", queries)
        if name.startswith(SERVICE_PREFIXES)
    }
    assert len(wanted) >= 10
    assert wanted <= served, sorted(wanted - served)
