"""How the Engine's datagrams leave: to an address from its IPv4 or IPv6 socket, to any other
endpoint through path selection (paths.py), and runs of equal-size datagrams to one address in
one sendmsg with UDP_SEGMENT (GSO)."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
from collections import Counter
from collections.abc import Hashable, Iterable

from wiremesh.agent import bypass
from wiremesh.agent.paths import Paths, StaticPaths
from wiremesh.core import gro

log = logging.getLogger("wiremesh.agent.engine")

# UDP segmentation offload (linux/udp.h); Python has no constants for these.
SOL_UDP = gro.SOL_UDP
UDP_SEGMENT = 103
UDP_MAX_SEGMENTS = 64
UDP_MAX_GSO_BYTES = 65000
SOCKET_BUFFER = 4 << 20
_segment_size = struct.Struct("=H").pack


def _send_error(exc: OSError) -> str:
    return f"udp_send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"


class DatagramSender:
    def __init__(self, drops: Counter[str], io: Counter[str]) -> None:
        self.drops = drops
        self.io = io
        self.sock4: socket.socket | None = None
        self.sock6: socket.socket | None = None
        self.paths: Paths = StaticPaths()
        self.gso = True

    def send(self, data: bytes, endpoint: Hashable) -> None:
        if type(endpoint) is tuple:
            sock = self.sock6 if ":" in endpoint[0] else self.sock4
            if sock is None:
                self.drops["no_socket_for_family"] += 1
                return
            try:
                sock.sendto(data, endpoint)
            except OSError as exc:
                self.drops[_send_error(exc)] += 1
            return
        try:
            self.paths.send_to_peer(data, endpoint)
        except Exception:
            self.drops["path_send_error"] += 1
            log.exception("path_send_failed endpoint=%r", endpoint)

    def send_all(self, out: Iterable[tuple[bytes, Hashable]]) -> None:
        for data, endpoint in out:
            self.send(data, endpoint)

    def send_batch(self, results: list[tuple[bytes, Hashable]]) -> None:
        """Send datagrams, coalescing runs of equal size to one endpoint into one UDP_SEGMENT send."""
        n = len(results)
        if n == 1 or not self.gso:
            self.send_all(results)
            return
        i = 0
        while i < n:
            data, endpoint = results[i]
            size = len(data)
            j = i + 1
            limit = min(n, i + min(UDP_MAX_SEGMENTS, UDP_MAX_GSO_BYTES // size))
            while j < limit:
                d2, e2 = results[j]
                if e2 != endpoint:
                    break
                j += 1
                if len(d2) != size:
                    break  # a shorter datagram may end a run, never continue one
            if j - i == 1:
                self.send(data, endpoint)
                i += 1
                continue
            address = endpoint if type(endpoint) is tuple else self.resolve_direct(endpoint)
            if address is None:
                # A relayed (or not yet trusted) path: path selection decides per datagram.
                self.send_all(results[i:j])
            else:
                self._send_segments(results, i, j, size, address)
            i = j

    def send_sealed(self, buffer: bytes, size: int, count: int, endpoint: Hashable) -> None:
        """`count` datagrams laid end to end in `buffer`, each `size` bytes but a shorter last
        one (Device.send_tso), to one endpoint: UDP_SEGMENT sends of up to UDP_MAX_SEGMENTS."""
        address = endpoint if type(endpoint) is tuple else self.resolve_direct(endpoint)
        view = memoryview(buffer)
        if address is None or not self.gso or count == 1:
            self.send_all((bytes(view[k : k + size]), endpoint) for k in range(0, len(buffer), size))
            return
        sock = self.sock6 if ":" in address[0] else self.sock4
        if sock is None:
            self.drops["no_socket_for_family"] += count
            return
        step = min(UDP_MAX_SEGMENTS, UDP_MAX_GSO_BYTES // size) * size
        control = [(SOL_UDP, UDP_SEGMENT, _segment_size(size))]
        io = self.io
        for k in range(0, len(buffer), step):
            chunk = view[k : k + step]
            try:
                sock.sendmsg([chunk], control, 0, address)
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                    log.info("udp_gso_disabled error=%s", exc)
                    self.gso = False
                    rest = view[k:]
                    self.send_all((bytes(rest[m : m + size]), address) for m in range(0, len(rest), size))
                    return
                self.drops[_send_error(exc)] += -(-len(chunk) // size)
                continue
            io["udp_gso_sends"] += 1
            io["udp_gso_datagrams"] += -(-len(chunk) // size)

    def _send_segments(
        self, results: list[tuple[bytes, Hashable]], i: int, j: int, size: int, address: tuple[str, int]
    ) -> None:
        sock = self.sock6 if ":" in address[0] else self.sock4
        if sock is None:
            self.drops["no_socket_for_family"] += j - i
            return
        chunk = b"".join([r[0] for r in results[i:j]])
        try:
            sock.sendmsg([chunk], [(SOL_UDP, UDP_SEGMENT, _segment_size(size))], 0, address)
            self.io["udp_gso_sends"] += 1
            self.io["udp_gso_datagrams"] += j - i
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                # No segmentation offload on this path: fall back to one send each, for good.
                log.info("udp_gso_disabled error=%s", exc)
                self.gso = False
                self.send_all(results[i:j])
            else:
                self.drops[_send_error(exc)] += j - i

    def resolve_direct(self, endpoint: Hashable) -> tuple[str, int] | None:
        try:
            address = self.paths.resolve_direct(endpoint)
        except Exception:  # a resolver bug costs batching, never the datagrams (they go one by one)
            self.drops["resolve_direct_error"] += 1
            if self.drops["resolve_direct_error"] == 1:  # once: it would repeat for every run
                log.exception("resolve_direct_failed endpoint=%r", endpoint)
            return None
        if type(address) is not tuple:
            return None
        self.io["udp_gso_resolved_runs"] += 1
        return address


def open_sockets(port: int) -> tuple[socket.socket, socket.socket | None, int]:
    """The Engine's UDP sockets on `port` (0: any): (IPv4, IPv6 or None without IPv6, the port)."""
    s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        _tune(s4)
        s4.bind(("0.0.0.0", port))
    except BaseException:
        s4.close()
        raise
    port = s4.getsockname()[1]
    try:
        s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return s4, None, port
    try:
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        _tune(s6)
        s6.bind(("::", port))
    except OSError as exc:
        log.warning("ipv6_socket_unavailable port=%d error=%s", port, exc)
        s6.close()
        return s4, None, port
    return s4, s6, port


def _tune(sock: socket.socket) -> None:
    bypass.mark(sock)  # WireGuard, disco and STUN never enter the tunnel they carry
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
    with contextlib.suppress(OSError):  # older kernels: datagrams simply arrive one by one
        sock.setsockopt(SOL_UDP, gro.UDP_GRO, 1)
