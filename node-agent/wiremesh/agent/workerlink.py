"""The Engine's side of its receive worker process (rxworker.py): starting and stopping it, the
control pair, and which sessions' receive side it holds."""

from __future__ import annotations

import contextlib
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Hashable
from typing import Any, Protocol

from wiremesh.agent.workermessages import (
    FilterCounts,
    FilterRules,
    FromWorker,
    NotForWorker,
    PeerRoutes,
    Report,
    SessionExported,
    SessionsForgotten,
    Stop,
    ToWorker,
)

log = logging.getLogger("wiremesh.agent.engine")

CONTROL_BUFFER = 4 << 20
CONTROL_MAX = 65535 + 4096  # one forwarded datagram and its pickled envelope
STOP_TIMEOUT = 5.0


class WorkerHost(Protocol):
    """What the worker's messages need of the Engine."""

    lock: threading.Lock
    device: Any

    def receive_here(self, datagram: bytes, source: Hashable) -> None:
        """A datagram the worker does not handle (handshakes, disco, unknown sessions)."""
        ...

    def source_endpoint(self, address: Hashable) -> Hashable:
        """The endpoint for a reported source: an address, or a token the Engine handed out."""
        ...

    def send_all(self, out: list[tuple[bytes, Hashable]]) -> None: ...

    def wake_timers(self) -> None: ...

    def count_filtered(self, counts: FilterCounts) -> None:
        """What the worker's packet filter counted: added to the Engine's filter's counters."""
        ...

    def worker_exited(self) -> None:
        """The worker died: receive in this process from now on."""
        ...


class ReceiveWorker:
    """One running worker. Not thread-safe beyond what its callers' lock gives: `send` may be
    called from any thread, `sync_sessions` with the Engine's lock held."""

    def __init__(self, drops: Counter[str], io: Counter[str]) -> None:
        self.drops = drops
        self.io = io
        self.process: subprocess.Popen[bytes] | None = None
        self.control: socket.socket | None = None
        # Our local indices of the sessions whose receive side the worker holds: only it
        # decrypts those (their replay windows live there).
        self.exported: set[int] = set()
        self.stopping = False

    def start(self, tun_fd: int, sockets: list[socket.socket], vnet: bool, log_level: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for s in (ours, theirs):
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    s.setsockopt(socket.SOL_SOCKET, opt, CONTROL_BUFFER)
            fds = [tun_fd, theirs.fileno(), *(s.fileno() for s in sockets)]
            argv = [sys.executable, "-m", "wiremesh.agent.rxworker", "--tun-fd", str(tun_fd)]
            argv += ["--control-fd", str(theirs.fileno()), "--log-level", str(log_level)]
            for s in sockets:
                argv += ["--sock-fd", str(s.fileno())]
            if vnet:
                argv.append("--vnet")
            # A fresh interpreter rather than fork(): this process may already run other threads.
            self.process = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.control = ours
        self.exported.clear()

    def stop(self) -> None:
        self.stopping = True
        proc, ctl = self.process, self.control
        if ctl is not None:
            with contextlib.suppress(OSError):
                ctl.send(pickle.dumps(Stop()), socket.MSG_DONTWAIT)
            with contextlib.suppress(OSError):
                ctl.shutdown(socket.SHUT_RDWR)  # also wakes the thread reading its messages
        if proc is not None:
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("rx_worker_killed pid=%d", proc.pid)
                proc.kill()
                proc.wait()
        self.process = None

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None

    def send(self, message: ToWorker, *, droppable: bool = False) -> None:
        ctl = self.control
        if ctl is None:
            return
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            self.drops["worker_unpicklable"] += 1
            return
        try:
            # Keys must arrive (blocking); a datagram for the worker may be dropped like any packet.
            ctl.send(data, socket.MSG_DONTWAIT if droppable else 0)
        except BlockingIOError:
            self.drops["worker_control_full"] += 1
        except OSError as exc:
            if not self.stopping:
                self.drops["worker_control_error"] += 1
                log.warning("rx_worker_send_failed error=%s", exc)

    def push_filter(self, rules: tuple[Any, ...], allow_all: bool) -> None:
        """The worker judges what it decrypts with these rules (mesh mode's packet filter)."""
        self.send(FilterRules(tuple(rules), allow_all))

    def push_peers(self, allowed_ips: dict[bytes, tuple[str, ...]]) -> None:
        """The worker checks inner source addresses against every peer's AllowedIPs."""
        self.send(PeerRoutes(dict(allowed_ips)))

    def sync_sessions(self, device: Any) -> None:
        """Caller holds the Engine's lock: hand new sessions' receive side over, drop gone ones."""
        live = device.session_indices()
        gone = self.exported - live
        if gone:
            self.exported -= gone
            self.send(SessionsForgotten(tuple(sorted(gone))))
        for index in live - self.exported:
            state = device.export_receive_state(index)
            if state is not None:
                self.exported.add(index)
                self.send(SessionExported(index, *state))

    def receive(self) -> FromWorker | None:
        """The worker's next message (blocking); None when the pair closed (it exited, or stop)."""
        ctl = self.control
        if ctl is None:
            return None
        raw = ctl.recv(CONTROL_MAX)
        if not raw:
            return None
        message: FromWorker = pickle.loads(raw)
        return message

    def serve(self, host: WorkerHost, stopping: threading.Event) -> None:
        """Handle the worker's messages until it or we stop (the Engine's wm-worker thread)."""
        while not stopping.is_set():
            try:
                message = self.receive()
            except OSError as exc:
                if not stopping.is_set():
                    log.error("rx_worker_control_failed error=%s", exc)
                return
            except Exception:
                self.drops["engine_error"] += 1
                log.exception("rx_worker_message_unreadable")
                continue
            if message is None:
                if not stopping.is_set():
                    code = self.process.poll() if self.process is not None else None
                    self.drops["worker_exited"] += 1
                    log.error("rx_worker_exited returncode=%s fallback=in_process_receive", code)
                    host.worker_exited()
                return
            try:
                if isinstance(message, Report):
                    self._report(host, message)
                elif isinstance(message, NotForWorker):
                    host.receive_here(message.datagram, message.source)
            except Exception:
                self.drops["engine_error"] += 1
                log.exception("rx_worker_message_failed")

    def _report(self, host: WorkerHost, report: Report) -> None:
        """What the worker decrypted reaches the Device: counters, confirmation, roaming, timers."""
        self.drops.update(report.drops)
        self.io.update(report.io)
        if report.filter is not None:
            host.count_filtered(report.filter)
        if not report.traffic:
            return
        with host.lock:
            dev = host.device
            now = time.time()
            for t in report.traffic:
                source = host.source_endpoint(t.source)
                dev.note_received(t.index, source, t.nbytes, t.packets, t.data_packets, now)
            out = dev.datagrams_to_send()
            self.sync_sessions(dev)
        if out:
            host.send_all(out)
        host.wake_timers()

    def abandon(self, device: Any) -> None:
        """Caller holds the Engine's lock: the worker died, and the sessions it held with it
        (their replay windows), so fresh handshakes replace them."""
        device.expire_sessions(self.exported)
        self.exported.clear()

    def reap(self) -> None:
        self.close()
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=STOP_TIMEOUT)
