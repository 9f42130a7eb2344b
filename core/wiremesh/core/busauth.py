"""Who may say what on the bus: one credential per service role, and the subjects each may use.

Every service connects to NATS as one of three roles. The table `ROLES` is the one place that
says what each role may publish and subscribe; everything else is derived from it:

- `server_config()` writes a nats-server configuration with one user per role (the lab, the
  demo, the tests, and `python -m wiremesh.core.busauth init DIR` for the README's steps);
- `chart_permissions()` is what the Helm chart renders into its NATS configuration; the chart
  keeps a copy in files/nats-permissions.json that a test holds equal to it.

Request/reply: a requester's replies come to its own inbox prefix (`_INBOX_<role>`), so no role
can read another's replies (coord's carry fresh pre-auth keys); the responder (keys) answers
through nats-server's `allow_responses`, which lets it publish once to the reply subject of a
request it received and nowhere else. Agents never speak NATS; the operator and STUN do not
either, so they have no role.

A service's credential is a file (never a command-line value, which `ps` shows): an NKey user
seed (`SU...`, the server then knows only the public key) or `USER:PASSWORD` (what the chart
generates: Helm cannot derive an NKey, but it can bcrypt a password for the server side).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import ssl
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from wiremesh.core import bus

MAX_CREDENTIAL_BYTES = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Role:
    """A service's place on the bus: the subjects it may publish and subscribe to."""

    name: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    answers_requests: bool = False  # may reply to requests it received (nats-server allow_responses)

    @property
    def inbox_prefix(self) -> str:
        """Where this role's request replies arrive; only it may subscribe there."""
        return f"_INBOX_{self.name}"

    def permissions(self) -> dict[str, Any]:
        """This role's permissions in nats-server's configuration syntax."""
        out: dict[str, Any] = {
            "publish": {"allow": list(self.publish)},
            "subscribe": {"allow": [*self.subscribe, f"{self.inbox_prefix}.>"]},
        }
        if self.answers_requests:
            out["allow_responses"] = True
        return out


KEY_REGISTRY_REQUESTS = (
    bus.AUTH_KEY_CREATE,
    bus.AUTH_KEY_LIST,
    bus.AUTH_KEY_EXPIRE,
    bus.AUTH_KEY_CONSUME,
    bus.NODE_KEY_REGISTER,
    bus.NODE_KEY_EXPIRE,
    bus.NODE_KEY_REVOKE,
)

# Only coord asks the key registry to mint, spend, expire or revoke keys; only keys answers and
# announces node keys; only relays speak on the relay subjects (presence leases and forwarded
# packets). NODE_KEY_LIST is the one request a relay makes: the list of valid node keys.
COORD = Role(
    name="coord",
    publish=(
        *KEY_REGISTRY_REQUESTS,
        bus.NODE_CHANGED,
        bus.POLICY_CHANGED,
        bus.HANDSHAKE_SEEN,
    ),
    subscribe=(bus.NODE_CHANGED, bus.POLICY_CHANGED, bus.HANDSHAKE_SEEN, bus.NODE_KEY_REMOVED),
)
KEYS = Role(
    name="keys",
    publish=(bus.NODE_KEY_ADDED, bus.NODE_KEY_REMOVED, bus.AUTH_KEY_CHANGED),
    subscribe=(*KEY_REGISTRY_REQUESTS, bus.NODE_KEY_LIST),
    answers_requests=True,
)
DERP = Role(
    name="derp",
    publish=(bus.NODE_KEY_LIST, bus.DERP_SUBJECTS),
    subscribe=(bus.NODE_KEY_ADDED, bus.NODE_KEY_REMOVED, bus.DERP_SUBJECTS),
)
ROLES: Mapping[str, Role] = {role.name: role for role in (COORD, KEYS, DERP)}


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise ValueError(f"unknown bus role {name!r} (one of {', '.join(ROLES)})") from None


def is_reply_inbox(subject: str) -> bool:
    """Whether `subject` is some role's reply inbox: a responder answers only there, so a
    request cannot turn its reply into a message on an event subject."""
    return any(subject.startswith(r.inbox_prefix + ".") for r in ROLES.values())


def chart_permissions() -> dict[str, Any]:
    """The table as the Helm chart renders it (charts/wiremesh/files/nats-permissions.json)."""
    return {name: r.permissions() for name, r in ROLES.items()}


# --- credentials (the client side) ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Credential:
    """One service's bus credential: an NKey seed, or a user and password."""

    user: str = ""
    password: str = dataclasses.field(default="", repr=False)
    nkey_seed: str = dataclasses.field(default="", repr=False)

    def connect_options(self) -> dict[str, Any]:
        if self.nkey_seed:
            return {"nkeys_seed_str": self.nkey_seed}
        return {"user": self.user, "password": self.password}


def parse_credential(text: str) -> Credential:
    """A credential file's text; ValueError (naming no secret) if it is neither form."""
    value = text.strip()
    if not value:
        raise ValueError("the NATS credential file is empty")
    if "\n" in value:
        raise ValueError("the NATS credential file must hold one line: an NKey seed or USER:PASSWORD")
    if value.startswith("SU"):
        import nkeys

        try:
            nkeys.from_seed(bytearray(value.encode()))
        except Exception:
            raise ValueError("the NATS credential file holds a malformed NKey user seed") from None
        return Credential(nkey_seed=value)
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("the NATS credential file must hold an NKey user seed (SU...) or USER:PASSWORD")
    return Credential(user=user, password=password)


