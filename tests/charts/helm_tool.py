"""`helm`, built once per machine from its published Go module into a cache keyed by version.

    helm = helm_binary()          # ~/.cache/wiremesh/helm/v3.19.5/bin/helm (or $WIREMESH_HELM_CACHE)

The first build downloads the module graph through the Go module proxy and compiles it (a few
minutes on two cores); later calls return at once. Concurrent builds wait on a file lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

HELM_MODULE = "helm.sh/helm/v3/cmd/helm"
HELM_VERSION = "v3.19.5"
BUILD_TIMEOUT = 1500.0
GO_DIRS = ("/usr/local/go/bin",)


def cache_dir() -> Path:
    root = os.environ.get("WIREMESH_HELM_CACHE") or os.path.expanduser("~/.cache/wiremesh/helm")
    return Path(root) / HELM_VERSION


def _go_env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOPATH=str(cache / "gopath"),
        GOMODCACHE=str(cache / "gopath" / "pkg" / "mod"),
        GOFLAGS="-mod=mod -modcacherw",  # a cache anyone may delete later
        GOBIN=str(cache / "bin"),
        CGO_ENABLED="0",
    )
    env["PATH"] = os.pathsep.join([*GO_DIRS, env.get("PATH", "")])
    return env


def helm_binary() -> Path:
    """The pinned helm, built into the cache unless it is there already."""
    cache = cache_dir()
    binary = cache / "bin" / "helm"
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
        env = _go_env(cache)
        go = shutil.which("go", path=env["PATH"])
        if go is None:
            raise RuntimeError("no Go toolchain found (looked in /usr/local/go/bin and PATH)")
        result = subprocess.run(
            [go, "install", f"{HELM_MODULE}@{HELM_VERSION}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT,
        )
        if result.returncode != 0 or not binary.is_file():
            raise RuntimeError(f"building helm {HELM_VERSION} failed:\n{result.stderr[-4000:]}")
    return binary
