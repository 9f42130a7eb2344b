"""The Engine's packet path: the threads that move packets and the timer thread.

- the TUN reader: up to TUN_READ_BATCH reads -> packet filter (note_outbound_batch) -> a TSO
  super-packet whose peer has a live session is sealed whole (Device.send_tso) and leaves in
  UDP_SEGMENT sends; anything else goes per packet (Device.send_batch) and runs of equal-size
  datagrams to one address leave in one sendmsg (sender.py). In mesh mode an endpoint is
  magicsock's object, resolved by path selection (paths.py) once per run.
- one UDP reader per socket (when there is no receive worker): UDP_GRO receives ->
  Device.receive_batch (the core's one transport receive path) -> tunwrite.deliver (the filter
  per flow run, TCP segments merged into GSO writes).
- the timer thread: Device.handle_timer at Device.next_timer(), flushing handshakes and
  keepalives, and the Device's events to path selection.

Readers drain their descriptor and only poll() when it is empty; a wake pipe makes stop() prompt.
Engine (engine.py) owns the descriptors, the Device and its lock; this class is its packet half.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterable
from typing import Any, Protocol

from wiremesh.agent import tunwrite, wgreport
from wiremesh.agent.paths import Paths
from wiremesh.agent.sender import DatagramSender
from wiremesh.agent.workerlink import ReceiveWorker
from wiremesh.agent.workermessages import FlowsSent
from wiremesh.core import gro, gso
from wiremesh.core.policy.model import FilterRule

log = logging.getLogger("wiremesh.agent.engine")

MAX_DATAGRAM = 65535
TUN_READ_BATCH = 64
TUN_READ_SIZE = 65536 + 64  # a 64 KiB TSO super-packet plus its virtio_net_hdr
POLL_IDLE_MS = 1000
TRANSPORT_PREFIX = b"\x04\x00\x00\x00"
# The virtio_net_hdr gso_type byte of a TSO read (TCPv4 or TCPv6, with or without ECN).
_TSO_TYPE_BYTES = frozenset(
    bytes([t | ecn])
    for t in (gso.VIRTIO_NET_HDR_GSO_TCPV4, gso.VIRTIO_NET_HDR_GSO_TCPV6)
    for ecn in (0, gso.VIRTIO_NET_HDR_GSO_ECN)
)
FLOW_HEADER_BYTES = 128  # enough of a packet for the filter to key its flow (IPv6 options too)
MIN_TIMER_SLEEP = 0.001
MAX_TIMER_SLEEP = 1.0


class PacketFilter(Protocol):
    """What the Engine asks of a packet filter (wiremesh.core.packetfilter.Filter), per batch
    and with the batch's clock: decrypted packets it may deliver, and the packets we send (it
    returns those that opened a flow of ours). With a receive worker, the worker runs a copy of
    it: the Engine hands over its rules and our new flows, and adds the worker's counts back."""

    rules: tuple[FilterRule, ...]
    allow_all: bool

    def admit_flow(self, packet: bytes, count: int, now: float) -> bool: ...

    def in_live_flow(self, packet: bytes, now: float) -> bool: ...

    def note_outbound_batch(self, packets: list[bytes], now: float) -> list[bytes]: ...

    def set_rules(self, rules: Iterable[FilterRule], allow_all: bool | None = None) -> None: ...

    def count(self, drops: dict[str, int], accepted: int, accepted_replies: int) -> None: ...


def looks_like_wireguard(data: bytes) -> bool:
    """WireGuard messages start with type 1-4 and three zero bytes (disco and STUN do not)."""
    return len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\x00\x00\x00"


