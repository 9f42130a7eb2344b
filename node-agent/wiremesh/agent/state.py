"""The agent's state directory: its three private keys and what coord last told it.

    <state-dir>/             0700
      machine.key            0600  identifies the machine to coord (survives node-key rotation)
      node.key               0600  the WireGuard key of this node
      disco.key              0600  seals disco messages between agents
      state.json             0600  node id, name, addresses, login server, coord's key, wanted up/down

Keys are created on first run and never leave this directory: coord is only ever told the
public halves. Files are written to a temporary name and renamed, so a crash mid-write never
leaves a half key behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any

from wiremesh.core import crypto

log = logging.getLogger(__name__)

KEY_FILES = ("machine.key", "node.key", "disco.key")
STATE_FILE = "state.json"
MAX_STATE_BYTES = 64 * 1024


class StateError(RuntimeError):
    """The state directory is unusable (bad permissions, a corrupt key); the message says which."""


@dataclasses.dataclass(frozen=True, slots=True)
class Keys:
    machine: bytes
    node: bytes
    disco: bytes

    @property
    def node_public(self) -> str:
        return crypto.encode_key(crypto.public_key(self.node))

    @property
    def disco_public(self) -> str:
        return crypto.encode_key(crypto.public_key(self.disco))

    @property
    def machine_public(self) -> str:
        return crypto.encode_key(crypto.public_key(self.machine))


@dataclasses.dataclass(frozen=True, slots=True)
class Persisted:
    """What survives a restart besides the keys (all of it public information)."""

    login_server: str = ""
    node_id: int | None = None
    name: str = ""
    addresses: tuple[str, ...] = ()
    want_running: bool = True
    coord_key: str = ""  # coord's control key, pinned at the first successful login
    exit_node: str = ""  # the peer to send all non-mesh traffic through ("" none)
    exit_node_allow_lan_access: bool = False

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["addresses"] = list(self.addresses)
        return out

    @classmethod
    def from_json(cls, raw: Any) -> Persisted:
        if not isinstance(raw, dict):
            raise ValueError("state is not an object")
        node_id = raw.get("node_id")
        addresses = raw.get("addresses", [])
        if node_id is not None and (not isinstance(node_id, int) or isinstance(node_id, bool)):
            raise ValueError("node_id is not an integer")
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError("addresses is not a list of strings")
        coord_key = raw.get("coord_key", "")
        if not isinstance(coord_key, str) or (coord_key and not _is_key(coord_key)):
            raise ValueError("coord_key is not a key")
        return cls(
            login_server=str(raw.get("login_server", "")),
            node_id=node_id,
            name=str(raw.get("name", "")),
            addresses=tuple(addresses),
            want_running=bool(raw.get("want_running", True)),
            coord_key=coord_key,
            exit_node=str(raw.get("exit_node", ""))[:255],
            exit_node_allow_lan_access=bool(raw.get("exit_node_allow_lan_access", False)),
        )


def _is_key(text: str) -> bool:
    try:
        crypto.decode_key(text)
    except ValueError:
        return False
    return True


def _write_private(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask; this is not
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class StateDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)

    def _ensure_dir(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    def load_or_create_keys(self) -> Keys:
        """The keys, created (each 0600) on first use; StateError if one is corrupt."""
        self._ensure_dir()
        values = [self._load_or_create_key(self.path / name) for name in KEY_FILES]
        return Keys(machine=values[0], node=values[1], disco=values[2])

    def _load_or_create_key(self, path: pathlib.Path) -> bytes:
        try:
            text = path.read_text()
        except FileNotFoundError:
            key = crypto.generate_private_key()
            _write_private(path, (crypto.encode_key(key) + "\n").encode())
            log.info("key_created file=%s", path)
            return key
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            # Someone loosened it; tighten rather than refuse, and say so.
            log.warning("key_permissions_fixed file=%s mode=%o", path, mode)
            os.chmod(path, 0o600)
        try:
            return crypto.decode_key(text)
        except ValueError:
            raise StateError(f"{path} does not hold a valid key; remove it to start as a new node") from None

    def replace_node_key(self, key: bytes) -> None:
        _write_private(self.path / "node.key", (crypto.encode_key(key) + "\n").encode())

    def load(self) -> Persisted:
        path = self.path / STATE_FILE
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return Persisted()
        if len(raw) > MAX_STATE_BYTES:
            raise StateError(f"{path} is larger than {MAX_STATE_BYTES} bytes")
        try:
            return Persisted.from_json(json.loads(raw))
        except ValueError as exc:
            raise StateError(f"{path} is corrupt ({exc}); remove it to log in again") from None

    def save(self, persisted: Persisted) -> None:
        self._ensure_dir()
        _write_private(self.path / STATE_FILE, json.dumps(persisted.to_json(), indent=1).encode())

    def remove(self) -> None:
        """Forget this node (after logout): keys and state go; the directory stays."""
        for name in (*KEY_FILES, STATE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
