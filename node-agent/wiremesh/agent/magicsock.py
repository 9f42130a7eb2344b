"""magicsock, the adapter: gives the sans-I/O path selector sockets, relays and a clock.

    ms = MagicSock(engine, node_private_key, netmap.derp_map, disco_key=DiscoKey(disco_private),
                   on_change=report)             # report(endpoints, home_region) -> coord update
    ms.start()                                   # after engine.start() (STUN uses its socket)
    endpoints = ms.set_peers(peer_infos_from_netmap(netmap.peers))  # node key -> endpoint object
    engine.set_peers([PeerConfig(..., endpoint=endpoints[key])])
    ms.set_derp_map(netmap.derp_map)             # on every netmap change
    ms.status(); ms.netcheck(); ms.ping(node_key)
    ms.stop()

One UDP socket (the Engine's) carries WireGuard, disco and STUN: the Engine hands us every
non-WireGuard datagram (`other_datagram_handler`) and every send whose endpoint is one of our
`PeerEndpoint` objects (`transport`). Each peer's WireGuard endpoint is a `PeerEndpoint`, so
WireGuard never sees a raw address: the hot path reads the peer's trusted direct address (no
lock) and sends straight from the Engine's socket, or hands the datagram to the DERP client.
WireGuard datagrams arriving from an address a Pong proved are attributed to the peer's
`PeerEndpoint` (a wrapper around the Device's `receive`: one dict lookup), so the Device does
not roam to raw addresses behind our back.

An asyncio loop in its own thread runs the DERP clients (home region plus regions connected on
demand to reach a peer's home), STUN probes to every region (public address, latency, whether
the NAT's mapping varies by destination), PCP or NAT-PMP port mapping on the default gateway, the
disco timers, and the birthday probe sockets.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from nacl.public import PrivateKey

from wiremesh.agent import hostnet
from wiremesh.core import disco, stun
from wiremesh.core.derp.connection import PacketReceived
from wiremesh.core.disco import DiscoKey, Endpoint, EndpointKind
from wiremesh.core.magicsock import (
    PRIMARY_SOCKET,
    AddressConfirmed,
    CloseProbeSockets,
    Destination,
    Direct,
    MappingChanged,
    OpenProbeSockets,
    PathChanged,
    PeerInfo,
    PeerPath,
    PingResult,
    Relay,
    choose_home_region,
)
from wiremesh.core.magicsock import (
    MagicSock as PathSelector,
)
from wiremesh.core.magicsock.derpmap import DerpMapError, Region, parse_derp_map
from wiremesh.core.wireguard import EndpointObserved

log = logging.getLogger("wiremesh.agent.magicsock")

STUN_TIMEOUT = 0.7
STUN_TRIES = 3
NETCHECK_INTERVAL = 20.0  # re-STUN this often: notices NAT rebinding and relay latency changes
PATH_LOSS_NETCHECK_SPACING = 5.0  # and when a direct path is lost, at most this often
TIMER_MAX_SLEEP = 0.1
DERP_CONNECT_TIMEOUT = 5.0
DERP_RETRY = 2.0
REGION_DOWN_FOR = 15.0  # a relay that failed is not chosen as home for this long
NATPMP_PORT = 5351
NATPMP_LIFETIME = 7200
NATPMP_TIMEOUT = 0.5
PROBE_SOCKET_LIMIT = 1024
RELAY_BACKLOG = 32
RELAY_PING_INTERVAL = 4.0
RELAY_PING_TIMEOUT = 3.0
HANDSHAKE_INITIATION_LEN = 148
INITIATION_RESEND_WINDOW = 4.5  # WireGuard retries an unanswered initiation after 5 s itself  # packets held per relay region while it is being connected  # birthday probe sockets open at once, all peers together


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


class PeerEndpoint:
    """The WireGuard endpoint object for one peer: hashable by identity, shows the live path."""

    __slots__ = ("__weakref__", "node_key", "path")

    def __init__(self, node_key: bytes, path: PeerPath) -> None:
        self.node_key = node_key
        self.path = path

    def __str__(self) -> str:
        direct = self.path.trusted(time.monotonic())
        if direct is not None:
            return str(direct)
        region = self.path.derp_route or self.path.home_region
        return f"relay:{region}" if region is not None else "relay"

    __repr__ = __str__


class MagicSock:
    """See the module docstring. Thread-safe: the Engine's threads call in, the loop thread runs
    everything else; the path selector is guarded by one lock."""

    def __init__(
        self,
        engine: Any,
        node_private_key: bytes,
        derp_map: Mapping[str, Any] | None = None,
        *,
        disco_key: DiscoKey | None = None,
        on_change: Callable[[tuple[str, ...], int | None], None] | None = None,
        birthday_sockets: int | None = None,
        birthday_spray: int | None = None,
        portmap: bool = True,
    ) -> None:
        self.engine = engine
        self.node_private = PrivateKey(node_private_key)
        self.node_key = bytes(self.node_private.public_key)
        self.disco = disco_key or DiscoKey()
        self.regions: dict[int, Region] = parse_derp_map(derp_map)
        self.on_change = on_change
        self.portmap_enabled = portmap
        self.core = PathSelector(self.node_key, self.disco, time.monotonic())
        if birthday_sockets is not None:
            self.core.birthday_sockets = birthday_sockets
        if birthday_spray is not None:
            self.core.birthday_spray = birthday_spray
        self._lock = threading.Lock()
        self._endpoints: dict[bytes, PeerEndpoint] = {}
        self._aliases: dict[Hashable, PeerEndpoint] = {}
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        self.home_region: int | None = None
        self.region_latency: dict[int, float] = {}
        self._region_down: dict[int, float] = {}
        self.public_address: tuple[str, int] | None = None
        self.mapping_varies: bool | None = None
        self.udp_works: bool | None = None
        self.portmap_address: tuple[str, int] | None = None
        self.portmap_protocol: str | None = None
        self.local_endpoints: tuple[Endpoint, ...] = ()
        self._stun_waiters: dict[bytes, concurrent.futures.Future[tuple[str, int]]] = {}
        self._derp: dict[int, Any] = {}
        self._derp_connecting: dict[int, asyncio.Task[Any]] = {}
        self._relay_backlog: dict[int, list[tuple[Relay, bytes]]] = {}
        self._initiations: dict[bytes, tuple[bytes, float]] = {}
        self._home_lock: asyncio.Lock | None = None
        self._netcheck_task: asyncio.Future[None] | None = None
        self._probe_socks: dict[int, tuple[socket.socket, bytes]] = {}
        self._next_probe_id = 1
        self._ping_waiters: dict[bytes, concurrent.futures.Future[PingResult]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._last_reported: tuple[tuple[str, ...], int | None] | None = None
        self._last_path_loss_netcheck = -PATH_LOSS_NETCHECK_SPACING

    # ------------------------------------------------------------------ PathSelection (paths.py)

    def send_to_peer(self, data: bytes, endpoint: Hashable) -> None:
        """WireGuard's send to a peer: the hot path."""
        if type(endpoint) is not PeerEndpoint:
            self.drops["unknown_endpoint"] += 1
            return
        now = time.monotonic()
        path = endpoint.path
        best = path.best
        if best is not None and now < path.trust_until:
            path.last_send = now
            direct = best.direct
            if direct.socket == PRIMARY_SOCKET:
                self.engine.send_datagram(data, direct.address)
            else:
                self._send_probe_socket(data, direct)
            return
        with self._lock:
            dest = self.core.route(endpoint.node_key, now)
            out = self.core.datagrams_to_send()
        self._emit(out)
        if len(data) == HANDSHAKE_INITIATION_LEN and data[0] == 1:
            # Kept so that it can be re-sent at once over a better route (see _resend_initiation).
            self._initiations[endpoint.node_key] = (data, now)
        if dest is None:
            self.drops["no_route"] += 1
        else:
            self._send_to(data, dest)

    def resolve_direct(self, endpoint: Hashable) -> tuple[str, int] | None:
        """Where `send_to_peer` would send to `endpoint` from the Engine's own socket right now (a
        trusted direct path), else None. The Engine asks once per run of datagrams and sends
        the run in one UDP_SEGMENT batch; relayed and probe-socket paths stay with send_to_peer."""
        if type(endpoint) is not PeerEndpoint:
            return None
        now = time.monotonic()
        path = endpoint.path
        direct = path.trusted(now)
        if direct is None or direct.socket != PRIMARY_SOCKET:
            return None
        path.last_send = now
        return direct.address

    def source_endpoint(self, address: tuple[str, int]) -> Hashable:
        """A proven address of a peer's (a Pong came from it, or WireGuard authenticated the peer
        there) is that peer's PeerEndpoint, so the Device attributes its datagrams right."""
        return self._aliases.get(address, address)

    def receive_other(self, data: bytes, addr: tuple[str, int]) -> bool:
        """A datagram on the Engine's socket that is not WireGuard: disco or STUN."""
        if disco.is_disco(data):
            self._receive_disco(data, Direct(addr))
        elif stun.is_stun(data):
            self._receive_stun(data)
        else:
            self.drops["unknown_datagram"] += 1
        return True

    def wireguard_event(self, event: object) -> None:
        # WireGuard authenticated a peer at an address we had not proven (its NAT rebound and
        # WireGuard got through first; our peers do not roam): adopt the address as an alias
        # and a candidate.
        if not isinstance(event, EndpointObserved):
            return
        ep = self._endpoints.get(event.public_key)
        addr = event.endpoint
        if ep is None or type(addr) is not tuple or len(addr) != 2:
            return
        self._aliases[addr] = ep
        with self._lock:
            self.core.note_wireguard_source(ep.node_key, addr, time.monotonic())

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> None:
        """Start the loop thread: first netcheck, home relay connection, timers."""
        self._raise_fd_limit()
        self._thread = threading.Thread(target=self._run_loop, name="wm-magicsock", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)

    def stop(self) -> None:
        self._stopping = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                fut.result(5)
        if self._thread is not None:
            self._thread.join(5)
        for sock, _ in self._probe_socks.values():
            sock.close()
        self._probe_socks.clear()

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("magicsock_loop_failed")
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self._tasks = [asyncio.create_task(self._timer_loop(), name="magicsock-timers")]
        try:
            await self._netcheck_and_home()
        except Exception:
            log.exception("initial_netcheck_failed")
        finally:
            self._ready.set()
        self._tasks.append(asyncio.create_task(self._periodic(), name="magicsock-netcheck"))
        self._tasks.append(asyncio.create_task(self._relay_watchdog(), name="magicsock-relay-watchdog"))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        for task in [*self._tasks, *self._derp_connecting.values()]:
            task.cancel()
        for client in list(self._derp.values()):
            with contextlib.suppress(Exception):
                await client.close()
        self._derp.clear()

    @staticmethod
    def _raise_fd_limit() -> None:
        # Birthday probes need a few hundred sockets at once.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
        if soft < want:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    # ------------------------------------------------------------------ configuration

    def set_peers(self, peers: Iterable[PeerInfo]) -> dict[bytes, PeerEndpoint]:
        """Reconcile with the netmap; returns each peer's WireGuard endpoint object."""
        peers = list(peers)
        moved = [
            p.node_key
            for p in peers
            if p.node_key in self.core.peers and p.home_region != self.core.peers[p.node_key].home_region
        ]
        with self._lock:
            self.core.set_peers(peers, time.monotonic())
            for key in list(self._endpoints):
                if key not in self.core.peers:
                    del self._endpoints[key]
            for key, path in self.core.peers.items():
                ep = self._endpoints.get(key)
                if ep is None or ep.path is not path:
                    self._endpoints[key] = PeerEndpoint(key, path)
            live = set(self._endpoints.values())
            for addr, ep in list(self._aliases.items()):
                if ep not in live:
                    del self._aliases[addr]
            out = self.core.datagrams_to_send()
        self._emit(out)
        self._wake_loop()
        for key in moved:
            self._resend_initiation(key)
        return dict(self._endpoints)

    def _resend_initiation(self, node_key: bytes) -> None:
        """Re-send the peer's pending WireGuard handshake initiation over its current route.

        The first initiation often goes out before any route is known to work (the relay region
        of a peer that has just started, a direct path not yet punched) and is lost; WireGuard
        itself would only retry 5 s later. A duplicate that did arrive is rejected by the
        responder's timestamp check, so re-sending is harmless.
        """
        entry = self._initiations.pop(node_key, None)
        ep = self._endpoints.get(node_key)
        if entry is None or ep is None or time.monotonic() - entry[1] > INITIATION_RESEND_WINDOW:
            return
        self.counters["initiations_resent"] += 1
        self.send_to_peer(entry[0], ep)

    def endpoint_for(self, node_key: bytes) -> PeerEndpoint | None:
        return self._endpoints.get(node_key)

    def set_derp_map(self, derp_map: Mapping[str, Any] | None) -> None:
        """Follow the netmap's relay map; a malformed one is logged and the current one kept."""
        try:
            regions = parse_derp_map(derp_map)
        except DerpMapError as exc:
            self.drops["bad_derp_map"] += 1
            log.warning("derp_map_rejected error=%s", exc)
            return
        if regions == self.regions:
            return
        self.regions = regions
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._netcheck_and_home(), self._loop)

    # ------------------------------------------------------------------ sending

    def _emit(self, out: list[tuple[bytes, Destination]]) -> None:
        for data, dest in out:
            self._send_to(data, dest)

    def _send_to(self, data: bytes, dest: Destination) -> None:
        if isinstance(dest, Direct):
            if dest.socket == PRIMARY_SOCKET:
                self.engine.send_datagram(data, dest.address)
            else:
                self._send_probe_socket(data, dest)
            return
        loop = self._loop
        if loop is None or loop.is_closed():
            self.drops["relay_not_started"] += 1
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._derp_send(dest, data)
        else:
            loop.call_soon_threadsafe(self._derp_send, dest, data)

    def _send_probe_socket(self, data: bytes, dest: Direct) -> None:
        entry = self._probe_socks.get(dest.socket)
        if entry is None:
            self.drops["probe_socket_closed"] += 1
            return
        try:
            entry[0].sendto(data, dest.address)
        except OSError as exc:
            self.drops[f"probe_send_{errno.errorcode.get(exc.errno or 0, 'error').lower()}"] += 1

    def _derp_send(self, dest: Relay, data: bytes) -> None:
        client = self._derp.get(dest.region)
        if client is None or client.closed:
            self._connect_region_soon(dest.region)
            if dest.region in self._derp_connecting:
                # Hold a few packets (a handshake, a CallMeMaybe) until the relay is connected,
                # rather than losing them and waiting for WireGuard's 5 s retry.
                queue = self._relay_backlog.setdefault(dest.region, [])
                if len(queue) < RELAY_BACKLOG:
                    queue.append((dest, data))
                    return
            # Otherwise try our home: the peer may be there too.
            client = self._derp.get(self.home_region) if self.home_region is not None else None
            if client is None or client.closed:
                self.drops["relay_unavailable"] += 1
                return
        try:
            client.send_nowait(dest.node_key, data)
        except Exception:
            self.drops["relay_send_failed"] += 1

    def _wake_loop(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)

    # ------------------------------------------------------------------ receiving

    def _receive_disco(self, data: bytes, source: Destination) -> None:
        with self._lock:
            self.core.receive_disco(data, source, time.monotonic())
            out = self.core.datagrams_to_send()
            events = self._drain_events()
        self._emit(out)
        self._handle_events(events)
        self._wake_loop()

    def _receive_stun(self, data: bytes) -> None:
        try:
            message = stun.parse_message(data)
        except stun.StunError:
            self.drops["stun_malformed"] += 1
            return
        fut = self._stun_waiters.pop(message.transaction_id, None)
        mapped = stun.mapped_address(message)
        if fut is None or mapped is None:
            self.drops["stun_unexpected"] += 1
            return
        if not fut.done():
            fut.set_result(mapped)

    def _inject_wireguard(self, data: bytes, endpoint: PeerEndpoint) -> None:
        """A WireGuard datagram that came through a relay or a probe socket."""
        self.engine.receive_datagram(data, endpoint)

    # ------------------------------------------------------------------ events

    def _drain_events(self) -> list[object]:
        events: list[object] = []
        while (event := self.core.next_event()) is not None:
            events.append(event)
        return events

    def _handle_events(self, events: list[object]) -> None:
        for event in events:
            if isinstance(event, AddressConfirmed):
                if event.direct.socket == PRIMARY_SOCKET:
                    ep = self._endpoints.get(event.node_key)
                    if ep is not None:
                        self._aliases[event.direct.address] = ep
            elif isinstance(event, PathChanged):
                log.info("peer_path peer=%s path=%s", _b64(event.node_key)[:8], event.direct or "relay")
                if event.direct is not None:
                    self._resend_initiation(event.node_key)
                else:
                    # A lost direct path is often our NAT rebinding: learn our new public
                    # address now rather than at the next periodic netcheck, so that the
                    # CallMeMaybes of the discovery that follows carry it.
                    self._call_in_loop(self._netcheck_after_path_loss)
            elif isinstance(event, PingResult):
                fut = self._ping_waiters.pop(event.tx_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(event)
            elif isinstance(event, MappingChanged):
                log.info(
                    "mapping_changed published=%s observed=%s", _fmt(event.published), _fmt(event.observed)
                )
                self._call_in_loop(self._netcheck_soon)
            elif isinstance(event, OpenProbeSockets):
                self._call_in_loop(self._open_probe_sockets, event.node_key, event.count)
            elif isinstance(event, CloseProbeSockets):
                self._call_in_loop(self._close_probe_sockets, event.node_key, event.keep)

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ birthday probe sockets

    def _open_probe_sockets(self, node_key: bytes, count: int) -> None:
        assert self._loop is not None
        self._close_probe_sockets(node_key, ())
        count = min(count, PROBE_SOCKET_LIMIT - len(self._probe_socks))
        ids: list[int] = []
        for _ in range(max(count, 0)):
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind(("0.0.0.0", 0))
            except OSError as exc:
                self.drops["probe_socket_open_failed"] += 1
                log.warning("probe_socket_open_failed error=%s", exc)
                break
            sid = self._next_probe_id
            self._next_probe_id += 1
            self._probe_socks[sid] = (sock, node_key)
            self._loop.add_reader(sock.fileno(), self._on_probe_readable, sid)
            ids.append(sid)
        log.info("birthday_probe peer=%s sockets=%d", _b64(node_key)[:8], len(ids))
        with self._lock:
            self.core.probe_sockets_opened(node_key, ids, time.monotonic())
            out = self.core.datagrams_to_send()
        self._emit(out)

    def _close_probe_sockets(self, node_key: bytes, keep: tuple[int, ...]) -> None:
        for sid, (sock, owner) in list(self._probe_socks.items()):
            if owner == node_key and sid not in keep:
                if self._loop is not None:
                    with contextlib.suppress(Exception):
                        self._loop.remove_reader(sock.fileno())
                sock.close()
                del self._probe_socks[sid]

    def _on_probe_readable(self, sid: int) -> None:
        entry = self._probe_socks.get(sid)
        if entry is None:
            return
        sock, node_key = entry
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.drops["probe_recv_error"] += 1
                return
            addr = (addr[0], addr[1])
            if disco.is_disco(data):
                self._receive_disco(data, Direct(addr, sid))
            elif len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\0\0\0":
                ep = self._endpoints.get(node_key)
                if ep is not None:
                    self._inject_wireguard(data, ep)
            else:
                self.drops["probe_unknown_datagram"] += 1

    # ------------------------------------------------------------------ timers

    async def _timer_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            now = time.monotonic()
            with self._lock:
                self.core.handle_timer(now)
                out = self.core.datagrams_to_send()
                events = self._drain_events()
                deadline = self.core.next_timer()
            self._emit(out)
            self._handle_events(events)
            sleep = TIMER_MAX_SLEEP if deadline is None else deadline - time.monotonic()
            sleep = min(max(sleep, 0.002), TIMER_MAX_SLEEP)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

    async def _periodic(self) -> None:
        while not self._stopping:
            await asyncio.sleep(NETCHECK_INTERVAL)
            try:
                await self._netcheck_and_home()
            except Exception:
                log.exception("netcheck_failed")

    def _netcheck_after_path_loss(self) -> None:
        now = time.monotonic()
        if now - self._last_path_loss_netcheck < PATH_LOSS_NETCHECK_SPACING:
            return
        self._last_path_loss_netcheck = now
        self.counters["netcheck_after_path_loss"] += 1
        self._netcheck_soon()

    def _netcheck_soon(self) -> None:
        if self._netcheck_task is None or self._netcheck_task.done():
            self._netcheck_task = asyncio.ensure_future(self._netcheck_and_home())

    async def _relay_watchdog(self) -> None:
        """Ping every connected relay: a NAT that forgot our TCP connection (rebinding) drops the
        relay's FIN, so a dead relay can look connected until we send something."""
        while not self._stopping:
            await asyncio.sleep(RELAY_PING_INTERVAL)
            for region, client in list(self._derp.items()):
                if client.closed:
                    continue
                try:
                    await client.ping(RELAY_PING_TIMEOUT)
                except Exception as exc:
                    log.info("relay_unresponsive region=%s error=%r", region, exc)
                    with contextlib.suppress(Exception):
                        await client.close()

    # ------------------------------------------------------------------ netcheck and home relay

    async def _stun(self, server: tuple[str, int]) -> tuple[tuple[str, int], float] | None:
        """One Binding exchange from the Engine's socket: (mapped address, round trip) or None."""
        for _ in range(STUN_TRIES):
            tx = stun.new_transaction_id()
            fut: concurrent.futures.Future[tuple[str, int]] = concurrent.futures.Future()
            self._stun_waiters[tx] = fut
            started = time.monotonic()
            try:
                self.engine.send_datagram(bytes(stun.binding_request(transaction_id=tx)), server)
                mapped = await asyncio.wait_for(asyncio.wrap_future(fut), STUN_TIMEOUT)
                return mapped, time.monotonic() - started
            except TimeoutError:
                continue
            finally:
                self._stun_waiters.pop(tx, None)
        return None

    async def _derp_latency(self, region: Region) -> float | None:
        client = self._derp.get(region.id)
        try:
            if client is None or client.closed:
                started = time.monotonic()
                _, writer = await asyncio.wait_for(asyncio.open_connection(*region.relay), 2.0)
                writer.close()
                return time.monotonic() - started
            return float(await client.ping(2.0))
        except (OSError, TimeoutError, Exception):
            return None

    async def netcheck(self) -> dict[str, Any]:
        """Probe every region now; returns the report (`wiremesh netcheck`)."""
        await self._netcheck_and_home()
        return self.netcheck_report()

    def netcheck_report(self) -> dict[str, Any]:
        return {
            "udp": self.udp_works,
            "public_address": None if self.public_address is None else _fmt(self.public_address),
            "mapping_varies_by_destination": self.mapping_varies,
            "port_mapping": self.portmap_protocol,
            "port_mapped_address": None if self.portmap_address is None else _fmt(self.portmap_address),
            "preferred_region": self.home_region,
            "region_latency_ms": {
                str(r): round(lat * 1000, 2) for r, lat in sorted(self.region_latency.items())
            },
            "local_endpoints": [_fmt(ep.address) for ep in self.local_endpoints],
        }

    async def _netcheck_and_home(self) -> None:
        # The port-mapping request runs beside STUN: on a router without PCP/NAT-PMP it only
        # times out, and the home relay should not wait for that.
        portmap = asyncio.ensure_future(self._portmap()) if self.portmap_enabled else None
        regions = list(self.regions.values())
        stun_results = await asyncio.gather(*(self._stun(r.stun) if r.stun else _none() for r in regions))
        latency: dict[int, float] = {}
        mapped: list[tuple[str, int]] = []
        for region, result in zip(regions, stun_results, strict=True):
            if result is not None:
                mapped.append(result[0])
                latency[region.id] = result[1]
        self.udp_works = bool(mapped) if any(r.stun for r in regions) else None
        if not mapped:
            # No UDP: measure the relays over TCP instead, so a home can still be chosen.
            tcp = await asyncio.gather(*(self._derp_latency(r) for r in regions))
            latency = {r.id: lat for r, lat in zip(regions, tcp, strict=True) if lat is not None}
        self.region_latency = latency
        public = mapped[0] if mapped else None
        self.mapping_varies = len(set(mapped)) > 1 if len(mapped) > 1 else None
        changed_public = public != self.public_address
        self.public_address = public
        await self._set_local_endpoints()
        if changed_public and public is not None:
            log.info("public_address address=%s mapping_varies=%s", _fmt(public), self.mapping_varies)
        await self._choose_home()
        if portmap is not None:
            before = self.portmap_address
            await portmap
            if self.portmap_address != before:
                await self._set_local_endpoints()

    def _interface_endpoints(self) -> list[Endpoint]:
        eps = []
        for text in hostnet.local_endpoints(self.engine.listen_port, exclude=(self.engine.tun_name,)):
            host, _, p = text.rpartition(":")
            eps.append(Endpoint((host.strip("[]"), int(p)), EndpointKind.LOCAL))
        return eps

    async def _set_local_endpoints(self) -> None:
        eps: list[Endpoint] = []
        try:
            # pyroute2 refuses to run its blocking API inside a running event loop.
            eps = await asyncio.get_running_loop().run_in_executor(None, self._interface_endpoints)
        except Exception as exc:
            log.warning("local_endpoints_failed error=%s", exc)
        if self.portmap_address is not None:
            eps.insert(0, Endpoint(self.portmap_address, EndpointKind.PORTMAP))
        if self.public_address is not None:
            eps.insert(0, Endpoint(self.public_address, EndpointKind.STUN))
        unique = tuple(dict.fromkeys(eps))
        # A public host's STUN address equals its local one: keep one entry, the STUN kind.
        seen: set[tuple[str, int]] = set()
        deduped = []
        for ep in unique:
            if ep.address not in seen:
                seen.add(ep.address)
                deduped.append(ep)
        self.local_endpoints = tuple(deduped)
        with self._lock:
            self.core.set_local_endpoints(self.local_endpoints, self.mapping_varies, time.monotonic())
        self._report()

    async def _choose_home(self) -> None:
        # One decision at a time: a periodic netcheck and a lost relay must not race each other
        # (the netcheck could otherwise re-elect the relay that has just gone).
        if self._home_lock is None:
            self._home_lock = asyncio.Lock()
        async with self._home_lock:
            await self._choose_home_locked()

    async def _choose_home_locked(self) -> None:
        now = time.monotonic()
        down = {r for r, until in self._region_down.items() if until > now}
        home = choose_home_region(self.region_latency, self.home_region, down)
        if home is None:
            candidates = [r for r in self.regions if r not in down] or list(self.regions)
            home = (
                self.home_region
                if self.home_region in candidates
                else (min(candidates) if candidates else None)
            )
        if home is None:
            return
        client = await self._connect_region(home)
        if client is not None and client.closed:
            client = None
        if client is None and len(self.regions) > 1:
            self._region_down[home] = time.monotonic() + REGION_DOWN_FOR
            for other in sorted(self.regions, key=lambda r: self.region_latency.get(r, 1e9)):
                if other != home and other not in down and await self._connect_region(other) is not None:
                    home = other
                    break
            else:
                return
        if home != self.home_region:
            log.info("home_region region=%s previous=%s", home, self.home_region)
            self.home_region = home
            with self._lock:
                self.core.set_home_region(home)
            client = self._derp.get(home)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.note_preferred(True)
            self._report()

    def _report(self) -> None:
        state = (tuple(_fmt(ep.address) for ep in self.local_endpoints), self.home_region)
        if state == self._last_reported or self.on_change is None:
            return
        self._last_reported = state
        try:
            self.on_change(*state)
        except Exception:
            log.exception("on_change_failed")

    # ------------------------------------------------------------------ DERP connections

    def _connect_region_soon(self, region: int) -> None:
        if region in self._derp_connecting or region not in self.regions or self._stopping:
            return
        until = self._region_down.get(region, 0.0)
        if until > time.monotonic():
            return
        self._derp_connecting[region] = asyncio.ensure_future(self._connect_region(region))

    async def _connect_region(self, region_id: int) -> Any:
        client = self._derp.get(region_id)
        if client is not None and not client.closed:
            return client
        pending = self._derp_connecting.get(region_id)
        if pending is not None and pending is not asyncio.current_task():
            with contextlib.suppress(Exception):
                return await asyncio.shield(pending)
            return None
        from wiremesh.agent.derpclient import DerpClient

        region = self.regions.get(region_id)
        if region is None:
            return None
        try:
            client = await DerpClient.connect(
                region.relay[0], region.relay[1], self.node_private, timeout=DERP_CONNECT_TIMEOUT
            )
        except Exception as exc:
            log.info("relay_connect_failed region=%s error=%s", region_id, exc)
            self._region_down[region_id] = time.monotonic() + DERP_RETRY
            return None
        finally:
            if self._derp_connecting.get(region_id) is asyncio.current_task():
                del self._derp_connecting[region_id]
            backlog = self._relay_backlog.pop(region_id, [])
        self._derp[region_id] = client
        for dest, data in backlog:
            self._derp_send(dest, data)
        self._region_down.pop(region_id, None)
        self.counters["relay_connects"] += 1
        log.info("relay_connected region=%s", region_id)
        self._tasks.append(asyncio.create_task(self._derp_reader(region_id, client)))
        return client

    async def _derp_reader(self, region: int, client: Any) -> None:
        try:
            while True:
                event = await client.recv()
                if not isinstance(event, PacketReceived):
                    continue
                data, src = event.packet, event.src
                if disco.is_disco(data):
                    self._receive_disco(data, Relay(region, src))
                    continue
                ep = self._endpoints.get(src)
                if ep is None:
                    self.drops["relay_unknown_peer"] += 1
                    continue
                with self._lock:
                    self.core.note_relay_route(src, region)
                self._inject_wireguard(data, ep)
        except Exception as exc:
            if self._stopping:
                return
            self.counters["relay_lost"] += 1
            log.warning("relay_lost region=%s error=%s", region, exc)
        finally:
            if self._derp.get(region) is client:
                del self._derp[region]
            with self._lock:
                self.core.forget_relay_region(region)
        if self._stopping:
            return
        self._region_down[region] = time.monotonic() + REGION_DOWN_FOR
        if region == self.home_region:
            self.region_latency.pop(region, None)
            self.home_region = None
            await self._choose_home()

    # ------------------------------------------------------------------ port mapping (PCP, NAT-PMP)

    async def _portmap(self) -> None:
        gateway = _default_gateway()
        if gateway is None:
            return
        loop = asyncio.get_running_loop()
        for protocol, request in (("pcp", pcp_map), ("nat-pmp", natpmp_map)):
            result = await loop.run_in_executor(None, request, gateway, self.engine.listen_port)
            if result is not None:
                self.portmap_address = result
                self.portmap_protocol = protocol
                return
        self.portmap_address = None
        self.portmap_protocol = None

    # ------------------------------------------------------------------ status and ping

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            peers = {_b64(k): self.core.peer_status(k, now) for k in self.core.peers}
            drops = dict(self.core.drops)
            counters = dict(self.core.counters)
        for k, v in self.drops.items():
            drops[k] = drops.get(k, 0) + v
        return {
            "node_key": _b64(self.node_key),
            "disco_key": _b64(self.disco.public_key),
            "home_region": self.home_region,
            "relays_connected": sorted(r for r, c in self._derp.items() if not c.closed),
            "netcheck": self.netcheck_report(),
            "peers": peers,
            "drops": drops,
            "counters": {**counters, **self.counters},
            "probe_sockets": len(self._probe_socks),
        }

    def peer_path(self, node_key: bytes) -> dict[str, Any] | None:
        with self._lock:
            if node_key not in self.core.peers:
                return None
            return self.core.peer_status(node_key, time.monotonic())

    async def ping(self, node_key: bytes, timeout: float = 2.0) -> list[dict[str, Any]]:
        """One `wiremesh ping` round: every answer (relay and direct) within `timeout`."""
        now = time.monotonic()
        with self._lock:
            txs = self.core.ping(node_key, now)
            out = self.core.datagrams_to_send()
        futs = []
        for tx in txs:
            fut: concurrent.futures.Future[PingResult] = concurrent.futures.Future()
            self._ping_waiters[tx] = fut
            futs.append(asyncio.wrap_future(fut))
        self._emit(out)
        done, pending = await asyncio.wait(futs, timeout=timeout) if futs else (set(), set())
        for f in pending:
            f.cancel()
        for tx in txs:
            self._ping_waiters.pop(tx, None)
        results = sorted((f.result() for f in done), key=lambda r: r.latency)
        return [
            {
                "via": "direct" if isinstance(r.via, Direct) else "relay",
                "address": str(r.via) if isinstance(r.via, Direct) else None,
                "region": r.via.region if isinstance(r.via, Relay) else None,
                "latency_ms": round(r.latency * 1000, 2),
            }
            for r in results
        ]

    def run_coroutine(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the magicsock loop from another thread (the local API's)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)


async def _none() -> None:
    return None


def _fmt(addr: tuple[str, int]) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _default_gateway() -> str | None:
    """The IPv4 default gateway of this namespace, from /proc/net/route."""
    try:
        with open("/proc/net/route") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) > 2 and fields[1] == "00000000":
                    return str(ipaddress.IPv4Address(struct.pack("<I", int(fields[2], 16))))
    except (OSError, ValueError, StopIteration):
        return None
    return None


PCP_VERSION = 2
PCP_OPCODE_MAP = 1
_PCP_MAP = struct.Struct("!BBHI16s12sB3xHH16s")  # common request header + MAP opcode body (60 bytes)


def _v4_mapped(ip: str) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + socket.inet_aton(ip)


def pcp_map(gateway: str, internal_port: int, lifetime: int = NATPMP_LIFETIME) -> tuple[str, int] | None:
    """Ask the gateway for a UDP mapping with PCP (RFC 6887 MAP): (public IP, port) or None."""
    nonce = os.urandom(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(NATPMP_TIMEOUT)
        try:
            sock.connect((gateway, NATPMP_PORT))
            client_ip = sock.getsockname()[0]
            request = _PCP_MAP.pack(
                PCP_VERSION, PCP_OPCODE_MAP, 0, lifetime, _v4_mapped(client_ip), nonce,
                socket.IPPROTO_UDP, internal_port, internal_port, bytes(16),
            )  # fmt: skip
            sock.send(request)
            data = sock.recv(1100)
        except OSError:
            return None
    # Response: version, R|opcode, reserved, result code, lifetime, epoch, 12 reserved, then MAP.
    if len(data) < 60 or data[0] != PCP_VERSION or data[1] != 0x80 | PCP_OPCODE_MAP or data[3] != 0:
        return None
    if data[24:36] != nonce:
        return None
    (external_port,) = struct.unpack_from("!H", data, 42)
    external = ipaddress.IPv6Address(data[44:60])
    ip = external.ipv4_mapped
    if ip is None or external_port == 0:
        return None
    return str(ip), external_port


def natpmp_map(gateway: str, internal_port: int, lifetime: int = NATPMP_LIFETIME) -> tuple[str, int] | None:
    """Ask the gateway for a UDP mapping to `internal_port` (RFC 6886): (public IP, port) or None.

    Blocking (a few hundred ms at most); the adapter runs it in an executor.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(NATPMP_TIMEOUT)
        try:
            sock.sendto(struct.pack("!BB", 0, 0), (gateway, NATPMP_PORT))
            data, _ = sock.recvfrom(64)
            if len(data) < 12 or data[0] != 0 or data[1] != 128 or struct.unpack_from("!H", data, 2)[0] != 0:
                return None
            public_ip = socket.inet_ntoa(data[8:12])
            request = struct.pack("!BBHHHI", 0, 1, 0, internal_port, internal_port, lifetime)
            sock.sendto(request, (gateway, NATPMP_PORT))
            data, _ = sock.recvfrom(64)
        except OSError:
            return None
    if len(data) < 16 or data[0] != 0 or data[1] != 129:
        return None
    result, _epoch, internal, external, _life = struct.unpack_from("!HIHHI", data, 2)
    if result != 0 or internal != internal_port or external == 0:
        return None
    return public_ip, external


# ----------------------------------------------------------------------------- mesh mode glue


def peer_infos_from_netmap(nodes: Iterable[Any]) -> list[PeerInfo]:
    """PeerInfo for each netmap peer (`wiremesh.core.netmap.Node`): what mesh mode passes to
    `MagicSock.set_peers`. Peers with an unreadable key are skipped; bad endpoints are ignored."""
    from wiremesh.core import crypto

    infos = []
    for node in nodes:
        try:
            node_key = crypto.decode_key(node.node_key)
        except ValueError:
            continue
        disco_key = None
        if node.disco_key:
            with contextlib.suppress(ValueError):
                disco_key = crypto.decode_key(node.disco_key)
        eps = []
        for text in node.endpoints:
            host, _, port = str(text).rpartition(":")
            host = host.strip("[]")
            if port.isdigit() and 0 < int(port) < 65536:
                with contextlib.suppress(ValueError):
                    ipaddress.ip_address(host)
                    eps.append(Endpoint((host, int(port))))
        infos.append(PeerInfo(node_key, disco_key, tuple(eps), node.home_relay))
    return infos


class MeshBinding:
    """Plugs a MagicSock into mesh mode (wiremesh.agent.mesh.MeshAgent) through its seams:

    - `peer_endpoints`: once the netmap carries a relay map, every usable peer's WireGuard
      endpoint is its PeerEndpoint (without one, mesh mode keeps its first-endpoint guess);
    - `endpoint_strings` (the agent's endpoint source): STUN, port-mapped and local endpoints;
    - our home region and endpoints are reported to coord (`ControlClient.update`) on change;
    - `local_api_backend(agent)` adds `netcheck` and `ping` to the agent's local API.
    """

    def __init__(self, magicsock: MagicSock) -> None:
        self.magicsock = magicsock
        self.agent: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, agent: Any) -> None:
        """Call from the agent's event loop, before `agent.run()`."""
        self.agent = agent
        self._loop = asyncio.get_running_loop()
        agent.peer_endpoints = self.peer_endpoints
        self.magicsock.on_change = self._report

    def peer_endpoints(self, nodes: Any) -> dict[str, Hashable]:
        netmap = getattr(self.agent, "netmap", None)
        self.magicsock.set_derp_map(getattr(netmap, "derp_map", None) or None)
        if not self.magicsock.regions:
            return {}
        from wiremesh.core import crypto

        endpoints = self.magicsock.set_peers(peer_infos_from_netmap(nodes))
        return {crypto.encode_key(key): ep for key, ep in endpoints.items()}

    def endpoint_strings(self) -> tuple[str, ...]:
        ms = self.magicsock
        if ms.local_endpoints:
            return tuple(_fmt(ep.address) for ep in ms.local_endpoints)
        return hostnet.local_endpoints(ms.engine.listen_port, exclude=(ms.engine.tun_name,))

    def _report(self, endpoints: tuple[str, ...], home: int | None) -> None:
        agent, loop = self.agent, self._loop
        if agent is None or loop is None or loop.is_closed():
            return

        async def update() -> None:
            try:
                await agent.client.update(agent.keys.node_public, endpoints=endpoints, home_relay=home)
                log.info("reported endpoints=%s home_region=%s", ",".join(endpoints), home)
            except Exception as exc:
                log.info("report_failed error=%r", str(exc))

        loop.call_soon_threadsafe(lambda: loop.create_task(update()))

    def local_api_backend(self, agent: Any) -> Any:
        return _MeshBackend(agent, self.magicsock)


class _MeshBackend:
    """The agent's local API backend plus netcheck and ping (everything else is the agent's)."""

    def __init__(self, agent: Any, magicsock: MagicSock) -> None:
        self._agent = agent
        self._magicsock = magicsock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._agent, name)

    async def netcheck(self) -> dict[str, Any]:
        ms = self._magicsock
        if ms._loop is None:
            raise _Refused(503, "magicsock is not running")
        result: dict[str, Any] = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(ms.netcheck(), ms._loop)
        )
        return result

    async def ping(self, peer: str) -> dict[str, Any]:
        ms = self._magicsock
        names: dict[str, bytes] = {}
        netmap = getattr(self._agent, "netmap", None)
        from wiremesh.core import crypto

        for node in getattr(netmap, "peers", ()):
            with contextlib.suppress(ValueError):
                node_key = crypto.decode_key(node.node_key)
                for name in (node.name, node.hostname, *(a.split("/")[0] for a in node.addresses)):
                    names[name] = node_key
        key = resolve_peer(peer, names)
        if key is None or ms.endpoint_for(key) is None or ms._loop is None:
            raise _Refused(404, f"no such peer {peer[:60]!r} (or no relay map: magicsock is idle)")
        replies = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ms.ping(key), ms._loop))
        return {"peer": peer, "replies": replies, "path": ms.peer_path(key)}


