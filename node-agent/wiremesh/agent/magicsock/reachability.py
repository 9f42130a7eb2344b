"""Where peers can reach us: runs netcheck when it is due (at start, every NETCHECK_INTERVAL, soon
after the NAT's mapping changed, and after a lost direct path, spaced), hands the endpoints it found
to the path selector, elects the home relay from its region latencies, and tells `on_change` (coord,
or a file in labs) our endpoints and home region when they change. Runs on magicsock's event loop;
`home_region` and `local_endpoints` are read from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from wiremesh.agent.magicsock.netcheck import Netcheck, fmt
from wiremesh.agent.magicsock.relays import RelayPool
from wiremesh.core.disco import Endpoint
from wiremesh.core.magicsock import PathSelector

log = logging.getLogger("wiremesh.agent.magicsock")

NETCHECK_INTERVAL = 20.0  # re-STUN this often: notices NAT rebinding and relay latency changes
PATH_LOSS_NETCHECK_SPACING = 5.0  # and when a direct path is lost, at most this often


class Reachability:
    """Our endpoints and home relay, kept current by netcheck; the path selector (`selector`,
    guarded by `selector_lock`) is told both, `on_change(endpoints, home_region)` too."""

    def __init__(
        self,
        engine: Any,
        netcheck: Netcheck,
        relays: RelayPool,
        selector: PathSelector,
        selector_lock: threading.Lock,
        counters: Counter[str],
        *,
        on_change: Callable[[tuple[str, ...], int | None], None] | None = None,
        portmap: bool = True,
    ) -> None:
        self.engine = engine  # its listen_port and tun_name
        self.netcheck = netcheck
        self.relays = relays
        self.selector = selector
        self.selector_lock = selector_lock
        self.counters = counters
        self.on_change = on_change
        self.portmap_enabled = portmap
        self.home_region: int | None = None
        self.local_endpoints: tuple[Endpoint, ...] = ()
        self.stopping = False
        self._home_lock: asyncio.Lock | None = None
        self._netcheck_task: asyncio.Future[None] | None = None
        self._last_reported: tuple[tuple[str, ...], int | None] | None = None
        self._last_path_loss_netcheck = -PATH_LOSS_NETCHECK_SPACING

    # ------------------------------------------------------------------ when to netcheck

    async def periodic(self) -> None:
        while not self.stopping:
            await asyncio.sleep(NETCHECK_INTERVAL)
            try:
                await self.netcheck_and_home()
            except Exception:
                log.exception("netcheck_failed")

    def netcheck_after_path_loss(self) -> None:
        now = time.monotonic()
        if now - self._last_path_loss_netcheck < PATH_LOSS_NETCHECK_SPACING:
            return
        self._last_path_loss_netcheck = now
        self.counters["netcheck_after_path_loss"] += 1
        self.netcheck_soon()

    def netcheck_soon(self) -> None:
        if self._netcheck_task is None or self._netcheck_task.done():
            self._netcheck_task = asyncio.ensure_future(self.netcheck_and_home())

    # ------------------------------------------------------------------ netcheck and home relay

    def netcheck_report(self) -> dict[str, Any]:
        return self.netcheck.report(self.home_region, self.local_endpoints)

    async def netcheck_and_home(self) -> None:
        netcheck = self.netcheck
        # The port-mapping request runs beside STUN: on a router without PCP/NAT-PMP it only
        # times out, and the home relay should not wait for that.
        portmap = (
            asyncio.ensure_future(netcheck.portmap(self.engine.listen_port)) if self.portmap_enabled else None
        )
        await netcheck.probe(list(self.relays.regions.values()), self.relays)
        await self._set_local_endpoints()
        await self.choose_home()
        if portmap is not None and await portmap:
            await self._set_local_endpoints()

    async def _set_local_endpoints(self) -> None:
        self.local_endpoints = await self.netcheck.endpoints(self.engine.listen_port, self.engine.tun_name)
        with self.selector_lock:
            self.selector.set_local_endpoints(
                self.local_endpoints, self.netcheck.mapping_varies, time.monotonic()
            )
        self._report()

    async def choose_home(self) -> None:
        # One decision at a time: a periodic netcheck and a lost relay must not race each other
        # (the netcheck could otherwise re-elect the relay that has just gone).
        if self._home_lock is None:
            self._home_lock = asyncio.Lock()
        async with self._home_lock:
            await self._choose_home_locked()

    async def _choose_home_locked(self) -> None:
        home = await self.relays.elect_home(self.netcheck.region_latency, self.home_region)
        if home is None or home == self.home_region:
            return
        log.info("home_region region=%s previous=%s", home, self.home_region)
        self.home_region = home
        with self.selector_lock:
            self.selector.set_home_region(home)
        client = self.relays.client(home)
        if client is not None:
            with contextlib.suppress(Exception):
                client.note_preferred(True)
        self._report()

    async def relay_lost(self, region: int) -> None:
        """`region`'s relay connection was lost: when it was our home, elect another now."""
        if region != self.home_region:
            return
        self.netcheck.region_latency.pop(region, None)
        self.home_region = None
        await self.choose_home()

    # ------------------------------------------------------------------ telling on_change

    def report_now(self) -> None:
        """Tell on_change our endpoints and home region now (it is told of changes anyway)."""
        self._report()

    def _report(self) -> None:
        state = (tuple(fmt(ep.address) for ep in self.local_endpoints), self.home_region)
        if state == self._last_reported or self.on_change is None:
            return
        self._last_reported = state
        try:
            self.on_change(*state)
        except Exception:
            log.exception("on_change_failed")
