"""autoApprovers: which of a node's advertised routes the policy approves without an admin.

As in Tailscale: a subnet route is approved when an entry of `autoApprovers.routes` whose prefix
contains it (equal or wider) names the node; the exit routes (0.0.0.0/0 and ::/0) are approved
when `autoApprovers.exitNode` names the node. A node is named by identity, the same way a rule's
`src` names it: an untagged node by its user, a group holding the user or autogroup:member; a
tagged node by its tags or autogroup:tagged only.

Approval only ever adds: coord keeps approvals the policy no longer grants (an admin withdraws
them with `routes unapprove`), as Tailscale keeps routes approved once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from wiremesh.core.policy.evaluate import identity_matches
from wiremesh.core.policy.model import IdentitySel, Policy, PolicyNode, is_exit_route


def _names(approvers: Iterable[IdentitySel], node: PolicyNode) -> bool:
    return any(identity_matches(sel, node) for sel in approvers)


def auto_approved(policy: Policy | None, node: PolicyNode, advertised: Iterable[str]) -> tuple[str, ...]:
    """The advertised routes `policy` approves for `node`, in advertised order.

    `node` needs only its user and tags; routes that do not parse are never approved.
    """
    if policy is None:
        return ()
    approvers = policy.auto_approvers
    if not approvers.routes and not approvers.exit_node:
        return ()
    exit_ok: bool | None = None  # computed once, on the first exit route
    out: list[str] = []
    for text in advertised:
        if is_exit_route(text):
            if exit_ok is None:
                exit_ok = _names(approvers.exit_node, node)
            if exit_ok:
                out.append(text)
            continue
        try:
            route = ipaddress.ip_network(text, strict=True)
        except ValueError:
            continue
        for prefix, who in approvers.routes:
            if (
                prefix.version == route.version
                and route.subnet_of(prefix)  # type: ignore[arg-type]
                and _names(who, node)
            ):
                out.append(text)
                break
    return tuple(dict.fromkeys(out))