def attach_to_mesh(engine: Any, node_private_key: bytes, disco_private_key: bytes) -> MeshBinding:
    """A started MagicSock for mesh mode (idle until coord sends a relay map)."""
    ms = MagicSock(engine, node_private_key, None, disco_key=DiscoKey(disco_private_key))
    engine.paths = ms
    ms.start(timeout=0)
    return MeshBinding(ms)


# ----------------------------------------------------------------------------- static mesh mode


class StaticBackend:
    """The local API backend of `python -m wiremesh.agent.magicsock CONFIG`: a node whose peers
    come from a file instead of coord (labs, tests, benchmarks). Serves status, netcheck, ping."""

    def __init__(
        self, engine: Any, magicsock: MagicSock, addresses: list[str], names: dict[str, bytes]
    ) -> None:
        self.engine = engine
        self.magicsock = magicsock
        self.addresses = addresses
        self.names = names  # peer name -> node key

    def status(self) -> dict[str, Any]:
        engine_status = self.engine.status()
        ms = self.magicsock.status()
        by_key = {_b64(k): n for n, k in self.names.items()}
        for key, peer in ms["peers"].items():
            peer["name"] = by_key.get(key)
            live = engine_status["peers"].get(key, {})
            for field in ("rx_bytes", "tx_bytes", "last_handshake_seconds_ago"):
                peer[field] = live.get(field)
        return {"addresses": self.addresses, "magicsock": ms, "engine_drops": engine_status["drops"]}

    def ip(self) -> list[str]:
        return [a.split("/")[0] for a in self.addresses]

    async def up(self) -> dict[str, Any]:
        return {"ok": True}

    async def down(self) -> dict[str, Any]:
        raise _Refused(409, "static mode has no down")

    async def logout(self) -> dict[str, Any]:
        raise _Refused(409, "static mode has no logout")

    async def netcheck(self) -> dict[str, Any]:
        result: dict[str, Any] = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self.magicsock.netcheck(), self._loop())
        )
        return result

    async def ping(self, peer: str) -> dict[str, Any]:
        key = resolve_peer(peer, self.names)
        if key is None or self.magicsock.endpoint_for(key) is None:
            raise _Refused(404, f"no such peer {peer[:60]!r}")
        replies = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self.magicsock.ping(key), self._loop())
        )
        return {"peer": peer, "replies": replies, "path": self.magicsock.peer_path(key)}

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = self.magicsock._loop
        if loop is None:
            raise _Refused(503, "magicsock is not running")
        return loop


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def resolve_peer(text: str, names: Mapping[str, bytes]) -> bytes | None:
    """A peer by name or base64 node key."""
    if text in names:
        return names[text]
    with contextlib.suppress(ValueError):
        raw = base64.b64decode(text, validate=True)
        if len(raw) == 32:
            return raw
    return None


