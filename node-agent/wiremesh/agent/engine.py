"""The data plane: moves packets between a TUN interface and UDP, through the WireGuard Device.

The Device (wiremesh.core.wireguard) is sans-I/O and not thread-safe; the Engine owns the file
descriptors and threads and serialises every Device call with one lock, taken once per batch:

- a TUN reader thread: up to TUN_READ_BATCH packets -> packet filter -> Device.send -> runs of
  equal-size datagrams to one address leave in one UDP_SEGMENT sendmsg (sender.py); in mesh mode
  an endpoint is magicsock's object, resolved by path selection (paths.py) once per run
- one UDP reader thread per socket (IPv4, IPv6), or the receive worker process (workers=1,
  rxworker.py and workerlink.py): UDP_GRO receives -> Device.receive (the core's transport
  receive path) -> packet filter -> TCP segments merged into one TUN write (gro.py)
- a timer thread: Device.handle_timer at Device.next_timer(), flushing handshakes and keepalives

Readers drain their descriptor and only poll() when it is empty; a wake pipe makes stop() prompt.
TUN TSO (gso.py) is on where the native kernel segments (in Python it cost more than it saved). With a
receive worker this process keeps handshakes, timers, roaming and the outbound path; it has no
packet filter (setting one raises), and if the worker dies, this process receives again and the
tunnel re-handshakes. The Device's clock is Unix time: it also dates handshake initiations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from wiremesh.agent import netconf, tun, tunwrite, wgreport
from wiremesh.agent.paths import Paths
from wiremesh.agent.sender import DatagramSender, open_sockets
from wiremesh.agent.workerlink import ReceiveWorker
from wiremesh.agent.workermessages import Decrypt, FilterCounts, FlowsSent
from wiremesh.core import gro, gso
from wiremesh.core.policy.model import FilterRule

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
# The kernel drops (rather than queues) packets for a TUN whose reader lags and its ring is full;
# local TCP then sees loss and halves its window. A deeper ring absorbs bursts of a Python reader.
TUN_TXQUEUELEN = 4096
TUN_READ_BATCH = 64
TUN_READ_SIZE = 65536 + 64  # a 64 KiB TSO super-packet plus its virtio_net_hdr
POLL_IDLE_MS = 1000
_TRANSPORT_PREFIX = b"\x04\x00\x00\x00"
_TSO_TYPES = (gso.VIRTIO_NET_HDR_GSO_TCPV4, gso.VIRTIO_NET_HDR_GSO_TCPV6)
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

    def note_outbound_batch(self, packets: list[bytes], now: float) -> list[bytes]: ...

    def set_rules(self, rules: Iterable[FilterRule], allow_all: bool | None = None) -> None: ...

    def count(self, drops: dict[str, int], accepted: int, accepted_replies: int) -> None: ...


def looks_like_wireguard(data: bytes) -> bool:
    """WireGuard messages start with type 1-4 and three zero bytes (disco and STUN do not)."""
    return len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\x00\x00\x00"


def resolve_workers(value: str | int) -> int:
    """`--workers` as a count: "auto" is 1 (a receive worker) when there are 2+ CPUs, else 0."""
    if value == "auto":
        return 1 if (os.cpu_count() or 1) >= 2 else 0
    n = int(value)
    if n not in (0, 1):
        raise ValueError(f"workers must be 0, 1 or auto, not {value!r}")
    return n


class Engine:
    """Owns one Device, one TUN interface and the UDP sockets; see the module docstring."""

    def __init__(
        self,
        private_key: bytes,
        tun_name: str,
        listen_port: int = 0,
        mtu: int = 1420,
        *,
        device: Any = None,
        offload: bool = True,
        tso: bool | None = None,
        workers: int = 0,
        route_table: int = netconf.MESH_TABLE,
    ) -> None:
        tun.validate_ifname(tun_name)
        if workers not in (0, 1):
            raise ValueError("workers must be 0 or 1 (one receive worker process)")
        self.workers = workers
        if device is None:
            from wiremesh.core.wireguard import Device

            device = Device(private_key, time.time())
        self.device = device
        self.tun_name = tun_name
        self.listen_port = listen_port
        self.mtu = mtu
        # Routes into the tunnel live in this table of ours, selected by netconf's policy rules
        # (added with the first routes, removed at stop); None until then.
        self.route_table = route_table
        self._route_families: tuple[int, ...] | None = None
        # Everything the Device is asked goes through this lock (the Device is not thread-safe).
        self.lock = threading.Lock()
        # The packet filter sees every packet both ways; None means "pass everything".
        self._packet_filter: PacketFilter | None = None
        # Drops the Engine itself counts (the Device counts its own in device.drops).
        self.drops: Counter[str] = Counter()
        # System calls and packets per direction, counted per batch: shows how well batching works.
        self.io: Counter[str] = Counter()
        self.allowed_ips: dict[bytes, tuple[str, ...]] = {}
        self.public_key = b""
        self._tun_fd = -1
        self._sock4: socket.socket | None = None
        self._sock6: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._timer_wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        # Receive worker (workers=1): its process, our end of the control pair, and the local
        # indices of the sessions whose receive side it holds (only it decrypts those).
        self._rx: ReceiveWorker | None = None
        self._endpoint_tokens: dict[int, Hashable] = {}
        # Sends datagrams (UDP_SEGMENT batches) and holds path selection; see sender.py.
        self._sender = DatagramSender(self.drops, self.io)
        # With a virtio_net_hdr on the TUN, runs of TCP segments are written as one GSO packet.
        self._vnet = offload
        # With TSO the kernel hands over whole TCP sends and we segment them (finishing checksums).
        # By default on only where the native kernel segments: in Python it cost more per byte
        # than the reads it saves (sender ~72-82 vs ~85-88 MB per CPU-second, even with numpy).
        self._tso = offload and (gso.NATIVE if tso is None else tso)

    @property
    def packet_filter(self) -> PacketFilter | None:
        """Sees each batch we send (note_outbound_batch) and judges each decrypted batch before
        it reaches the TUN (admit_flow, once per run of one flow)."""
        return self._packet_filter

    @packet_filter.setter
    def packet_filter(self, flt: PacketFilter | None) -> None:
        self._packet_filter = flt
        self._push_filter()

    def set_filter_rules(self, rules: Iterable[FilterRule], allow_all: bool) -> None:
        """New rules for the packet filter, wherever it runs (here, and in the receive worker)."""
        flt = self._packet_filter
        if flt is None:
            raise ValueError("no packet filter to give rules to")
        flt.set_rules(rules, allow_all=allow_all)
        self._push_filter()

    def _push_filter(self) -> None:
        flt, rx = self._packet_filter, self._rx
        if rx is None:
            return
        if flt is None:
            rx.push_filter((), allow_all=True)  # a worker's filter that passes everything
        else:
            rx.push_filter(flt.rules, flt.allow_all)

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Create the TUN interface, bind the sockets and start the packet threads."""
        if self._started:
            raise RuntimeError("engine already started")
        self._tun_fd, self._vnet, self._tso = tun.open_with_offloads(self.tun_name, self._vnet, self._tso)
        try:
            netconf.set_link(self.tun_name, mtu=self.mtu, up=True, txqueuelen=TUN_TXQUEUELEN)
            self._open_sockets()
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            if self.workers:
                self._start_worker()
        except BaseException:
            self._stop_worker()
            self._close_fds()
            raise
        self._started = True
        self._stopping.clear()
        targets: list[tuple[str, Callable[[], None]]] = [
            ("wm-tun", self._tun_loop),
            ("wm-timer", self._timer_loop),
        ]
        if self._rx is not None:
            targets.append(("wm-worker", self._worker_loop))
        else:
            for sock in (self._sock4, self._sock6):
                if sock is not None:
                    targets.append((f"wm-udp{sock.family.name[-1]}", functools.partial(self._udp_loop, sock)))
        for name, target in targets:
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "engine_started interface=%s listen_port=%d mtu=%d ipv6=%s rx_worker=%s",
            self.tun_name,
            self.listen_port,
            self.mtu,
            self._sock6 is not None,
            self._rx.process.pid if self._rx is not None and self._rx.process is not None else "-",
        )

    def stop(self) -> None:
        """Stop the threads, close the descriptors and remove the interface. Idempotent."""
        if not self._started:
            return
        self._stopping.set()
        self._timer_wake.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._stop_worker()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        self._close_fds()
        try:
            netconf.remove_interface(self.tun_name)
        except netconf.NetconfError as exc:
            log.warning("interface_remove_failed interface=%s error=%s", self.tun_name, exc)
        if self._route_families is not None:
            # The table's routes left with the interface; its rules are ours to take back.
            try:
                netconf.remove_rules(self.route_table)
            except netconf.NetconfError as exc:
                log.warning("routing_rules_remove_failed table=%d error=%s", self.route_table, exc)
            self._route_families = None
        self._started = False
        log.info("engine_stopped interface=%s", self.tun_name)

    def _open_sockets(self) -> None:
        s4, s6, self.listen_port = open_sockets(self.listen_port)
        self._sock4 = self._sender.sock4 = s4
        self._sock6 = self._sender.sock6 = s6

    def _close_fds(self) -> None:
        if self._rx is not None:
            self._rx.close()
            self._rx = None
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                sock.close()
        self._sock4 = self._sock6 = self._sender.sock4 = self._sender.sock6 = None
        for fd in (self._tun_fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._tun_fd = self._wake_r = self._wake_w = -1

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------------- receive worker

    @property
    def paths(self) -> Paths:
        """Who chooses peers' paths (static addresses, or magicsock); see paths.py."""
        return self._sender.paths

    @paths.setter
    def paths(self, paths: Paths) -> None:
        self._sender.paths = paths

    @property
    def worker_process(self) -> subprocess.Popen[bytes] | None:
        """The receive worker's process while it runs (workers=1)."""
        return self._rx.process if self._rx is not None else None

    @property
    def exported_sessions(self) -> set[int]:
        """Local indices of the sessions whose receive side the worker holds."""
        return self._rx.exported if self._rx is not None else set()

    def _start_worker(self) -> None:
        rx = ReceiveWorker(self.drops, self.io)
        socks = [s for s in (self._sock4, self._sock6) if s is not None]
        rx.start(self._tun_fd, socks, self._vnet, log.getEffectiveLevel())
        self._rx = rx
        self._push_filter()
        with self.lock:
            rx.push_peers(self.allowed_ips)
            rx.sync_sessions(self.device)

    def _stop_worker(self) -> None:
        if self._rx is not None:
            self._rx.stop()

    def _sync_sessions(self) -> None:
        """Caller holds the lock: the worker gets new sessions' receive side, forgets gone ones."""
        if self._rx is not None:
            self._rx.sync_sessions(self.device)

    def _worker_loop(self) -> None:
        if self._rx is not None:
            self._rx.serve(self, self._stopping)

    # WorkerHost (workerlink.py)

    def receive_here(self, datagram: bytes, source: Hashable) -> None:
        self._main_receive(datagram, source)

    def source_endpoint(self, address: Hashable) -> Hashable:
        if type(address) is int:
            return self._endpoint_tokens.get(address, address)
        return self._source_endpoint(address)  # type: ignore[arg-type]

    def count_filtered(self, counts: FilterCounts) -> None:
        flt = self._packet_filter
        if flt is not None:
            flt.count(counts.drops, counts.accepted, counts.accepted_replies)

    def send_all(self, out: list[tuple[bytes, Hashable]]) -> None:
        self._sender.send_all(out)

    def wake_timers(self) -> None:
        self._timer_wake.set()

    def worker_exited(self) -> None:
        rx = self._rx
        if rx is None:
            return
        with self.lock:
            self._rx = None
            rx.abandon(self.device)
        rx.reap()
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                t = threading.Thread(
                    target=self._udp_loop, args=(sock,), name=f"wm-udp{sock.family.name[-1]}", daemon=True
                )
                t.start()
                self._threads.append(t)

    def _main_receive(self, data: bytes, endpoint: Hashable, from_socket: bool = True) -> bytes | None:
        """A datagram for this process's Device (caller does not hold the lock): transport for a
        session the worker holds goes to the worker; the rest is handled here, and what it
        decrypts is delivered."""
        arrived_from = endpoint
        if from_socket and type(endpoint) is tuple:
            if not looks_like_wireguard(data) and self._receive_other(data, endpoint):
                return None
            endpoint = self._source_endpoint(endpoint)
        with self.lock:
            rx = self._rx
            if (
                rx is not None
                and data[:4] == _TRANSPORT_PREFIX
                and len(data) >= 8
                and int.from_bytes(data[4:8], "little") in rx.exported
            ):
                # An address travels as it is; an endpoint object (a relayed peer's) as a token
                # the worker's report brings back.
                if type(arrived_from) is not tuple:
                    arrived_from = id(arrived_from)
                    self._endpoint_tokens[arrived_from] = endpoint
                rx.send(Decrypt(bytes(data), arrived_from), droppable=True)
                return None
            packet = self.device.receive(data, endpoint, time.time())
            out = self.device.datagrams_to_send()
            self._sync_sessions()
        if out:
            self._sender.send_all(out)
        if out or not packet:
            self._timer_wake.set()
        if packet:
            self._deliver(packet)
        return packet

    def _deliver(self, packet: bytes) -> None:
        flt = self._packet_filter
        if flt is not None and not flt.admit_flow(packet, 1, time.time()):
            self.drops["inbound_filter"] += 1
            return
        try:
            os.write(self._tun_fd, gro.PLAIN_HEADER + packet if self._vnet else packet)
        except OSError:
            self.drops["tun_write_error"] += 1

    # ----------------------------------------------------------------------- reconfiguration

    def set_private_key(self, private_key: bytes) -> None:
        with self.lock:
            self.device.set_private_key(private_key)
            self._sync_sessions()
        self._timer_wake.set()

    def set_peers(self, peers: Iterable[Any]) -> None:
        """Reconcile the Device's peers with `peers` (PeerConfig): add, update, remove."""
        wanted = {p.public_key: p for p in peers}
        with self.lock:
            for key in list(self.device.peers):
                if key not in wanted:
                    self.device.remove_peer(key)
                    self.allowed_ips.pop(key, None)
                    log.info("peer_removed peer=%s", wgreport.b64(key))
            for key, cfg in wanted.items():
                self.device.set_peer(cfg)
                self.allowed_ips[key] = tuple(cfg.allowed_ips)
            out = self.device.datagrams_to_send()
            if self._rx is not None:
                self._rx.push_peers(self.allowed_ips)
            self._sync_sessions()
        self._sender.send_all(out)
        self._timer_wake.set()

    def set_addresses(self, addresses: Iterable[str], never_source: Iterable[str] = ()) -> None:
        netconf.set_addresses(self.tun_name, list(addresses), never_source=list(never_source))

    def set_routes(self, prefixes: Iterable[str]) -> None:
        """Route `prefixes` into the tunnel, in our own table (netconf's docstring says why)."""
        if self._route_families is None:
            self._route_families = netconf.install_rules(self.route_table)
            if socket.AF_INET6 not in self._route_families:
                log.warning("ipv6_unavailable interface=%s routes=ipv4_only", self.tun_name)
        wanted = [p for p in prefixes if ":" not in p or socket.AF_INET6 in self._route_families]
        netconf.set_routes(self.tun_name, wanted, table=self.route_table)

    def receive_datagram(self, data: bytes, endpoint: Hashable) -> None:
        """Feed a WireGuard datagram that arrived another way (a DERP relay, a magicsock probe
        socket) as if it came from `endpoint`, and deliver what it decrypts to the TUN."""
        self._main_receive(data, endpoint, from_socket=False)

    def send_datagram(self, data: bytes, endpoint: Hashable) -> None:
        """Send a non-WireGuard datagram (disco, STUN) from the WireGuard socket."""
        self._sender.send(data, endpoint)

    # ----------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        now = time.time()
        with self.lock:
            peers = wgreport.peers_status(self.device.peers, self.allowed_ips, now)
            drops = dict(self.device.drops)
        for reason, n in self.drops.items():
            drops[reason] = drops.get(reason, 0) + n
        return {
            "interface": self.tun_name,
            "listen_port": self.listen_port,
            "mtu": self.mtu,
            "peers": peers,
            "drops": drops,
        }

    # ----------------------------------------------------------------------- packet path

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
        whose peer has a live session goes whole (send_tso); anything else is segmented and
        sent per packet (send_batch)."""
        t = time.time()
        if self._tso:
            packets: list[bytes] = []
            for raw in batch:
                try:
                    if not self._send_tso(raw, t):
                        packets += gso.from_tun(raw)
                except (gso.SegmentationError, ValueError) as exc:
                    self.drops["tun_gso_malformed"] += 1
                    log.debug("tun_gso_malformed error=%s", exc)
            if not packets:
                return
            batch = packets
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
        """One TUN TSO read sealed whole and sent in segmented sends; False if it is not one or
        needs the per-packet path."""
        _flags, gso_type, _hdr_len, mss, _start, _offset = gso.parse_vnet(raw)
        if gso_type & ~gso.VIRTIO_NET_HDR_GSO_ECN not in _TSO_TYPES:
            return False
        # Every segment is of one flow: the filter learns it from the headers.
        self._note_outbound([raw[gso.VNET_HDR_LEN : gso.VNET_HDR_LEN + FLOW_HEADER_BYTES]], now)
        with self.lock:
            sealed = self.device.send_tso(raw, gso.VNET_HDR_LEN, mss, now)
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
            if d[:4] == _TRANSPORT_PREFIX or looks_like_wireguard(d) or not self._receive_other(d, addr):
                wireguard.append(d)
        # One recvmsg holds datagrams of one source: one question to path selection.
        source = self._source_endpoint(addr) if wireguard else addr
        dev = self.device
        with self.lock:
            t = time.time()
            packets, flows, flush = dev.receive_batch(wireguard, source, t) if wireguard else ([], [], False)
            # Decrypting can produce output too (a confirmed session's held packets, a rekey).
            out = dev.datagrams_to_send()
        io["udp_receives"] += 1
        io["udp_datagrams_received"] += len(datagrams)
        if packets:
            tunwrite.deliver(self._tun_fd, packets, flows, self._packet_filter, t, self._vnet, io, self.drops)
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
