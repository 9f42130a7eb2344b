"""The receive worker: a separate process that decrypts transport messages and writes the TUN.

With `Engine(workers=1)` the inbound hot path (UDP -> decrypt -> TUN) runs here, in its own
interpreter, while the Engine's process keeps the full Device (handshakes, cookies, timers,
roaming, events, reconfiguration) and the outbound path. Two processes use both cores where two
threads of one process share one interpreter lock.

The Engine starts this module as `python -m wiremesh.agent.rxworker` with the TUN, the UDP
sockets and one end of a SOCK_SEQPACKET control pair inherited; the messages over it are the
dataclasses of workermessages.py. Decryption is the WireGuard core's own receive path
(wiremesh.core.wireguard.transport), with the sessions' receive side the Engine exports.

A session is exported the moment the Device creates it, so only this process ever decrypts it
and its replay window lives here. Stats go back at most every STATS_INTERVAL, at once for a
session's first packet (it confirms a responder's keypair) or a new source address (roaming).
The worker never blocks on the Engine (sends with MSG_DONTWAIT, stats retried, other datagrams
counted as dropped), so neither side can deadlock the other. It exits when the control pair
closes, so it cannot outlive the Engine's process.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Hashable

from wiremesh.agent import tunwrite
from wiremesh.agent.workermessages import (
    Decrypt,
    FilterCounts,
    FilterRules,
    FlowsSent,
    FromWorker,
    NotForWorker,
    PeerRoutes,
    Report,
    SessionExported,
    SessionsForgotten,
    SessionTraffic,
    Stop,
)
from wiremesh.core import gro
from wiremesh.core.allowedips import AllowedIPs
from wiremesh.core.packetfilter import Filter
from wiremesh.core.wireguard.transport import Flow, ReceiveSession, Run, receive_run

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
CONTROL_MAX = MAX_DATAGRAM + 4096  # one forwarded datagram and its pickled envelope
STATS_INTERVAL = 0.02
POLL_IDLE_MS = 1000
DRAIN_BURST = 32
MESSAGE_TRANSPORT = 4
TRANSPORT_MIN_SIZE = 32  # header (16) + an empty payload's tag (16)

ROUTE_CACHE_SIZE = 4096
_UNKNOWN = b"?"  # not a 32-byte key, so never a peer
_transport_unpack = struct.Struct("<IIQ").unpack_from


class Worker:
    def __init__(self, tun_fd: int, socks: list[socket.socket], ctl: socket.socket, vnet: bool) -> None:
        self.tun_fd = tun_fd
        self.socks = socks
        self.ctl = ctl
        self.vnet = vnet
        self.sessions: dict[int, ReceiveSession] = {}
        # Per session: has any packet of it been reported, and from which source.
        self.reported: dict[int, Hashable] = {}
        self.routes: AllowedIPs[bytes] = AllowedIPs()
        # Inner source address -> peer, from `routes` (a dict hit is ~10x cheaper than the trie).
        self.route_cache: dict[bytes, bytes | None] = {}
        self.drops: Counter[str] = Counter()
        self.io: Counter[str] = Counter()
        # (index, source) -> [bytes, packets, data packets] not yet reported
        self.pending: dict[tuple[int, Hashable], list[int]] = {}
        self.urgent = False
        self.last_stats = 0.0
        self.running = True
        # The packet filter (mesh mode): the Engine sends its rules and the flows we open; it
        # judges what this process decrypts. None until the Engine installs one: pass everything.
        self.filter: Filter | None = None
        self._filter_seen = (0, 0, dict[str, int]())  # counts already reported
        # Decrypt requests met while draining the control pair, run after it.
        self.deferred: list[Decrypt] = []

    # ------------------------------------------------------------------ control

    def _to_engine(self, message: FromWorker) -> bool:
        try:
            self.ctl.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError as exc:  # the Engine went away
            log.debug("rxworker_control_send_failed error=%s", exc)
            self.running = False
            return False
        return True

    def _control(self) -> None:
        """Apply every control message queued (never blocks)."""
        while True:
            try:
                raw = self.ctl.recv(CONTROL_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError:
                self.running = False
                return
            if not raw:  # the Engine closed its end (stopped, or its process died)
                self.running = False
                return
            message = pickle.loads(raw)
            if isinstance(message, Decrypt):
                self.deferred.append(message)
            elif isinstance(message, FlowsSent):
                if self.filter is not None:
                    self.filter.note_outbound_batch(list(message.headers), time.time())
            elif isinstance(message, FilterRules):
                if self.filter is None:
                    self.filter = Filter(message.rules, allow_all=message.allow_all)
                else:
                    self.filter.set_rules(message.rules, allow_all=message.allow_all)
            elif isinstance(message, SessionExported):
                self.sessions[message.index] = ReceiveSession(
                    message.peer, message.recv_key, message.reject_deadline
                )
            elif isinstance(message, SessionsForgotten):
                for index in message.indices:
                    self.sessions.pop(index, None)
                    self.reported.pop(index, None)
            elif isinstance(message, PeerRoutes):
                routes: AllowedIPs[bytes] = AllowedIPs()
                for peer, prefixes in message.allowed_ips.items():
                    for prefix in prefixes:
                        routes.insert(prefix, peer)
                self.routes = routes
                self.route_cache = {}
            elif isinstance(message, Stop):
                self.running = False
                return

    def _filter_counts(self) -> FilterCounts | None:
        """What the filter counted since the last report that reached the Engine."""
        flt = self.filter
        if flt is None:
            return None
        accepted, replies, drops = self._filter_seen
        return FilterCounts(
            {r: n - drops.get(r, 0) for r, n in flt.drops.items() if n != drops.get(r, 0)},
            flt.accepted - accepted,
            flt.accepted_replies - replies,
        )

    def _run_deferred(self) -> None:
        while self.deferred:
            batch, self.deferred = self.deferred, []
            for message in batch:
                self._datagrams([message.datagram], message.source, time.time(), forward_unknown=False)

    def _flush_stats(self, now: float) -> None:
        if not (self.pending or self.drops or self.io):
            return
        traffic = tuple(
            SessionTraffic(index, source, v[0], v[1], v[2]) for (index, source), v in self.pending.items()
        )
        if self._to_engine(Report(traffic, dict(self.drops), dict(self.io), self._filter_counts())):
            if self.filter is not None:
                self._filter_seen = (
                    self.filter.accepted,
                    self.filter.accepted_replies,
                    dict(self.filter.drops),
                )
            self.pending.clear()
            self.drops.clear()
            self.io.clear()
            self.urgent = False
        self.last_stats = now

    # ------------------------------------------------------------------ packet path

    def _datagrams(self, datagrams: list[bytes], source: Hashable, now: float, forward_unknown: bool) -> None:
        flows: list[Flow] = []
        i, n = 0, len(datagrams)
        while i < n:
            d = datagrams[i]
            session = None
            if len(d) >= TRANSPORT_MIN_SIZE:
                kind, receiver, _counter = _transport_unpack(d, 0)
                session = self.sessions.get(receiver) if kind == MESSAGE_TRANSPORT else None
            if session is None:
                if not forward_unknown:
                    self.drops["no_session"] += 1
                elif not self._to_engine(NotForWorker(d, source)):
                    self.drops["worker_forward_full"] += 1
                i += 1
                continue
            run = receive_run(session, session.peer, datagrams, i, now, self._owner, self.vnet)
            self._count_run(receiver, source, run)
            flows += run.flows
            i = run.end
        if not flows:
            return
        # The flows we opened may have been reported just before their replies arrived: what is
        # queued on the control pair applies before a flow the filter does not know is judged.
        tunwrite.deliver(self.tun_fd, flows, self.filter, now, self.io, self.drops, refresh=self._control)

    def _owner(self, src: bytes) -> bytes | None:
        """The peer (public key) AllowedIPs gives `src` to, cached."""
        cache = self.route_cache
        owner = cache.get(src, _UNKNOWN)
        if owner is _UNKNOWN:
            if len(cache) >= ROUTE_CACHE_SIZE:
                cache.clear()
            owner = cache[src] = self.routes.lookup(src)
        return owner

    def _count_run(self, receiver: int, source: Hashable, run: Run) -> None:
        """A run's drops, and what authenticated for the Engine's next report."""
        drops = self.drops
        for reason, count in run.drops.items():
            drops[reason] += count
        if not run.authenticated:
            return
        if self.reported.get(receiver, _UNKNOWN) != source:
            # A session's first packet confirms a responder's keypair, a new source is roaming:
            # the Engine hears of both at once.
            self.reported[receiver] = source
            self.urgent = True
        key = (receiver, source)
        record = self.pending.get(key)
        if record is None:
            record = self.pending[key] = [0, 0, 0]
        record[0] += run.nbytes
        record[1] += run.authenticated
        record[2] += run.data

    def _receive(self, sock: socket.socket) -> bool:
        """One recvmsg (many datagrams with UDP_GRO); False when the socket had nothing."""
        try:
            data, ancdata, _flags, addr = sock.recvmsg(
                MAX_DATAGRAM, socket.CMSG_SPACE(4), socket.MSG_DONTWAIT
            )
        except BlockingIOError:
            return False
        except OSError as exc:  # ICMP errors surface here on Linux; not fatal
            self.drops["udp_recv_error"] += 1
            log.debug("udp_recv_failed error=%s", exc)
            return True
        datagrams = gro.split_udp_gro(data, ancdata)
        source = (addr[0], addr[1])
        self.io["udp_receives"] += 1
        self.io["udp_datagrams_received"] += len(datagrams)
        now = time.time()
        try:
            self._datagrams(datagrams, source, now, forward_unknown=True)
        except Exception:  # a bug costs this batch, never the data plane
            self.drops["engine_error"] += len(datagrams)
            log.exception("rxworker_batch_failed datagrams=%d", len(datagrams))
        if self.urgent:
            self._flush_stats(now)
        return True

    def run(self) -> None:
        # poll() says which descriptors have work, so an idle socket or the control pair costs
        # no failed system call per batch; a busy socket is drained in bursts of DRAIN_BURST.
        poller = select.poll()
        by_fd = {s.fileno(): s for s in self.socks}
        ctl_fd = self.ctl.fileno()
        for fd in [*by_fd, ctl_fd]:
            poller.register(fd, select.POLLIN)
        timeout: float = 0
        while self.running:
            busy = False
            for fd, _events in poller.poll(timeout):
                if fd == ctl_fd:
                    self._control()
                    self._run_deferred()
                    continue
                sock = by_fd[fd]
                for _ in range(DRAIN_BURST):
                    if not self._receive(sock):
                        break
                else:
                    busy = True
            if self.deferred:
                self._run_deferred()
            now = time.time()
            if self.pending or self.drops or self.io:
                wait = self.last_stats + STATS_INTERVAL - now
                if self.urgent or wait <= 0:
                    self._flush_stats(now)
                    wait = STATS_INTERVAL
            else:
                wait = POLL_IDLE_MS / 1000
            timeout = 0 if busy else wait * 1000
        self._flush_stats(time.time())


class _KeyValueFormatter(logging.Formatter):
    """wiremeshd's log line format (daemon.KeyValueFormatter), without importing the daemon."""

    def format(self, record: logging.LogRecord) -> str:
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        line = (
            f"ts={ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} logger={record.name}"
            f" event={record.getMessage()}"
        )
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wiremesh-rxworker", description=__doc__.splitlines()[0])
    parser.add_argument("--tun-fd", type=int, required=True)
    parser.add_argument("--sock-fd", type=int, action="append", default=[])
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--vnet", action="store_true")
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    formatter = _KeyValueFormatter()
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(args.log_level)
    # Ctrl-C reaches the whole process group: the Engine stops us in order through the pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    socks = [socket.socket(fileno=fd) for fd in args.sock_fd]
    ctl = socket.socket(fileno=args.control_fd)
    ctl.setblocking(True)
    worker = Worker(args.tun_fd, socks, ctl, args.vnet)
    log.info("rxworker_started pid=%d sockets=%d", os.getpid(), len(socks))
    try:
        worker.run()
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
    log.info("rxworker_stopped pid=%d", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
