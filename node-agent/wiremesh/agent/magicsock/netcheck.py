"""netcheck: what the network around us looks like, probed from the Engine's own socket (so the
mapping STUN sees is the one peers need): whether UDP gets out, our public address, whether the
NAT maps per destination (needs two STUN servers to say), each relay region's latency, and a
port mapping from the gateway (PCP, NAT-PMP). Runs on magicsock's event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from wiremesh.agent import hostnet
from wiremesh.agent.magicsock import portmapper
from wiremesh.agent.magicsock.relays import RelayPool
from wiremesh.core import stun
from wiremesh.core.disco import Endpoint, EndpointKind
from wiremesh.core.magicsock.derpmap import Region

log = logging.getLogger("wiremesh.agent.magicsock")

Address = tuple[str, int]
STUN_TIMEOUT = 0.7
STUN_TRIES = 3


def fmt(addr: Address) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


class Netcheck:
    def __init__(self, send: Callable[[bytes, Address], None], drops: Counter[str]) -> None:
        self._send = send  # a datagram from the Engine's socket
        self.drops = drops
        self.udp_works: bool | None = None
        self.public_address: Address | None = None
        self.mapping_varies: bool | None = None  # None: fewer than two STUN servers answered
        self.region_latency: dict[int, float] = {}
        self.portmap_address: Address | None = None
        self.portmap_protocol: str | None = None
        self._waiters: dict[bytes, concurrent.futures.Future[Address]] = {}

    def receive_stun(self, data: bytes) -> None:
        """A STUN answer on the Engine's socket (any thread)."""
        try:
            message = stun.parse_message(data)
        except stun.StunError:
            self.drops["stun_malformed"] += 1
            return
        fut = self._waiters.pop(message.transaction_id, None)
        mapped = stun.mapped_address(message)
        if fut is None or mapped is None:
            self.drops["stun_unexpected"] += 1
            return
        if not fut.done():
            fut.set_result(mapped)

    async def stun(self, server: Address) -> tuple[Address, float] | None:
        """One Binding exchange: (mapped address, round trip) or None."""
        for _ in range(STUN_TRIES):
            tx = stun.new_transaction_id()
            fut: concurrent.futures.Future[Address] = concurrent.futures.Future()
            self._waiters[tx] = fut
            started = time.monotonic()
            try:
                self._send(bytes(stun.binding_request(transaction_id=tx)), server)
                mapped = await asyncio.wait_for(asyncio.wrap_future(fut), STUN_TIMEOUT)
                return mapped, time.monotonic() - started
            except TimeoutError:
                continue
            finally:
                self._waiters.pop(tx, None)
        return None

    async def probe(self, regions: Sequence[Region], relays: RelayPool) -> bool:
        """STUN every region (relays over TCP when UDP does not get out); True when our public
        address changed."""
        results = await asyncio.gather(*(self._stun_or_none(r.stun) for r in regions))
        latency: dict[int, float] = {}
        mapped: list[Address] = []
        for region, result in zip(regions, results, strict=True):
            if result is not None:
                mapped.append(result[0])
                latency[region.id] = result[1]
        self.udp_works = bool(mapped) if any(r.stun for r in regions) else None
        if not mapped:
            # No UDP: measure the relays over TCP instead, so a home can still be chosen.
            tcp = await asyncio.gather(*(relays.latency(r) for r in regions))
            latency = {r.id: lat for r, lat in zip(regions, tcp, strict=True) if lat is not None}
        self.region_latency = latency
        public = mapped[0] if mapped else None
        self.mapping_varies = len(set(mapped)) > 1 if len(mapped) > 1 else None
        changed = public != self.public_address
        self.public_address = public
        if changed and public is not None:
            log.info("public_address address=%s mapping_varies=%s", fmt(public), self.mapping_varies)
        return changed

    async def _stun_or_none(self, server: Address | None) -> tuple[Address, float] | None:
        return None if server is None else await self.stun(server)

    async def portmap(self, listen_port: int) -> bool:
        """Ask the default gateway for a mapping (PCP, then NAT-PMP); True when it changed."""
        before = self.portmap_address
        gateway = portmapper.default_gateway()
        if gateway is None:
            return False
        loop = asyncio.get_running_loop()
        for protocol, request in (("pcp", portmapper.pcp_map), ("nat-pmp", portmapper.natpmp_map)):
            result = await loop.run_in_executor(None, request, gateway, listen_port)
            if result is not None:
                self.portmap_address, self.portmap_protocol = result, protocol
                return result != before
        self.portmap_address = self.portmap_protocol = None
        return before is not None

    async def endpoints(self, listen_port: int, tun: str) -> tuple[Endpoint, ...]:
        """Ours to publish: the STUN address, the port-mapped one, then the interfaces'."""
        eps: list[Endpoint] = []
        try:
            # pyroute2 refuses to run its blocking API inside a running event loop.
            texts = await asyncio.get_running_loop().run_in_executor(
                None, hostnet.local_endpoints, listen_port, (tun,)
            )
            for text in texts:
                host, _, port = text.rpartition(":")
                eps.append(Endpoint((host.strip("[]"), int(port)), EndpointKind.LOCAL))
        except Exception as exc:
            log.warning("local_endpoints_failed error=%s", exc)
        if self.portmap_address is not None:
            eps.insert(0, Endpoint(self.portmap_address, EndpointKind.PORTMAP))
        if self.public_address is not None:
            eps.insert(0, Endpoint(self.public_address, EndpointKind.STUN))
        # A public host's STUN address equals its local one: keep one entry, the STUN kind.
        seen: set[Address] = set()
        unique = []
        for ep in dict.fromkeys(eps):
            if ep.address not in seen:
                seen.add(ep.address)
                unique.append(ep)
        return tuple(unique)

    def report(self, home_region: int | None, local_endpoints: Sequence[Endpoint]) -> dict[str, Any]:
        """`wiremesh netcheck`'s answer."""
        return {
            "udp": self.udp_works,
            "public_address": None if self.public_address is None else fmt(self.public_address),
            "mapping_varies_by_destination": self.mapping_varies,
            "port_mapping": self.portmap_protocol,
            "port_mapped_address": None if self.portmap_address is None else fmt(self.portmap_address),
            "preferred_region": home_region,
            "region_latency_ms": {
                str(r): round(lat * 1000, 2) for r, lat in sorted(self.region_latency.items())
            },
            "local_endpoints": [fmt(ep.address) for ep in local_endpoints],
        }
