"""Reference programs built once per machine from their published Go modules, cached by version.

    helm = go_program("helm", "helm.sh/helm/v3/cmd/helm", "v3.19.5")
    coredns = go_program("coredns", "github.com/coredns/coredns", "v1.14.7")

`go install MODULE@VERSION` into ``~/.cache/wiremesh/<name>/<version>/bin`` (or under
``$WIREMESH_GO_CACHE``), with the installed Go toolchain only (GOTOOLCHAIN=local), static
(CGO_ENABLED=0). The first call downloads the module graph through the Go module proxy and
compiles it; later calls return at once. Concurrent callers (several test processes) wait on a
lock file instead of building twice. Kubernetes itself is built by `wiremesh.lab.kube`, which
needs a module of its own to pin its staging modules.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

BUILD_TIMEOUT = 1800.0  # a first build on 2 cores, module downloads included
GO_DIRS = ("/usr/local/go/bin", "/usr/lib/go/bin")


class GoBuildError(RuntimeError):
    """The program could not be built; the message carries the tail of go's output."""


def cache_root() -> Path:
    return Path(os.environ.get("WIREMESH_GO_CACHE") or os.path.expanduser("~/.cache/wiremesh"))


def go_binary() -> str:
    path = os.pathsep.join([*GO_DIRS, os.environ.get("PATH", "")])
    found = shutil.which("go", path=path)
    if found is None:
        raise GoBuildError("the Go toolchain is needed (looked for `go` in /usr/local/go/bin and PATH)")
    return found


def go_env(gobin: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(GOTOOLCHAIN="local", GOFLAGS="-mod=mod -buildvcs=false", CGO_ENABLED="0")
    if gobin is not None:
        env["GOBIN"] = str(gobin)
    env["PATH"] = os.pathsep.join([*GO_DIRS, env.get("PATH", "")])
    return env


def go_program(
    name: str, module: str, version: str, tags: tuple[str, ...] = (), timeout: float = BUILD_TIMEOUT
) -> Path:
    """The path of `name` built from `module`@`version` (with build `tags`), building it first if
    needed."""
    cache = cache_root() / name / (version + "".join(f"+{t}" for t in tags))
    binary = cache / "bin" / name
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        started = time.monotonic()
        staging = cache / "bin.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            result = subprocess.run(
                [
                    go_binary(),
                    "install",
                    "-trimpath",
                    "-ldflags=-s -w",
                    *(["-tags", ",".join(tags)] if tags else []),
                    f"{module}@{version}",
                ],
                env=go_env(staging),
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise GoBuildError(f"building {name} {version} did not finish within {timeout:g} s") from None
        built = staging / Path(module).name
        if result.returncode != 0 or not built.is_file():
            raise GoBuildError(f"building {name} {version} failed:\n{result.stderr[-4000:]}")
        built.rename(staging / name)
        shutil.rmtree(cache / "bin", ignore_errors=True)
        staging.rename(cache / "bin")
        (cache / "build-seconds").write_text(f"{time.monotonic() - started:.0f}\n")
    return binary


HELM = ("helm", "helm.sh/helm/v3/cmd/helm", "v3.19.5")
COREDNS = ("coredns", "github.com/coredns/coredns", "v1.14.7")
# Prometheus 3.16 (its Go module numbers releases v0.3MM.P). Debian's prometheus package is built
# without Kubernetes service discovery ("field kubernetes_sd_configs not found"), which the lab's
# scrape configuration needs; promtool from Debian still checks rule files. Prometheus' own build
# tags leave out every other discovery plugin (the cloud SDKs): a cold build took 4.4 min instead
# of 14 here (two busy cores).
PROMETHEUS = ("prometheus", "github.com/prometheus/prometheus/cmd/prometheus", "v0.316.0")
PROMETHEUS_TAGS = ("remove_all_sd", "enable_kubernetes_sd")


def helm() -> Path:
    """Helm, for installing the chart (tests, `make demo-k8s`)."""
    return go_program(*HELM)


def coredns() -> Path:
    """CoreDNS, the lab cluster's DNS (its kubernetes plugin serves cluster.local)."""
    return go_program(*COREDNS)


def prometheus() -> Path:
    """Prometheus with Kubernetes service discovery, for scraping the lab cluster."""
    return go_program(*PROMETHEUS, tags=PROMETHEUS_TAGS)
