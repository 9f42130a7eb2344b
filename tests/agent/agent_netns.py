"""Test helpers: a throwaway network namespace and running code inside it from a thread."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unique(prefix: str) -> str:
    """A name unique enough for namespaces and interfaces shared with other engineers' tests."""
    return f"{prefix}{secrets.token_hex(3)}"


@contextlib.contextmanager
def namespace(prefix: str = "wmt") -> Iterator[str]:
    name = unique(prefix)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """Run fn on a thread that joined namespace ns (setns is per thread); threads it starts stay there."""
    out: list[T] = []
    err: list[BaseException] = []

    def target() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {ns}")
        finally:
            os.close(fd)
        try:
            out.append(fn())
        except BaseException as exc:
            err.append(exc)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]
