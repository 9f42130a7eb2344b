"""Using an exit node: which peer it is, and what that does to allowed IPs and routes (pure).

- A peer offers to be an exit node when coord put 0.0.0.0/0 or ::/0 in its allowed IPs (its
  advertisement was approved). Only the exit node this node selected keeps them in its WireGuard
  configuration: an unselected exit node must neither receive our traffic nor be accepted as the
  source of any internet address.
- With an exit node selected, 0.0.0.0/0 and ::/0 go into the mesh's routing table, for both
  families even if the exit node offers only one (the other is blackholed rather than leaked).
  When the selected exit node is missing from the netmap, or offers nothing, the routes stay:
  traffic is dropped, never sent around the exit node the user chose (as in Tailscale).
- LAN access: the host's own routes other than its default route win over the mesh's table
  (netconf's rule 5230), so its connected subnets stay reachable directly. Without
  `--exit-node-allow-lan-access` (the default, as in Tailscale) the connected subnets are sent
  to the exit node too (netconf's LAN rules), so a device on an untrusted network talks to
  nothing there but its gateway at the link layer; the agent's own traffic (marked, bypass.py)
  still reaches the LAN.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

from wiremesh.core.netmap import Node
from wiremesh.core.policy.model import EXIT_ROUTES, is_exit_route

MAX_SELECTOR = 255


@dataclasses.dataclass(frozen=True, slots=True)
class ExitChoice:
    """The outcome of selecting an exit node against one netmap."""

    selector: str = ""  # what the user asked for: a name, a host name or a mesh address; "" = none
    node: Node | None = None  # the peer it names, if any
    error: str = ""  # why no traffic can leave (for `wiremesh status`)

    @property
    def active(self) -> bool:
        return bool(self.selector)


NO_EXIT = ExitChoice()


def offers_exit(node: Node) -> bool:
    return any(is_exit_route(p) for p in node.allowed_ips)


def matches(node: Node, selector: str) -> bool:
    """A peer's name (or its first label), host name, or one of its mesh addresses."""
    wanted = selector.strip().lower().rstrip(".")
    if wanted in (node.name.lower(), node.hostname.lower(), node.name.lower().split(".")[0]):
        return True
    try:
        ip = ipaddress.ip_address(wanted)
    except ValueError:
        return False
    return any(ipaddress.ip_interface(a).ip == ip for a in node.addresses)


def choose(peers: Iterable[Node], selector: str) -> ExitChoice:
    if not selector:
        return NO_EXIT
    found = [p for p in peers if matches(p, selector)]
    if not found:
        return ExitChoice(selector, None, f"exit node {selector!r} is not a peer")
    node = next((p for p in found if offers_exit(p)), found[0])
    if not offers_exit(node):
        return ExitChoice(
            selector, node, f"{node.name} does not offer to be an exit node (or it is not approved)"
        )
    return ExitChoice(selector, node)


def peer_allowed_ips(node: Node, allowed: tuple[str, ...], choice: ExitChoice) -> tuple[str, ...]:
    """A peer's allowed IPs without exit routes unless it is the exit node in use."""
    if choice.node is not None and choice.node.id == node.id and not choice.error:
        return allowed
    return tuple(p for p in allowed if not is_exit_route(p))


def routes(choice: ExitChoice) -> tuple[str, ...]:
    return EXIT_ROUTES if choice.active else ()


def check_selector(selector: str) -> str:
    """A selector as given by the user; ValueError if it cannot be one."""
    selector = selector.strip()
    if len(selector) > MAX_SELECTOR or any(c.isspace() or not c.isprintable() for c in selector):
        raise ValueError(f"--exit-node must be a peer's name or mesh address, got {selector[:64]!r}")
    return selector