def _published_path(directory: str, node_key: bytes) -> str:
    return os.path.join(directory, base64.urlsafe_b64encode(node_key).decode() + ".json")


def _publish(directory: str, node_key: bytes, endpoints: tuple[str, ...], home: int | None) -> None:
    import json

    path = _published_path(directory, node_key)
    with open(path + ".tmp", "w") as f:
        json.dump({"endpoints": list(endpoints), "home_region": home}, f)
    os.replace(path + ".tmp", path)


def _read_published(directory: str, node_key: bytes) -> dict[str, Any]:
    import json

    try:
        with open(_published_path(directory, node_key)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def static_main(argv: list[str] | None = None) -> int:
    """`python -m wiremesh.agent.magicsock CONFIG.json`: Engine + MagicSock with static peers.

    CONFIG: {"private_key", "disco_private_key" (base64), "tun", "addresses": [...],
    "listen_port", "derp_map", "socket", "peers": [{"name", "node_key", "disco_key",
    "allowed_ips", "home_region", "endpoints": ["ip:port"]}], "birthday_sockets", "birthday_spray",
    "netmap_dir"}. With "netmap_dir", agents publish their endpoints and home region there and
    read their peers' (a stand-in for coord's endpoint updates and netmap).
    """
    import argparse
    import json
    import signal

    from wiremesh.agent.engine import Engine
    from wiremesh.agent.localapi import LocalAPIServer
    from wiremesh.core.wireguard import PeerConfig

    parser = argparse.ArgumentParser(prog="python -m wiremesh.agent.magicsock")
    parser.add_argument("config")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    with open(args.config) as f:
        cfg = json.load(f)
    private = base64.b64decode(cfg["private_key"])
    engine = Engine(
        private, cfg["tun"], listen_port=int(cfg.get("listen_port", 0)), mtu=int(cfg.get("mtu", 1280))
    )
    ms = MagicSock(
        engine,
        private,
        cfg.get("derp_map"),
        disco_key=DiscoKey(base64.b64decode(cfg["disco_private_key"])),
        birthday_sockets=cfg.get("birthday_sockets"),
        birthday_spray=cfg.get("birthday_spray"),
    )
    engine.paths = ms
    engine.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        engine.set_addresses(cfg.get("addresses", []))
        engine.set_routes(["100.64.0.0/10"])
        ms.start()
        names: dict[str, bytes] = {}
        for p in cfg.get("peers", []):
            names[p.get("name") or p["node_key"]] = base64.b64decode(p["node_key"])
        netmap_dir = cfg.get("netmap_dir")

        def peer_infos() -> list[PeerInfo]:
            infos = []
            for p in cfg.get("peers", []):
                key = base64.b64decode(p["node_key"])
                texts, home = list(p.get("endpoints", [])), p.get("home_region")
                if netmap_dir:
                    published = _read_published(netmap_dir, key)
                    texts = texts + list(published.get("endpoints", []))
                    home = published.get("home_region", home)
                eps = []
                for text in texts:
                    host, _, port = str(text).rpartition(":")
                    if port.isdigit():
                        eps.append(Endpoint((host.strip("[]"), int(port))))
                infos.append(PeerInfo(key, base64.b64decode(p["disco_key"]), tuple(eps), home))
            return infos

        if netmap_dir:
            # Stand-in for coord: publish our endpoints and home region where peers read them.
            ms.on_change = lambda eps, home: _publish(netmap_dir, ms.node_key, eps, home)
            ms._report()
        endpoints = ms.set_peers(peer_infos())
        engine.set_peers(
            [
                PeerConfig(
                    public_key=base64.b64decode(p["node_key"]),
                    allowed_ips=tuple(p["allowed_ips"]),
                    endpoint=endpoints[base64.b64decode(p["node_key"])],
                    roam=False,
                )
                for p in cfg.get("peers", [])
            ]
        )
        backend = StaticBackend(engine, ms, list(cfg.get("addresses", [])), names)

        async def serve() -> None:
            server = LocalAPIServer(backend, cfg["socket"])
            await server.start()
            try:
                last: list[PeerInfo] = []
                while not stop.is_set():
                    await asyncio.sleep(0.2)
                    if netmap_dir:
                        infos = peer_infos()
                        if infos != last:
                            last = infos
                            ms.set_peers(infos)
            finally:
                await server.close()

        asyncio.run(serve())
    finally:
        ms.stop()
        engine.stop()
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(static_main())
