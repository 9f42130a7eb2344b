"""Small helpers around named network namespaces (``ip netns``)."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def exists(ns: str) -> bool:
    """Whether the named namespace exists (as created by ``ip netns add``)."""
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a short-lived thread that has joined namespace ``ns``; return its result.

    setns(2) changes only the calling thread, so the rest of the process stays in its own
    namespace. Sockets created inside ``fn`` stay bound to ``ns`` after the thread is gone.
    """
    path = os.path.join(NETNS_DIR, ns)
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            error.append(LookupError(f"network namespace {ns!r} does not exist"))
            return
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                error.append(OSError(errno, f"setns({ns}): {os.strerror(errno)}"))
                return
        finally:
            os.close(fd)
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def open_socket(
    ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
) -> socket.socket:
    """A socket that lives in namespace ``ns`` (usable from any thread of this process)."""
    return call_in(ns, lambda: socket.socket(family, type, proto))
