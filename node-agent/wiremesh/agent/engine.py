"""The data plane: moves packets between a TUN interface and UDP, through the WireGuard Device.

The Device (wiremesh.core.wireguard) is sans-I/O and not thread-safe; the Engine is the thin
adapter that owns the file descriptors and threads and serialises every Device call with one lock
(taken once per batch, not per packet):

- a TUN reader thread: drains up to TUN_READ_BATCH packets -> (outbound hook) -> Device.send ->
  runs of equal-size datagrams to one endpoint leave in one sendmsg with UDP_SEGMENT (GSO); in
  mesh mode the endpoint is a magicsock object, which path selection (paths.PathSelection)
  resolves to the peer's current direct address for the run (a relayed peer's datagrams go to
  it one by one)
- one UDP reader thread per socket (IPv4, IPv6): with UDP_GRO one recvmsg returns many datagrams
  -> Device.receive -> (inbound filter) -> consecutive TCP segments merged into one TUN write
  with a virtio_net_hdr (software GRO, see gro.py)
- a timer thread: Device.handle_timer at Device.next_timer(), flushing handshakes and keepalives

Readers drain their descriptor without waiting and only poll() when it is empty; poll() also
watches a wake pipe so that stop() returns promptly. Optional TUN TSO (gso.py) is off by default
because segmenting in Python cost more than it saved here. The wiremesh_io_total metric shows how
well batching works (system calls versus packets).

The control plane reconfigures a running Engine with set_peers / set_addresses / set_routes.

With `workers=1` (wiremeshd --workers) the inbound path moves to a receive worker process
(rxworker.py): it reads the UDP sockets, decrypts with session keys this process exports as the
Device creates them, and writes the TUN; everything else comes back here over a control pair.
This process then runs no UDP reader threads; its Device still does handshakes, timers, roaming
and the outbound path. The worker mode has no packet_filter (the filter lives in this process),
so setting one raises (mesh mode, which filters, keeps workers=0). Path selection and
receive_datagram keep working (non-WireGuard datagrams come back here; relayed transport goes to
the worker). If the worker dies, this process receives again and the tunnel
re-handshakes (the worker held the sessions' replay windows).

The Device's clock is Unix time (time.time()): it also dates handshake initiations (TAI64N).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import logging
import os
import pickle
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from wiremesh.agent import gro, gso, netconf, tun
from wiremesh.agent.paths import PathSelection, StaticPaths
from wiremesh.agent.workermessages import (
    Decrypt,
    NotForWorker,
    PeerRoutes,
    Report,
    SessionExported,
    SessionsForgotten,
    Stop,
    ToWorker,
)

log = logging.getLogger(__name__)

MAX_DATAGRAM = 65535
# The kernel drops (rather than queues) packets for a TUN whose reader lags and its ring is full;
# local TCP then sees loss and halves its window. A deeper ring absorbs bursts of a Python reader.
TUN_TXQUEUELEN = 4096
TUN_READ_BATCH = 64
TUN_READ_SIZE = 65536 + 64  # a 64 KiB TSO super-packet plus its virtio_net_hdr
# UDP segmentation offload (linux/udp.h); Python has no constants for these.
SOL_UDP = gro.SOL_UDP
UDP_SEGMENT = 103
UDP_GRO = gro.UDP_GRO
UDP_MAX_SEGMENTS = 64
UDP_MAX_GSO_BYTES = 65000
SOCKET_BUFFER = 4 << 20
POLL_IDLE_MS = 1000
WORKER_CONTROL_BUFFER = 4 << 20
WORKER_CONTROL_MAX = MAX_DATAGRAM + 4096
WORKER_STOP_TIMEOUT = 5.0
_TRANSPORT_PREFIX = b"\x04\x00\x00\x00"
MIN_TIMER_SLEEP = 0.001
MAX_TIMER_SLEEP = 1.0


class PacketFilter(Protocol):
    """What the Engine asks of a packet filter (wiremesh.core.packetfilter.Filter), per batch
    and with the batch's clock: decrypted packets it may deliver, and the packets we send."""

    def filter_inbound(self, packets: list[bytes], now: float) -> list[bytes]: ...

    def note_outbound_batch(self, packets: list[bytes], now: float) -> None: ...


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


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


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
        tso: bool = False,
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
        # Who chooses peers' paths (static addresses, or magicsock); see paths.py. Set it
        # before start().
        self.paths: PathSelection = StaticPaths()
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
        self._worker: subprocess.Popen[bytes] | None = None
        self._ctl: socket.socket | None = None
        self._exported: set[int] = set()
        self._gso = True
        # With a virtio_net_hdr on the TUN, runs of TCP segments are written as one GSO packet.
        self._vnet = offload
        # With TSO the kernel hands over whole TCP sends and we segment them (finishing checksums).
        # Off by default: measured here it cost more Python time per byte than the reads it saves
        # (sender ~72-82 vs ~85-88 MB per CPU-second, even with numpy checksums).
        self._tso = offload and tso

    @property
    def packet_filter(self) -> PacketFilter | None:
        """Sees each batch we send (note_outbound_batch) and judges each decrypted batch before
        it reaches the TUN (filter_inbound)."""
        return self._packet_filter

    @packet_filter.setter
    def packet_filter(self, flt: PacketFilter | None) -> None:
        if flt is not None and self.workers:
            # The receive worker writes the TUN without asking this process: refuse rather than
            # let packets bypass a filter the caller believes is in force.
            raise ValueError("the receive worker mode does not run a packet_filter")
        self._packet_filter = flt

    # ----------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Create the TUN interface, bind the sockets and start the packet threads."""
        if self._started:
            raise RuntimeError("engine already started")
        try:
            self._tun_fd = tun.open_tun(self.tun_name, vnet_hdr=self._vnet)
        except tun.TunError:
            if not self._vnet:
                raise
            log.info("tun_vnet_hdr_unavailable interface=%s", self.tun_name)
            self._vnet = False
            self._tun_fd = tun.open_tun(self.tun_name)
        if self._vnet and self._tso:
            try:
                tun.set_offload(self._tun_fd, tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6)
            except tun.TunError as exc:
                log.info("tun_tso_unavailable interface=%s error=%s", self.tun_name, exc)
                self._tso = False
        else:
            self._tso = False
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
        if self._worker is not None:
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
            self._worker.pid if self._worker is not None else "-",
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
        s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._tune(s4)
        s4.bind(("0.0.0.0", self.listen_port))
        self._sock4 = s4
        self.listen_port = s4.getsockname()[1]
        try:
            s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        except OSError:
            return
        try:
            s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            self._tune(s6)
            s6.bind(("::", self.listen_port))
        except OSError as exc:
            log.warning("ipv6_socket_unavailable port=%d error=%s", self.listen_port, exc)
            s6.close()
            return
        self._sock6 = s6

    @staticmethod
    def _tune(sock: socket.socket) -> None:
        for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE as root
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        with contextlib.suppress(OSError):  # older kernels: datagrams simply arrive one by one
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)

    def _close_fds(self) -> None:
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                sock.close()
        self._sock4 = self._sock6 = None
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

    def _start_worker(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            for s in (ours, theirs):
                for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                    s.setsockopt(socket.SOL_SOCKET, opt, WORKER_CONTROL_BUFFER)
            socks = [s for s in (self._sock4, self._sock6) if s is not None]
            fds = [self._tun_fd, theirs.fileno(), *(s.fileno() for s in socks)]
            argv = [sys.executable, "-m", "wiremesh.agent.rxworker", "--tun-fd", str(self._tun_fd)]
            argv += ["--control-fd", str(theirs.fileno()), "--log-level", str(log.getEffectiveLevel())]
            for s in socks:
                argv += ["--sock-fd", str(s.fileno())]
            if self._vnet:
                argv.append("--vnet")
            # A fresh interpreter rather than fork(): this process may already run other threads.
            self._worker = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._ctl = ours
        self._exported.clear()
        with self.lock:
            self._push_peers()
            self._sync_sessions()

    def _stop_worker(self) -> None:
        proc, ctl = self._worker, self._ctl
        if ctl is not None:
            with contextlib.suppress(OSError):
                ctl.send(pickle.dumps(Stop()), socket.MSG_DONTWAIT)
            with contextlib.suppress(OSError):
                ctl.shutdown(socket.SHUT_RDWR)  # also wakes our wm-worker thread
        if proc is not None:
            try:
                proc.wait(timeout=WORKER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("rx_worker_killed pid=%d", proc.pid)
                proc.kill()
                proc.wait()
        self._worker = None

    def _to_worker(self, message: ToWorker, *, droppable: bool = False) -> None:
        ctl = self._ctl
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
            if not self._stopping.is_set():
                self.drops["worker_control_error"] += 1
                log.warning("rx_worker_send_failed error=%s", exc)

    def _push_peers(self) -> None:
        """Caller holds the lock. The worker checks inner source addresses against AllowedIPs."""
        if self._ctl is not None:
            self._to_worker(PeerRoutes(dict(self.allowed_ips)))

    def _sync_sessions(self) -> None:
        """Caller holds the lock: hand new sessions' receive side to the worker, drop gone ones."""
        if self._ctl is None:
            return
        live = self.device.session_indices()
        exported = self._exported
        gone = exported - live
        if gone:
            exported -= gone
            self._to_worker(SessionsForgotten(tuple(sorted(gone))))
        for index in live - exported:
            state = self.device.export_receive_state(index)
            if state is not None:
                exported.add(index)
                self._to_worker(SessionExported(index, *state))

    def _worker_loop(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        while not self._stopping.is_set():
            try:
                raw = ctl.recv(WORKER_CONTROL_MAX)
            except OSError as exc:
                if not self._stopping.is_set():
                    log.error("rx_worker_control_failed error=%s", exc)
                return
            if not raw:
                if not self._stopping.is_set():
                    self._worker_died()
                return
            try:
                message = pickle.loads(raw)
                if isinstance(message, Report):
                    self._worker_report(message)
                elif isinstance(message, NotForWorker):
                    self._main_receive(message.datagram, message.source)
            except Exception:
                self.drops["engine_error"] += 1
                log.exception("rx_worker_message_failed")

    def _worker_died(self) -> None:
        """The worker exited on its own: receive in this process from now on. The sessions it
        held go too (their replay windows died with it), so fresh handshakes replace them."""
        proc = self._worker
        code = proc.poll() if proc is not None else None
        self.drops["worker_exited"] += 1
        log.error("rx_worker_exited returncode=%s fallback=in_process_receive", code)
        with self.lock:
            ctl, self._ctl = self._ctl, None
            self.device.expire_sessions(self._exported)
            self._exported.clear()
        if ctl is not None:
            ctl.close()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=WORKER_STOP_TIMEOUT)
        for sock in (self._sock4, self._sock6):
            if sock is not None:
                t = threading.Thread(
                    target=self._udp_loop, args=(sock,), name=f"wm-udp{sock.family.name[-1]}", daemon=True
                )
                t.start()
                self._threads.append(t)

    def _worker_report(self, report: Report) -> None:
        self.drops.update(report.drops)
        self.io.update(report.io)
        if not report.traffic:
            return
        dev = self.device
        with self.lock:
            now = time.time()
            for t in report.traffic:
                source = self._source_endpoint(t.source) if type(t.source) is tuple else t.source
                dev.note_received(t.index, source, t.nbytes, t.packets, t.data_packets, now)
            out = dev.datagrams_to_send()
            self._sync_sessions()
        if out:
            self._send_all(out)
        self._timer_wake.set()

    def _main_receive(self, data: bytes, endpoint: Hashable, from_socket: bool = True) -> bytes | None:
        """Caller does not hold the lock. A datagram for this process's Device: transport for a
        session the worker holds goes to the worker; the rest is handled here. Returns an inner
        packet the Device decrypted (a session not exported), for the caller to deliver."""
        if from_socket and type(endpoint) is tuple:
            if not looks_like_wireguard(data) and self._receive_other(data, endpoint):
                return None
            endpoint = self._source_endpoint(endpoint)
        with self.lock:
            if (
                data[:4] == _TRANSPORT_PREFIX
                and len(data) >= 8
                and int.from_bytes(data[4:8], "little") in self._exported
            ):
                self._to_worker(Decrypt(bytes(data), endpoint), droppable=True)
                return None
            packet = self.device.receive(data, endpoint, time.time())
            out = self.device.datagrams_to_send()
            self._sync_sessions()
        if out:
            self._send_all(out)
        self._timer_wake.set()
        if packet:
            self._deliver(packet)
        return packet

    def _deliver(self, packet: bytes) -> None:
        flt = self._packet_filter
        if flt is not None and not flt.filter_inbound([packet], time.time()):
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
                    log.info("peer_removed peer=%s", _b64(key))
            for key, cfg in wanted.items():
                self.device.set_peer(cfg)
                self.allowed_ips[key] = tuple(cfg.allowed_ips)
            out = self.device.datagrams_to_send()
            self._push_peers()
            self._sync_sessions()
        self._send_all(out)
        self._timer_wake.set()

    def set_addresses(self, addresses: Iterable[str]) -> None:
        netconf.set_addresses(self.tun_name, list(addresses))

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
        if self._ctl is not None:
            self._main_receive(data, endpoint, from_socket=False)
            return
        with self.lock:
            packet = self.device.receive(data, endpoint, time.time())
            out = self.device.datagrams_to_send()
        if out:
            self._send_all(out)
        if packet:
            self._deliver(packet)
        if out or not packet:
            self._timer_wake.set()

    def send_datagram(self, data: bytes, endpoint: Hashable) -> None:
        """Send a non-WireGuard datagram (disco, STUN) from the WireGuard socket."""
        self._send(data, endpoint)

    # ----------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        now = time.time()
        with self.lock:
            peers: dict[str, dict[str, Any]] = {}
            for key, p in self.device.peers.items():
                last = p.last_handshake
                peers[_b64(key)] = {
                    "endpoint": _format_endpoint(p.endpoint),
                    "allowed_ips": list(self.allowed_ips.get(key, ())),
                    "rx_bytes": p.rx_bytes,
                    "tx_bytes": p.tx_bytes,
                    "rx_packets": p.rx_packets,
                    "tx_packets": p.tx_packets,
                    "last_handshake_seconds_ago": None if last is None else round(now - last, 3),
                    "handshakes_completed": p.handshakes_completed,
                    "handshakes_failed": p.handshakes_failed,
                }
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

    def _send(self, data: bytes, endpoint: Hashable) -> None:
        if type(endpoint) is tuple:
            sock = self._sock6 if ":" in endpoint[0] else self._sock4
            if sock is None:
                self.drops["no_socket_for_family"] += 1
                return
            try:
                sock.sendto(data, endpoint)
            except OSError as exc:
                self.drops[f"udp_send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1
        else:
            try:
                self.paths.send_to_peer(data, endpoint)
            except Exception:
                self.drops["path_send_error"] += 1
                log.exception("path_send_failed endpoint=%r", endpoint)

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

    def _send_all(self, out: Iterable[tuple[bytes, Hashable]]) -> None:
        for data, endpoint in out:
            self._send(data, endpoint)

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
        """IP packets read from the TUN -> hook -> Device.send -> UDP."""
        if self._tso:
            packets: list[bytes] = []
            for raw in batch:
                try:
                    packets += gso.from_tun(raw)
                except gso.SegmentationError as exc:
                    self.drops["tun_gso_malformed"] += 1
                    log.debug("tun_gso_malformed error=%s", exc)
            batch = packets
        elif skip:
            # No TUN offloads are enabled, so the kernel's header is always "plain".
            batch = [p[skip:] for p in batch]
        t = time.time()
        flt = self._packet_filter
        if flt is not None:
            flt.note_outbound_batch(batch, t)
        results: list[tuple[bytes, Hashable]] = []
        flush = False
        dev = self.device
        with self.lock:
            for packet in batch:
                result = dev.send(packet, t)
                if result is None:
                    flush = True
                else:
                    results.append(result)
            # A successful send can produce output too (a rekey initiation): always drain.
            out = dev.datagrams_to_send()
        self._send_batch(results)
        if out:
            self._send_all(out)
        if flush or out:
            self._timer_wake.set()

    def _send_batch(self, results: list[tuple[bytes, Hashable]]) -> None:
        """Send datagrams, coalescing runs of equal size to one endpoint into one UDP_SEGMENT send."""
        n = len(results)
        if n == 1 or not self._gso:
            for data, endpoint in results:
                self._send(data, endpoint)
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
                self._send(data, endpoint)
                i += 1
                continue
            address = endpoint if type(endpoint) is tuple else self._resolve_direct(endpoint)
            if address is None:
                # A relayed (or not yet trusted) path: the transport decides per datagram.
                for data2, endpoint2 in results[i:j]:
                    self._send(data2, endpoint2)
                i = j
                continue
            sock = self._sock6 if ":" in address[0] else self._sock4
            if sock is None:
                self.drops["no_socket_for_family"] += j - i
            else:
                chunk = b"".join([r[0] for r in results[i:j]])
                try:
                    sock.sendmsg([chunk], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))], 0, address)
                    self.io["udp_gso_sends"] += 1
                    self.io["udp_gso_datagrams"] += j - i
                except OSError as exc:
                    if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                        # No segmentation offload on this path: fall back to one send each, for good.
                        log.info("udp_gso_disabled error=%s", exc)
                        self._gso = False
                        for data2, endpoint2 in results[i:j]:
                            self._send(data2, endpoint2)
                    else:
                        self.drops[f"udp_send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += (
                            j - i
                        )
            i = j

    def _resolve_direct(self, endpoint: Hashable) -> tuple[str, int] | None:
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
        packets: list[bytes] = []
        flush = False
        dev = self.device
        with self.lock:
            t = time.time()
            for d in wireguard:
                packet = dev.receive(d, source, t)
                if packet:
                    packets.append(packet)
                else:
                    flush = True
            # Decrypting can produce output too (a confirmed session's held packets, a rekey).
            out = dev.datagrams_to_send()
        flt = self._packet_filter
        if flt is not None and packets:
            kept = flt.filter_inbound(packets, t)
            self.drops["inbound_filter"] += len(packets) - len(kept)
            packets = kept
        io["udp_receives"] += 1
        io["udp_datagrams_received"] += len(datagrams)
        io["tun_packets_written"] += len(packets)
        if self._vnet and packets:
            packets = gro.coalesce(packets)
        io["tun_writes"] += len(packets)
        fd, write = self._tun_fd, os.write
        for packet in packets:
            try:
                write(fd, packet)
            except OSError:
                self.drops["tun_write_error"] += 1
        if out:
            self._send_all(out)
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
                self._send_all(out)
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
        fields = getattr(event, "__dataclass_fields__", {})
        parts = []
        for name in fields:
            value = getattr(event, name)
            if isinstance(value, bytes) and len(value) == 32:
                value = _b64(value)
            elif isinstance(value, tuple):
                value = _format_endpoint(value)
            parts.append(f"{name}={value}")
        log.info("wg_event type=%s %s", type(event).__name__, " ".join(parts))
        try:
            self.paths.wireguard_event(event)
        except Exception:
            self.drops["path_event_error"] += 1
            log.exception("path_event_failed")


def _format_endpoint(endpoint: object) -> str | None:
    if endpoint is None:
        return None
    if isinstance(endpoint, tuple) and len(endpoint) >= 2:
        host, port = endpoint[0], endpoint[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(endpoint)
