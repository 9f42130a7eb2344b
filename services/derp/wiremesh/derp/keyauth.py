"""Which node keys may use the relay.

The key registry is the authority: at start the relay asks NODE_KEY_LIST over NATS, then
follows NODE_KEY_ADDED / NODE_KEY_REMOVED live. A key-file source exists for development
and benchmarks only. With no source at all the relay refuses to start.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Callable
from pathlib import Path

from wiremesh.core import bus

log = logging.getLogger("wiremesh.derp.keys")


def decode_key(text: str) -> bytes:
    """A 32-byte key from its base64 text form; raises ValueError."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not a base64 key: {text[:60]!r}") from exc
    if len(raw) != 32:
        raise ValueError(f"key is {len(raw)} bytes, want 32")
    return raw


def encode_key(key: bytes) -> str:
    return base64.b64encode(key).decode()


class KeyAuthority:
    """The set of node keys allowed right now, with their expiry (unix seconds or None)."""

    def __init__(self, *, allow_all: bool = False, clock: Callable[[], float] = time.time) -> None:
        self.allow_all = allow_all
        self._keys: dict[bytes, float | None] = {}
        self._clock = clock
        self.synced = allow_all  # True once a full list is known (file or registry)
        self.on_revoked: Callable[[bytes, str], None] | None = None
        self._removed_during_sync: set[bytes] = set()
        self._syncing = False

    def __len__(self) -> int:
        return len(self._keys)

    def allowed(self, key: bytes) -> bool:
        if self.allow_all:
            return True
        if key not in self._keys:
            return False
        expires = self._keys[key]
        return expires is None or expires > self._clock()

    def add(self, key: bytes, expires_at: float | None = None) -> None:
        self._keys[key] = expires_at
        self._removed_during_sync.discard(key)

    def remove(self, key: bytes, reason: str = "removed") -> None:
        self._keys.pop(key, None)
        if self._syncing:
            self._removed_during_sync.add(key)
        if self.on_revoked is not None:
            self.on_revoked(key, reason)

    def expired_keys(self) -> list[bytes]:
        """Keys whose expiry has passed, forgotten here (the registry re-adds a renewed key)."""
        now = self._clock()
        expired = [k for k, exp in self._keys.items() if exp is not None and exp <= now]
        for key in expired:
            del self._keys[key]
        return expired

    def load_file(self, path: Path) -> int:
        """One base64 key per line; blank lines and `#` comments are skipped."""
        count = 0
        for number, line in enumerate(path.read_text().splitlines(), 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                self.add(decode_key(text))
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from exc
            count += 1
        self.synced = True
        return count

    # Registry events (bus models). Malformed keys are logged and ignored.

    def begin_sync(self) -> None:
        self._syncing = True
        self._removed_during_sync.clear()

    def apply_list(self, listing: bus.NodeKeyList) -> None:
        fresh: dict[bytes, float | None] = {}
        for event in listing.keys:
            try:
                key = decode_key(event.node_key)
            except ValueError as exc:
                log.warning("registry listed a malformed key: %s", exc)
                continue
            if key not in self._removed_during_sync:
                fresh[key] = event.expires_at
        dropped = set(self._keys) - set(fresh)
        self._keys.update(fresh)
        self._syncing = False
        self.synced = True
        for key in dropped:
            self.remove(key, "not in registry")

    def apply_added(self, event: bus.NodeKeyEvent) -> None:
        try:
            self.add(decode_key(event.node_key), event.expires_at)
        except ValueError as exc:
            log.warning("registry announced a malformed key: %s", exc)

    def apply_removed(self, event: bus.NodeKeyEvent) -> None:
        try:
            key = decode_key(event.node_key)
        except ValueError as exc:
            log.warning("registry removed a malformed key: %s", exc)
            return
        self.remove(key, event.reason or "removed")
