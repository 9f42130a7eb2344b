"""A real Prometheus for the lab cluster, configured from the chart's own objects.

Prometheus is built from its Go module (`wiremesh.lab.gobuild.prometheus`): Debian's package has
no Kubernetes service discovery. promtool from Debian's package checks rule files.

The chart ships ServiceMonitors, a PodMonitor and a PrometheusRule for the Prometheus Operator,
which is not part of the lab. `scrape_configs()` turns those objects into the scrape jobs the
operator would generate from them (Kubernetes service discovery against the cluster's API server;
keep only Services / Pods whose labels match the monitor's selector and only the named port; job,
namespace, service, pod labels as the operator sets them), so what Prometheus scrapes here is
selected by exactly the chart's selectors. `rule_groups()` takes the PrometheusRule's groups as
they are. `Prometheus` runs the server in a lab namespace and answers queries.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from wiremesh.lab import gobuild
from wiremesh.lab.lab import Host, Lab

START_TIMEOUT = 60.0


def _label_name(name: str) -> str:
    """Kubernetes label -> Prometheus meta label suffix (what service discovery does)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _selector_keeps(kind: str, match_labels: dict[str, str]) -> list[dict[str, Any]]:
    out = []
    for key, value in sorted(match_labels.items()):
        name = _label_name(key)
        out.append(
            {
                "source_labels": [
                    f"__meta_kubernetes_{kind}_label_{name}",
                    f"__meta_kubernetes_{kind}_labelpresent_{name}",
                ],
                "regex": f"{re.escape(value)};true",
                "action": "keep",
            }
        )
    return out


def _sd(role: str, namespaces: list[str], api: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": role, "namespaces": {"names": namespaces}, **api}]


def scrape_configs(monitors: Iterable[dict[str, Any]], api: dict[str, Any]) -> list[dict[str, Any]]:
    """Scrape jobs for ServiceMonitor and PodMonitor objects; `api` is the service-discovery
    client configuration (api_server, tls_config, authorization)."""
    jobs = []
    for monitor in monitors:
        kind, meta, spec = monitor["kind"], monitor["metadata"], monitor["spec"]
        namespaces = spec.get("namespaceSelector", {}).get("matchNames") or [meta.get("namespace", "default")]
        match_labels = spec.get("selector", {}).get("matchLabels", {})
        if kind == "ServiceMonitor":
            endpoints, role, port_label = (
                spec["endpoints"],
                "endpoints",
                "__meta_kubernetes_endpoint_port_name",
            )
            keeps = _selector_keeps("service", match_labels)
            job = [{"source_labels": ["__meta_kubernetes_service_name"], "target_label": "job"}]
        elif kind == "PodMonitor":
            endpoints, role, port_label = (
                spec["podMetricsEndpoints"],
                "pod",
                "__meta_kubernetes_pod_container_port_name",
            )
            keeps = _selector_keeps("pod", match_labels)
            job = [{"target_label": "job", "replacement": f"{namespaces[0]}/{meta['name']}"}]
        else:
            continue
        for index, endpoint in enumerate(endpoints):
            relabel = [
                *keeps,
                {"source_labels": [port_label], "regex": re.escape(endpoint["port"]), "action": "keep"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
                *job,
                {"target_label": "endpoint", "replacement": endpoint["port"]},
            ]
            if kind == "ServiceMonitor":
                relabel.append(
                    {"source_labels": ["__meta_kubernetes_service_name"], "target_label": "service"}
                )
            scrape = {
                "job_name": f"{kind.lower()}/{namespaces[0]}/{meta['name']}/{index}",
                "kubernetes_sd_configs": _sd(role, namespaces, api),
                "metrics_path": endpoint.get("path", "/metrics"),
                "relabel_configs": relabel,
            }
            for key, field in (("interval", "scrape_interval"), ("scrapeTimeout", "scrape_timeout")):
                if key in endpoint:
                    scrape[field] = endpoint[key]
            jobs.append(scrape)
    return jobs


def rule_groups(rules: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A Prometheus rules file from PrometheusRule objects."""
    return {"groups": [group for rule in rules for group in rule["spec"]["groups"]]}


class Prometheus:
    """prometheus in `host`'s namespace on 127.0.0.1:`port`, its files in `directory`."""

    def __init__(self, lab: Lab, host: Host, directory: Path, port: int = 9090) -> None:
        self.lab, self.host, self.dir, self.port = lab, host, directory, port
        self.proc: subprocess.Popen[Any] | None = None

    def start(
        self, scrape: list[dict[str, Any]], rules: dict[str, Any], evaluation_interval: str = "2s"
    ) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "rules.yml").write_text(yaml.safe_dump(rules))
        config = {
            "global": {"scrape_interval": "5s", "evaluation_interval": evaluation_interval},
            "rule_files": [str(self.dir / "rules.yml")],
            "scrape_configs": scrape,
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        with open(self.dir / "prometheus.log", "ab") as out:
            self.proc = self.lab.popen(
                self.host,
                [
                    str(gobuild.prometheus()),
                    f"--config.file={self.dir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--web.enable-lifecycle",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while self._get("/-/ready") is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, size: int = 4000) -> str:
        path = self.dir / "prometheus.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else ""

    def _get(self, path: str) -> bytes | None:
        def fetch() -> bytes | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                    return bytes(response.read())
            except (urllib.error.URLError, OSError):
                return None

        return self.lab.call_in(self.host, fetch)

    def api(self, path: str, **params: str) -> Any:
        body = self._get(f"/api/v1/{path}?{urllib.parse.urlencode(params)}")
        if body is None:
            raise RuntimeError(f"prometheus did not answer /api/v1/{path}")
        payload = json.loads(body)
        if payload.get("status") != "success":
            raise RuntimeError(f"prometheus /api/v1/{path}: {payload}")
        return payload["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None


def check_rules(path: Path) -> subprocess.CompletedProcess[str]:
    """`promtool check rules` (Debian's prometheus package) on a rules file."""
    return subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