def read_credential(path: str | os.PathLike[str]) -> Credential:
    p = pathlib.Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CREDENTIAL_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read the NATS credential file {p}: {exc.strerror}") from None
    if len(data) > MAX_CREDENTIAL_BYTES:
        raise ValueError(f"the NATS credential file {p} is too large")
    try:
        return parse_credential(data.decode())
    except UnicodeDecodeError:
        raise ValueError(f"the NATS credential file {p} is not text") from None


@dataclasses.dataclass(frozen=True, slots=True)
class BusAccess:
    """How one service reaches the bus: the URL, its role, its credential file and the CA that
    signed the server's certificate (TLS is used when a CA is given or the URL is tls://)."""

    url: str
    role: str
    credentials_file: str = ""
    ca_file: str = ""

    def check(self) -> None:
        """Fail early, with a clear message, on a role or credential file that cannot work."""
        role(self.role)
        if self.credentials_file:
            read_credential(self.credentials_file)
        if self.ca_file and not pathlib.Path(self.ca_file).is_file():
            raise ValueError(f"the NATS CA file {self.ca_file} does not exist")

    @property
    def authenticated(self) -> bool:
        return bool(self.credentials_file)

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for nats.connect() beyond the URL and callbacks."""
        options: dict[str, Any] = {"inbox_prefix": role(self.role).inbox_prefix}
        if self.credentials_file:
            options.update(read_credential(self.credentials_file).connect_options())
        if self.ca_file or self.url.startswith("tls://"):
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file or None)
            options["tls"] = context
        return options


# --- the server side ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class BusUser:
    """One server-side user: its role and how it proves itself (an NKey public key, or a user
    name with a password, plaintext or a bcrypt hash)."""

    role: str
    nkey: str = ""
    user: str = ""
    password: str = dataclasses.field(default="", repr=False)

    def entry(self) -> dict[str, Any]:
        auth: dict[str, Any] = (
            {"nkey": self.nkey} if self.nkey else {"user": self.user, "password": self.password}
        )
        return {**auth, "permissions": role(self.role).permissions()}


@dataclasses.dataclass(frozen=True, slots=True)
class ServerTls:
    cert_file: str
    key_file: str


def server_config(
    users: Iterable[BusUser],
    *,
    listen: str = "127.0.0.1:4222",
    monitor: str = "",
    tls: ServerTls | None = None,
    max_payload: int = bus.MAX_MESSAGE_BYTES,
) -> str:
    """A nats-server configuration: only the given users may connect, each with its role's
    permissions. Values are written as JSON, which nats-server's format accepts (and which keeps
    a bcrypt hash's `$` from being read as a variable)."""
    entries = [u.entry() for u in users]
    if not entries:
        raise ValueError("a bus needs at least one user")
    lines = [
        "# Generated by wiremesh.core.busauth: one user per wiremesh service role.",
        f"listen: {json.dumps(listen)}",
        f"max_payload: {int(max_payload)}",
        f"authorization: {json.dumps({'users': entries}, indent=2)}",
    ]
    if monitor:
        lines.append(f"http: {json.dumps(monitor)}")
    if tls is not None:
        lines.append(f"tls: {json.dumps({'cert_file': tls.cert_file, 'key_file': tls.key_file})}")
    return "\n".join(lines) + "\n"


def new_nkey_user() -> tuple[str, str]:
    """A fresh NKey user: (seed, public key)."""
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed.decode(), nkeys.from_seed(bytearray(seed)).public_key.decode()


@dataclasses.dataclass(frozen=True, slots=True)
class BusFiles:
    """What `write_bus()` made: the server's configuration and one credential file per role."""

    config: pathlib.Path
    credentials: Mapping[str, pathlib.Path]

    def access(self, url: str, role_name: str, ca_file: str = "") -> BusAccess:
        return BusAccess(url, role_name, str(self.credentials[role_name]), ca_file)


def write_private(path: pathlib.Path, text: str) -> None:
    """Write `text` to a file only its owner may read, created that way (no window of 0644)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_bus(
    directory: str | os.PathLike[str],
    *,
    listen: str = "127.0.0.1:4222",
    roles: Sequence[str] = tuple(ROLES),
    monitor: str = "",
    tls: ServerTls | None = None,
) -> BusFiles:
    """A fresh NKey per role (DIR/ROLE.nkey, 0600) and DIR/nats.conf admitting exactly them."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    users, credentials = [], {}
    for name in roles:
        seed, public = new_nkey_user()
        path = d / f"{name}.nkey"
        write_private(path, seed + "\n")
        credentials[name] = path
        users.append(BusUser(role=name, nkey=public))
    config = d / "nats.conf"
    write_private(config, server_config(users, listen=listen, monitor=monitor, tls=tls))
    return BusFiles(config=config, credentials=credentials)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wiremesh.core.busauth", description="wiremesh bus credentials and permissions"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write DIR/nats.conf and an NKey seed per service role")
    init.add_argument("directory")
    init.add_argument("--listen", default="127.0.0.1:4222", help="nats-server HOST:PORT")
    sub.add_parser("chart-permissions", help="print the permission table as the Helm chart uses it")
    args = parser.parse_args(argv)
    if args.command == "chart-permissions":
        print(json.dumps(chart_permissions(), indent=2))
        return 0
    files = write_bus(args.directory, listen=args.listen)
    print(f"nats-server -c {files.config}")
    for name, path in files.credentials.items():
        print(f"{name}: --nats-credentials {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
