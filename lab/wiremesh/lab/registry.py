"""Which lab prefixes are in use on this machine, and cleaning up after labs whose process died.

Each live lab holds a claim file ``/run/wiremesh-lab/<prefix>claim`` naming its process (PID and
start time, so a recycled PID is not mistaken for the owner). Claiming with O_EXCL makes prefixes
unique across processes. A lab killed with SIGKILL leaves its claim and namespaces behind; the next
lab to start removes the namespaces of claims whose owner is gone. Namespaces without a claim
(other tools, other engineers' experiments) are never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

from wiremesh.lab import netns

log = logging.getLogger(__name__)

STATE_DIR = "/run/wiremesh-lab"
CLAIM_SUFFIX = "claim"
COMMAND_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 3.0


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return fields[19]


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    os.makedirs(STATE_DIR, exist_ok=True)
    fd = os.open(os.path.join(STATE_DIR, ".lock"), os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim(prefix: str | None) -> str:
    """Reserve ``prefix`` (or a fresh random one) for this process; returns the prefix."""
    me = os.getpid()
    started = _start_time(me) or "?"
    with _locked():
        for _ in range(64):
            candidate = prefix if prefix is not None else f"wm{secrets.token_hex(2)}-"
            path = os.path.join(STATE_DIR, candidate + CLAIM_SUFFIX)
            in_use = any(ns.startswith(candidate) for ns in _all_namespaces())
            if not in_use:
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    in_use = True
                else:
                    with os.fdopen(fd, "w") as f:
                        f.write(f"{me} {started}\n")
                    return candidate
            if prefix is not None:
                raise RuntimeError(f"lab prefix {prefix!r} is in use")
    raise RuntimeError("could not find a free lab prefix")


def release(prefix: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(STATE_DIR, prefix + CLAIM_SUFFIX))


def _all_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(netns.NETNS_DIR))
    except FileNotFoundError:
        return []


def _owner_alive(path: str) -> bool:
    try:
        with open(path) as f:
            pid_text, started = f.read().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    return _start_time(pid) == started


def destroy_namespace(ns: str, keep_pid: int | None = None) -> None:
    """Kill every process inside ``ns`` (by PID, TERM then KILL), then delete it."""
    deadline = time.monotonic() + KILL_TIMEOUT_S
    while netns.exists(ns):
        out = subprocess.run(
            ["ip", "netns", "pids", ns],
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT_S,
        ).stdout
        pids = [int(p) for p in out.split() if p.isdigit() and int(p) != keep_pid]
        if not pids:
            break
        now = time.monotonic()
        if now > deadline + KILL_TIMEOUT_S:
            log.error("lab: processes %s in %s would not die", pids, ns)
            break
        sig = signal.SIGKILL if now > deadline else signal.SIGTERM
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.02)
    if not netns.exists(ns):
        return
    result = subprocess.run(
        ["ip", "netns", "del", ns], capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT_S
    )
    if result.returncode != 0 and netns.exists(ns):
        log.error("lab: could not delete namespace %s: %s", ns, result.stderr.strip())


def reap_stale() -> list[str]:
    """Delete the namespaces (and temp dirs) of labs whose owning process is gone; return them."""
    reaped: list[str] = []
    with _locked():
        for entry in sorted(os.listdir(STATE_DIR)):
            if not entry.endswith(CLAIM_SUFFIX):
                continue
            path = os.path.join(STATE_DIR, entry)
            if _owner_alive(path):
                continue
            prefix = entry[: -len(CLAIM_SUFFIX)]
            for ns in _all_namespaces():
                if ns.startswith(prefix):
                    destroy_namespace(ns)
                    reaped.append(ns)
            tmp = tempfile.gettempdir()
            with contextlib.suppress(FileNotFoundError):
                for name in os.listdir(tmp):
                    if name.startswith(prefix + "lab-"):
                        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
            release(prefix)
    if reaped:
        log.warning("lab: removed %d namespaces left by dead labs: %s", len(reaped), " ".join(reaped))
    return reaped
