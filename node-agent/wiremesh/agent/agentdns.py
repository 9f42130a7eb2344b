"""MagicDNS in the agent: the resolver (magicdns.py), its server (dnsserver.py) and, with
`--accept-dns`, the host's resolver configuration (hostdns.py), kept in step with the netmap.

The controller calls `update(netmap)` after every netmap and adds `addresses` to the TUN.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from wiremesh.agent.dnsserver import DNSServer
from wiremesh.agent.hostdns import HostDNS, HostDNSError
from wiremesh.agent.magicdns import Resolver
from wiremesh.core.dnsconfig import RESOLVER_V4, RESOLVER_V6, DNSConfig, DNSConfigError
from wiremesh.core.netmap import NetworkMap

log = logging.getLogger("wiremesh.agent.dns")

ADDRESSES = (f"{RESOLVER_V4}/32", f"{RESOLVER_V6}/128")


class AgentDNS:
    def __init__(self, state_dir: str | os.PathLike[str], tun: str, *, accept_dns: bool = False) -> None:
        self.host = HostDNS(state_dir, tun)
        self.resolver = Resolver()
        self.server = DNSServer(self.resolver)
        self.accept_dns = accept_dns
        self.config = DNSConfig()
        self.config_errors = 0
        self._applied: DNSConfig | None = None

    @property
    def addresses(self) -> tuple[str, ...]:
        return ADDRESSES

    async def start(self) -> None:
        if self.accept_dns:
            await asyncio.to_thread(self.host.recover)
        self.resolver.host_resolvers = self.host.upstream()
        await self.server.start()

    async def update(self, netmap: NetworkMap | None) -> None:
        config = self.config
        if netmap is not None:
            try:
                config = DNSConfig.from_json(netmap.dns or None)
            except DNSConfigError as exc:
                # Keep what we had: a malformed entry must not take names away or send queries astray.
                self.config_errors += 1
                log.warning("dns_config_invalid error=%r action=kept_previous", str(exc))
        self.config = config
        self.resolver.update(netmap, config)
        self.resolver.host_resolvers = self.host.upstream()
        if self.accept_dns and netmap is not None and config != self._applied:
            try:
                await asyncio.to_thread(self.host.apply, config)
                self._applied = config
                log.info("host_dns_configured mode=%s domain=%s", self.host.mode, config.domain)
            except HostDNSError as exc:
                self.host.error = str(exc)
                log.error("host_dns_failed error=%r", str(exc))
            self.resolver.host_resolvers = self.host.upstream()

    async def close(self) -> None:
        await self.server.close()
        if self.host.mode:
            await asyncio.to_thread(self.host.restore)

    def dns_name(self, node_name: str) -> str:
        return self.config.fqdn(node_name) if self.config.magic_dns else ""

    def status(self) -> dict[str, Any]:
        return {
            "magic_dns": self.config.magic_dns,
            "domain": self.config.domain,
            "routes": {suffix: list(servers) for suffix, servers in self.config.routes},
            "resolver": list(self.server.bound),
            "upstream": list(self.resolver.upstream),
            "accept_dns": self.accept_dns,
            "host_config": self.host.mode,
            "host_error": self.host.error,
            "config_errors": self.config_errors,
            "queries": dict(self.server.counters),
        }
