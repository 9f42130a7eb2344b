"""A small async client for coord's admin API (`/api/v1`, bearer admin key): what the operator
needs to turn MeshNode and ACL resources into coord configuration."""

from __future__ import annotations

import json
from typing import Any

import httpx

MAX_RESPONSE = 8 << 20  # a node list for a large mesh fits; anything bigger is refused


class CoordError(RuntimeError):
    """coord refused the request (status 4xx) or could not be reached (status 0 / 5xx)."""

    def __init__(self, status: int, detail: str, errors: list[str] | None = None) -> None:
        super().__init__(f"coord: {detail}" + (f" ({status})" if status else ""))
        self.status = status
        self.detail = detail
        self.errors = errors or []

    @property
    def retryable(self) -> bool:
        """Worth trying again later: coord down, overloaded or failing, not refusing the input."""
        return self.status == 0 or self.status >= 500 or self.status == 429


class CoordAdmin:
    def __init__(self, url: str, admin_key: str, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=f"{self.url}/api/v1",
            headers={"Authorization": f"Bearer {admin_key}"},
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise CoordError(0, f"unreachable at {self.url}: {exc!r}") from None
        body = response.content[:MAX_RESPONSE]
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if response.status_code >= 400:
            detail = data.get("detail") if isinstance(data, dict) else None
            errors = data.get("errors") if isinstance(data, dict) else None
            raise CoordError(
                response.status_code,
                str(detail or body[:200].decode(errors="replace") or response.reason_phrase),
                [str(e) for e in errors] if isinstance(errors, list) else None,
            )
        if data is None and response.status_code != 204:
            raise CoordError(response.status_code, f"unreadable reply to {method} {path}")
        return data

    # nodes
    async def list_nodes(self) -> list[dict[str, Any]]:
        nodes = await self._call("GET", "/nodes")
        return [n for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []

    async def get_node(self, node_id: int) -> dict[str, Any] | None:
        try:
            node: dict[str, Any] = await self._call("GET", f"/nodes/{int(node_id)}")
        except CoordError as exc:
            if exc.status == 404:
                return None
            raise
        return node

    async def delete_node(self, node_id: int) -> bool:
        """Delete a node; False when it was already gone."""
        try:
            await self._call("DELETE", f"/nodes/{int(node_id)}")
        except CoordError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def set_tags(self, node_id: int, tags: list[str]) -> dict[str, Any]:
        node: dict[str, Any] = await self._call("POST", f"/nodes/{int(node_id)}/tags", json={"tags": tags})
        return node

    async def approve_routes(self, node_id: int, prefixes: list[str]) -> dict[str, Any]:
        node: dict[str, Any] = await self._call(
            "POST", f"/nodes/{int(node_id)}/routes/approve", json={"prefixes": prefixes}
        )
        return node

    async def unapprove_routes(self, node_id: int, prefixes: list[str]) -> dict[str, Any]:
        """Withdraw approvals (a prefix that is not approved is ignored by coord)."""
        node: dict[str, Any] = await self._call(
            "POST", f"/nodes/{int(node_id)}/routes/unapprove", json={"prefixes": prefixes}
        )
        return node

    # pre-auth keys
    async def create_auth_key(
        self, user: str, *, tags: list[str], ephemeral: bool, reusable: bool = False, expiration: str = "24h"
    ) -> dict[str, Any]:
        """Returns the key's description with its secret under "key" (shown only this once)."""
        body = {
            "user": user,
            "tags": tags,
            "ephemeral": ephemeral,
            "reusable": reusable,
            "expiration": expiration,
        }
        key: dict[str, Any] = await self._call("POST", "/authkeys", json=body)
        return key

    async def list_auth_keys(self) -> list[dict[str, Any]]:
        keys = await self._call("GET", "/authkeys")
        return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else []

    async def expire_auth_key(self, key_id: int) -> None:
        await self._call("POST", f"/authkeys/{int(key_id)}/expire")

    # policy
    async def get_policy(self) -> dict[str, Any]:
        policy: dict[str, Any] = await self._call("GET", "/policy")
        return policy

    async def set_policy(self, text: str) -> dict[str, Any]:
        """Raises CoordError with `errors` (coord's "policy:LINE:COL: ..." lines) when rejected."""
        policy: dict[str, Any] = await self._call(
            "PUT", "/policy", content=text.encode(), headers={"Content-Type": "text/plain"}
        )
        return policy

    async def clear_policy(self) -> dict[str, Any]:
        policy: dict[str, Any] = await self._call("DELETE", "/policy")
        return policy