class PacketLoops:
    """The packet path of an Engine (see the module docstring); Engine sets every attribute."""

    device: Any
    lock: threading.Lock
    drops: Counter[str]
    io: Counter[str]
    paths: Paths
    _packet_filter: PacketFilter | None
    _rx: ReceiveWorker | None
    _sender: DatagramSender
    _tun_fd: int
    _wake_r: int
    _vnet: bool
    _tso: bool
    _stopping: threading.Event
    _timer_wake: threading.Event

    def _sync_sessions(self) -> None:
        raise NotImplementedError

    def _receive_other(self, data: bytes, address: tuple[str, int]) -> bool:
        """True when path selection took the datagram; else it is the Device's (as garbage)."""
        try:
            return self.paths.receive_other(data, address)
        except Exception:
            self.drops["other_datagram_error"] += 1
            log.exception("other_datagram_failed")
            return True

    def _source_endpoint(self, address: tuple[str, int]) -> Hashable:
        try:
            return self.paths.source_endpoint(address)
        except Exception:  # a path selection bug must not cost the datagrams: use the address
            self.drops["source_endpoint_error"] += 1
            if self.drops["source_endpoint_error"] == 1:
                log.exception("source_endpoint_failed address=%r", address)
            return address

    def _idle_wait(self, fd: int) -> bool:
        """Wait until `fd` is readable; False when the engine is stopping."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            for ready_fd, _ in poller.poll(POLL_IDLE_MS):
                if ready_fd == fd:
                    return True
        return False

    def _tun_loop(self) -> None:
        fd, read, io = self._tun_fd, os.read, self.io
        skip = gro.VNET_HDR_LEN if self._vnet else 0
        while True:
            # Drain what the kernel has queued (up to a batch) so that the sends can be batched too.
            batch: list[bytes] = []
            try:
                while len(batch) < TUN_READ_BATCH:
                    batch.append(read(fd, TUN_READ_SIZE))
            except BlockingIOError:
                if not batch:
                    if not self._idle_wait(fd):
                        return
                    continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if not batch:
                    self.drops["tun_read_error"] += 1
                    log.warning("tun_read_failed error=%s", exc)
                    time.sleep(0.01)
                    continue
            io["tun_reads"] += len(batch)
            try:
                self._outbound(batch, skip)
            except Exception:  # a bug or a failing hook costs this batch, never the data plane
                self.drops["engine_error"] += len(batch)
                log.exception("outbound_batch_failed packets=%d", len(batch))

    def _outbound(self, batch: list[bytes], skip: int) -> None:
        """IP packets read from the TUN -> packet filter -> Device -> UDP. A TSO super-packet
        whose peer has a live session goes whole (send_tso); anything else is made plain IP
        packets (gso.tun_packets) and sent per packet (send_batch)."""
        t = time.time()
        if self._tso:
            # TSO super-packets whose peer has a live session leave whole; the rest are made
            # plain IP packets (segmented, checksums completed) in one call.
            rest = [raw for raw in batch if not (raw[1:2] in _TSO_TYPE_BYTES and self._send_tso(raw, t))]
            if not rest:
                return
            batch, malformed = gso.tun_packets(rest)
            if malformed:
                self.drops["tun_gso_malformed"] += malformed
            if not batch:
                return
        elif skip:
            # No TUN offloads are enabled, so the kernel's header is always "plain".
            batch = [p[skip:] for p in batch]
        self._note_outbound(batch, t)
        dev = self.device
        with self.lock:
            results, flush = dev.send_batch(batch, t)
            # A successful send can produce output too (a rekey initiation): always drain.
            out = dev.datagrams_to_send()
        self._sender.send_batch(results)
        if out:
            self._sender.send_all(out)
        if flush or out:
            self._timer_wake.set()

    def _send_tso(self, raw: bytes, now: float) -> bool:
        """One TUN TSO read sealed whole and sent in segmented sends (or dropped, counted, if
        malformed); False if it needs the per-packet path."""
        if len(raw) < gso.VNET_HDR_LEN + 40:
            return False  # too short for headers: tun_packets judges it
        _flags, _gso_type, _hdr_len, mss, _start, _offset = gso.parse_vnet(raw)
        # Every segment is of one flow: the filter learns it from the headers.
        self._note_outbound([raw[gso.VNET_HDR_LEN : gso.VNET_HDR_LEN + FLOW_HEADER_BYTES]], now)
        try:
            with self.lock:
                sealed = self.device.send_tso(raw, gso.VNET_HDR_LEN, mss, now)
        except ValueError as exc:
            self.drops["tun_gso_malformed"] += 1
            log.debug("tun_gso_malformed error=%s", exc)
            return True
        if sealed is None:
            return False
        self._sender.send_sealed(*sealed)
        return True

    def _note_outbound(self, packets: list[bytes], now: float) -> None:
        flt = self._packet_filter
        if flt is not None:
            opened = flt.note_outbound_batch(packets, now)
            rx = self._rx
            if opened and rx is not None:
                # Before the packets leave, so the worker knows the flows when replies arrive.
                rx.send(FlowsSent(tuple(p[:FLOW_HEADER_BYTES] for p in opened)))

    def _udp_loop(self, sock: socket.socket) -> None:
        v6 = sock.family == socket.AF_INET6
        recvmsg, dontwait = sock.recvmsg, socket.MSG_DONTWAIT
        ancsize = socket.CMSG_SPACE(4)
        while True:
            try:
                data, ancdata, _flags, addr = recvmsg(MAX_DATAGRAM, ancsize, dontwait)
            except BlockingIOError:
                if not self._idle_wait(sock.fileno()):
                    return
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # ICMP errors (ECONNREFUSED etc.) surface here on Linux; they are not fatal.
                self.drops["udp_recv_error"] += 1
                log.debug("udp_recv_failed error=%s", exc)
                continue
            if v6:
                addr = (addr[0], addr[1])
            try:
                self._inbound(data, ancdata, addr)
            except Exception:  # a bug or a failing filter costs this batch, never the data plane
                self.drops["engine_error"] += 1
                log.exception("inbound_batch_failed bytes=%d", len(data))

    def _inbound(self, data: bytes, ancdata: list[tuple[int, int, bytes]], addr: tuple[str, int]) -> None:
        """Datagrams from one receive -> Device.receive -> filter -> (coalesce) -> TUN."""
        io = self.io
        datagrams = gro.split_udp_gro(data, ancdata)
        wireguard = []
        for d in datagrams:
            if d[:4] == TRANSPORT_PREFIX or looks_like_wireguard(d) or not self._receive_other(d, addr):
                wireguard.append(d)
        # One recvmsg holds datagrams of one source: one question to path selection.
        source = self._source_endpoint(addr) if wireguard else addr
        dev = self.device
        with self.lock:
            t = time.time()
            flows, flush = dev.receive_batch(wireguard, source, t, self._vnet) if wireguard else ([], False)
            # Decrypting can produce output too (a confirmed session's held packets, a rekey).
            out = dev.datagrams_to_send()
        io["udp_receives"] += 1
        io["udp_datagrams_received"] += len(datagrams)
        if flows:
            tunwrite.deliver(self._tun_fd, flows, self._packet_filter, t, io, self.drops)
        if out:
            self._sender.send_all(out)
        if flush or out:
            self._timer_wake.set()

    def _timer_loop(self) -> None:
        dev, lock = self.device, self.lock
        while not self._stopping.is_set():
            # Clear before looking, so a wake-up that arrives while we work is not lost.
            self._timer_wake.clear()
            now = time.time()
            events: list[object] = []
            deadline: float | None = None
            try:
                with lock:
                    dev.handle_timer(now)
                    out = dev.datagrams_to_send()
                    while (event := dev.next_event()) is not None:
                        events.append(event)
                    deadline = dev.next_timer()
                    self._sync_sessions()
                self._sender.send_all(out)
                for event in events:
                    self._dispatch(event)
            except Exception:  # keep the timers running: a missed tick beats a dead tunnel
                self.drops["engine_error"] += 1
                log.exception("timer_tick_failed")
            if deadline is None:
                timeout = MAX_TIMER_SLEEP
            else:
                timeout = min(max(deadline - time.time(), MIN_TIMER_SLEEP), MAX_TIMER_SLEEP)
            self._timer_wake.wait(timeout)

    def _dispatch(self, event: object) -> None:
        log.info("wg_event %s", wgreport.describe_event(event))
        try:
            self.paths.wireguard_event(event)
        except Exception:
            self.drops["path_event_error"] += 1
            log.exception("path_event_failed")
