"""Applying a plan (plan.py) to the Engine: its WireGuard peers, packet-filter rules, interface
addresses and routes, and the exit node's LAN rules, touching only what changed since the plan
applied last. A step that fails forgets the applied plan, so that the next try redoes every step.
Blocking (netlink): the controller calls it on its one netlink worker thread."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from wiremesh.agent import hostnet, netconf
from wiremesh.agent.mesh.plan import Plan
from wiremesh.core.policy.model import FilterRule

log = logging.getLogger("wiremesh.agent.mesh")


class PlanApplier:
    """Keeps one Engine at the plan applied last (`applied`). Its methods answer what went wrong
    ("" when nothing did), for the controller's status.

    `resolver`: MagicDNS's addresses, put on the interface beside ours (answered on the TUN, local
    to this host only) but never a source of our traffic.
    """

    def __init__(self, engine: Any, tun: str, resolver: tuple[str, ...] = ()) -> None:
        self.engine = engine
        self.tun = tun
        self.resolver = resolver
        self.applied = Plan()
        self.failed = False  # the last plan did not apply in full: the controller retries it
        self.filter_errors = 0
        self._ipv6: bool | None = None  # learnt at the first address or route change

    def apply(self, wanted: Plan) -> str:
        old = self.applied
        error = ""
        try:
            if wanted.peers != old.peers:
                self.engine.set_peers(wanted.peers)
            if wanted.packet_filter != old.packet_filter:
                self._install_filter(wanted.packet_filter)
            if wanted.addresses and wanted.addresses != old.addresses:
                error = self.set_addresses(wanted.addresses)
            if wanted.routes != old.routes:
                self.engine.set_routes(self._families(wanted.routes))
            if wanted.lan_rules != old.lan_rules:
                netconf.set_lan_rules(wanted.lan_rules, self.engine.route_table)
        except (OSError, ValueError, netconf.NetconfError) as exc:
            log.error("apply_failed error=%r", str(exc))
            # Forget what was applied: the controller's ticker redoes every step a second later.
            self.applied = Plan()
            self.failed = True
            return f"applying the netmap failed: {exc}"
        self.applied = wanted
        self.failed = False
        if wanted.peers != old.peers:
            log.info("peers_configured count=%d routes=%s", len(wanted.peers), ",".join(wanted.routes))
        return error

    def set_addresses(self, addresses: Iterable[str]) -> str:
        addresses = tuple(addresses)
        resolver = self.resolver if addresses else ()
        try:
            if resolver:
                self.engine.set_addresses(self._families(addresses), never_source=self._families(resolver))
            else:
                self.engine.set_addresses(self._families(addresses))
        except (OSError, ValueError, netconf.NetconfError) as exc:
            log.error("addresses_failed error=%r", str(exc))
            return f"setting addresses failed: {exc}"
        return ""

    def _families(self, prefixes: Iterable[str]) -> tuple[str, ...]:
        """`prefixes` less the IPv6 ones when this host has IPv6 turned off (said once)."""
        prefixes = tuple(prefixes)
        if self._ipv6 is None:
            self._ipv6 = hostnet.ipv6_enabled(self.tun)
            if not self._ipv6:
                log.warning("ipv6_unavailable interface=%s action=ipv4_only", self.tun)
        if self._ipv6:
            return prefixes
        return tuple(p for p in prefixes if ":" not in p)

    def _install_filter(self, packet_filter: tuple[Mapping[str, Any], ...]) -> None:
        if not packet_filter:
            self.engine.set_filter_rules((), allow_all=True)
            log.info("packet_filter_installed rules=0 allow_all=true")
            return
        try:
            rules = [FilterRule.from_dict(dict(rule)) for rule in packet_filter]
        except (ValueError, TypeError) as exc:
            # Fail closed: a policy we cannot read admits no new inbound flows.
            self.filter_errors += 1
            log.error("packet_filter_invalid error=%r action=deny_new_inbound", str(exc))
            rules = []
        self.engine.set_filter_rules(rules, allow_all=False)
        log.info("packet_filter_installed rules=%d", len(rules))
