"""The data plane: moves packets between a TUN interface and UDP, through the WireGuard Device.

The Device (wiremesh.core.wireguard) is sans-I/O and not thread-safe; the Engine owns the file
descriptors, the threads and the Device, and serialises every Device call with one lock, taken
once per batch. Its packet half, the TUN reader, the UDP readers and the timer thread, is
PacketLoops (packetloops.py); with a receive worker (workers=1, rxworker.py and workerlink.py)
the UDP -> TUN path runs in that process instead.

TUN TSO (gso) is on where the native kernel segments (in Python it cost more than it saved). With
a receive worker this process keeps handshakes, timers, roaming and the outbound path; it has no
packet filter of its own on the inbound path (the worker runs a copy), and if the worker dies,
this process receives again and the tunnel re-handshakes. The Device's clock is Unix time: it
also dates handshake initiations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from wiremesh.agent import netconf, tun, wgreport
from wiremesh.agent.packetloops import TRANSPORT_PREFIX, PacketFilter, PacketLoops, looks_like_wireguard
from wiremesh.agent.paths import Paths
from wiremesh.agent.sender import DatagramSender, open_sockets
from wiremesh.agent.workerlink import ReceiveWorker
from wiremesh.agent.workermessages import Decrypt, FilterCounts
from wiremesh.core import gro, gso
from wiremesh.core.policy.model import FilterRule
from wiremesh.core.wireguard import kernel

log = logging.getLogger(__name__)

# The kernel drops (rather than queues) packets for a TUN whose reader lags and its ring is full;
# local TCP then sees loss and halves its window. A deeper ring absorbs bursts of a Python reader.
TUN_TXQUEUELEN = 4096


def resolve_workers(value: str | int) -> int:
    """`--workers` as a count: "auto" is 1 (a receive worker) when there are 2+ CPUs, else 0."""
    if value == "auto":
        return 1 if (os.cpu_count() or 1) >= 2 else 0
    n = int(value)
    if n not in (0, 1):
        raise ValueError(f"workers must be 0, 1 or auto, not {value!r}")
    return n


class Engine(PacketLoops):
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
            "engine_started interface=%s listen_port=%d mtu=%d ipv6=%s rx_worker=%s kernel=%s",
            self.tun_name,
            self.listen_port,
            self.mtu,
            self._sock6 is not None,
            self._rx.process.pid if self._rx is not None and self._rx.process is not None else "-",
            "native" if kernel.NATIVE else "python",
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
                and data[:4] == TRANSPORT_PREFIX
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
