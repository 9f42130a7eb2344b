"""The tailnet's DNS configuration: what coord sends in every netmap, and what agents resolve.

    {"magic_dns": true,                      # answer <node>.<domain> from the netmap
     "domain": "wiremesh.internal",          # the tailnet's domain
     "routes": {"cluster.local": ["10.96.0.10"]},   # split DNS: suffix -> resolvers
     "nameservers": [],                      # resolvers for everything else (none: the host's)
     "search_domains": []}                   # extra search domains for hosts that accept DNS

Validated here, once, for coord (at start, refusing a bad file) and for agents (what arrives in a
netmap is checked again: a malformed entry is dropped and counted, never trusted).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any

DEFAULT_DOMAIN = "wiremesh.internal"
# The agent's resolver, as Tailscale's: quad-100 and its IPv6 twin in the mesh's ULA prefix.
RESOLVER_V4 = "100.100.100.100"
RESOLVER_V6 = "fd7a:115c:a1e0::53"
MAX_ROUTES = 64
MAX_SERVERS = 8
MAX_SEARCH = 8
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


class DNSConfigError(ValueError):
    """The DNS configuration is malformed; the message says where."""


def normalize_domain(text: str, what: str = "domain") -> str:
    """A lower-case domain without the trailing dot; DNSConfigError if it is not one."""
    if not isinstance(text, str):
        raise DNSConfigError(f"{what} must be a string")
    name = text.strip().lower().rstrip(".")
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise DNSConfigError(f"{what} {text[:64]!r} is not a domain name (letters, digits, '-', dots)")
    return name


def _servers(value: Any, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_SERVERS:
        raise DNSConfigError(f"{what} must be a list of at most {MAX_SERVERS} IP addresses")
    out = []
    for item in value:
        try:
            out.append(str(ipaddress.ip_address(item if isinstance(item, str) else "")))
        except ValueError:
            raise DNSConfigError(f"{what}: {str(item)[:64]!r} is not an IP address") from None
    return tuple(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True, slots=True)
class DNSConfig:
    magic_dns: bool = True
    domain: str = DEFAULT_DOMAIN
    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (suffix, resolvers), longest suffix first
    nameservers: tuple[str, ...] = ()
    search_domains: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "magic_dns": self.magic_dns,
            "domain": self.domain,
            "routes": {suffix: list(servers) for suffix, servers in self.routes},
            "nameservers": list(self.nameservers),
            "search_domains": list(self.search_domains),
        }

    @classmethod
    def from_json(cls, raw: Any) -> DNSConfig:
        """Validate; DNSConfigError names the first problem. Missing fields take defaults."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise DNSConfigError("the DNS configuration must be an object")
        unknown = set(raw) - {"magic_dns", "domain", "routes", "nameservers", "search_domains"}
        if unknown:
            raise DNSConfigError(f"unknown fields {sorted(unknown)}")
        magic = raw.get("magic_dns", True)
        if not isinstance(magic, bool):
            raise DNSConfigError("magic_dns must be true or false")
        routes_raw = raw.get("routes", {})
        if not isinstance(routes_raw, dict) or len(routes_raw) > MAX_ROUTES:
            raise DNSConfigError(f"routes must be an object of at most {MAX_ROUTES} suffixes")
        routes = {
            normalize_domain(suffix, "route suffix"): _servers(servers, f"routes[{suffix!r}]")
            for suffix, servers in routes_raw.items()
        }
        search = raw.get("search_domains", [])
        if not isinstance(search, list) or len(search) > MAX_SEARCH:
            raise DNSConfigError(f"search_domains must be a list of at most {MAX_SEARCH} domains")
        return cls(
            magic_dns=magic,
            domain=normalize_domain(raw.get("domain", DEFAULT_DOMAIN)),
            routes=tuple(sorted(routes.items(), key=lambda item: (-len(item[0]), item[0]))),
            nameservers=_servers(raw.get("nameservers", []), "nameservers"),
            search_domains=tuple(dict.fromkeys(normalize_domain(d, "search domain") for d in search)),
        )

    def route_for(self, name: str) -> tuple[str, ...] | None:
        """The resolvers of the longest route suffix `name` falls under (None: no route)."""
        for suffix, servers in self.routes:
            if name == suffix or name.endswith("." + suffix):
                return servers
        return None

    def fqdn(self, node_name: str) -> str:
        """`node.domain.` (with the trailing dot, as DNS writes names)."""
        return f"{node_name.lower()}.{self.domain}."
