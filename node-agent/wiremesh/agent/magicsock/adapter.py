"""magicsock, the adapter: gives the sans-I/O path selector (wiremesh.core.magicsock) sockets,
relays and a clock, and is the Engine's path selection (wiremesh.agent.paths.Paths).

    ms = MagicSock(engine, node_private_key, netmap.derp_map, disco_key=DiscoKey(disco_private),
                   on_change=report)             # report(endpoints, home_region) -> coord update
    engine.paths = ms
    ms.start()                                   # after engine.start() (STUN uses its socket)
    endpoints = ms.set_peers(peer_infos)          # node key -> endpoint object
    engine.set_peers([PeerConfig(..., endpoint=endpoints[key], roam=False)])
    ms.set_derp_map(netmap.derp_map)             # on every netmap change
    ms.status(); ms.netcheck(); ms.ping(node_key)
    ms.stop()

One UDP socket (the Engine's) carries WireGuard, disco and STUN: the Engine hands us every
non-WireGuard datagram (receive_other) and every send whose endpoint is one of our
`PeerEndpoint` objects (send_to_peer, or resolve_direct once per run of datagrams). Each peer's
WireGuard endpoint is a `PeerEndpoint`, so WireGuard never sees a raw address: the hot path reads
the peer's trusted direct address (no lock) and sends straight from the Engine's socket, or hands
the datagram to a relay. Datagrams from an address a Pong proved are attributed to the peer's
`PeerEndpoint` (source_endpoint: one dict lookup per receive); the Device does not roam our
peers, and reports an authenticated packet from elsewhere (EndpointObserved), which we adopt.

An asyncio loop in its own thread runs the relay connections (relays.py), netcheck (STUN, region
latency, port mapping: netcheck.py) and what follows from it, our endpoints and home relay
(reachability.py), the disco timers and the birthday probe sockets (probesockets.py).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import logging
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

from nacl.public import PrivateKey

from wiremesh.agent.magicsock.endpoint import PeerEndpoint
from wiremesh.agent.magicsock.netcheck import Netcheck, fmt
from wiremesh.agent.magicsock.probesockets import ProbeSockets
from wiremesh.agent.magicsock.reachability import Reachability
from wiremesh.agent.magicsock.relays import RelayPool
from wiremesh.core import disco, stun
from wiremesh.core.disco import DiscoKey
from wiremesh.core.magicsock import (
    PRIMARY_SOCKET,
    AddressConfirmed,
    CloseProbeSockets,
    Destination,
    Direct,
    MappingChanged,
    OpenProbeSockets,
    PathChanged,
    PathSelector,
    PeerInfo,
    PingResult,
    Relay,
)
from wiremesh.core.magicsock.derpmap import DerpMapError, Region, parse_derp_map
from wiremesh.core.wireguard import EndpointObserved

log = logging.getLogger("wiremesh.agent.magicsock")

TIMER_MAX_SLEEP = 0.1
HANDSHAKE_INITIATION_LEN = 148
INITIATION_RESEND_WINDOW = 4.5  # WireGuard retries an unanswered initiation after 5 s itself


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


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
        self.relays = RelayPool(self.node_private, self, self.drops)
        self.netcheck_state = Netcheck(
            lambda data, server: self.engine.send_datagram(data, server), self.drops
        )
        self.reachability = Reachability(
            engine,
            self.netcheck_state,
            self.relays,
            self.core,
            self._lock,
            self.counters,
            on_change=on_change,
            portmap=portmap,
        )
        self.probes = ProbeSockets(self, self.drops)
        self.relays.regions = parse_derp_map(derp_map)
        self._initiations: dict[bytes, tuple[bytes, float]] = {}
        self._ping_waiters: dict[bytes, concurrent.futures.Future[PingResult]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wake: asyncio.Event | None = None
        self._ready = threading.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[Any]] = []

    # ------------------------------------------------------------------ the Engine's Paths (paths.py)

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
                self.probes.send(data, direct)
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
            self.netcheck_state.receive_stun(data)
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

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop magicsock runs on (None before start)."""
        return self._loop

    @property
    def regions(self) -> dict[int, Region]:
        return self.relays.regions

    def stop(self) -> None:
        self._stopping = True
        self.relays.stopping = True
        self.reachability.stopping = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            with contextlib.suppress(Exception):
                fut.result(5)
        if self._thread is not None:
            self._thread.join(5)
        self.probes.close_all()

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
            await self.reachability.netcheck_and_home()
        except Exception:
            log.exception("initial_netcheck_failed")
        finally:
            self._ready.set()
        self._tasks.append(asyncio.create_task(self.reachability.periodic(), name="magicsock-netcheck"))
        self._tasks.append(asyncio.create_task(self.relays.watchdog(), name="magicsock-relay-watchdog"))
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.relays.close()

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
        self.relays.regions = regions
        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self.reachability.netcheck_and_home(), self._loop)

    # ------------------------------------------------------------------ sending

    def _emit(self, out: list[tuple[bytes, Destination]]) -> None:
        for data, dest in out:
            self._send_to(data, dest)

    def _send_to(self, data: bytes, dest: Destination) -> None:
        if isinstance(dest, Direct):
            if dest.socket == PRIMARY_SOCKET:
                self.engine.send_datagram(data, dest.address)
            else:
                self.probes.send(data, dest)
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
            self.relays.send(dest, data, self.reachability.home_region)
        else:
            loop.call_soon_threadsafe(self.relays.send, dest, data, self.reachability.home_region)

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
                    self._call_in_loop(self.reachability.netcheck_after_path_loss)
            elif isinstance(event, PingResult):
                fut = self._ping_waiters.pop(event.tx_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(event)
            elif isinstance(event, MappingChanged):
                log.info(
                    "mapping_changed published=%s observed=%s", fmt(event.published), fmt(event.observed)
                )
                self._call_in_loop(self.reachability.netcheck_soon)
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
        ids = self.probes.open(self._loop, node_key, count)
        log.info("birthday_probe peer=%s sockets=%d", _b64(node_key)[:8], len(ids))
        with self._lock:
            self.core.probe_sockets_opened(node_key, ids, time.monotonic())
            out = self.core.datagrams_to_send()
        self._emit(out)

    def _close_probe_sockets(self, node_key: bytes, keep: tuple[int, ...]) -> None:
        self.probes.close(self._loop, node_key, keep)

    def probe_received(self, node_key: bytes, source: Direct, data: bytes) -> None:
        if disco.is_disco(data):
            self._receive_disco(data, source)
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

    # ------------------------------------------------------------------ netcheck (reachability.py)

    async def netcheck(self) -> dict[str, Any]:
        """Probe every region now; returns the report (`wiremesh netcheck`)."""
        await self.reachability.netcheck_and_home()
        return self.reachability.netcheck_report()

    # ------------------------------------------------------------------ relays (RelayHandler)

    def relayed(self, region: int, src: bytes, data: bytes) -> None:
        if disco.is_disco(data):
            self._receive_disco(data, Relay(region, src))
            return
        ep = self._endpoints.get(src)
        if ep is None:
            self.drops["relay_unknown_peer"] += 1
            return
        with self._lock:
            self.core.note_relay_route(src, region)
        self._inject_wireguard(data, ep)

    async def relay_closed(self, region: int, lost: bool) -> None:
        with self._lock:
            self.core.forget_relay_region(region)
        if lost:
            await self.reachability.relay_lost(region)

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
            "home_region": self.reachability.home_region,
            "relays_connected": self.relays.connected(),
            "netcheck": self.reachability.netcheck_report(),
            "peers": peers,
            "drops": drops,
            "counters": {**counters, **self.relays.counters, **self.counters},
            "probe_sockets": len(self.probes),
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
