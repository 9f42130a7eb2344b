"""wg-quick style configuration files.

```
[Interface]
PrivateKey = <base64>
ListenPort = 51820
Address = 10.0.0.1/24, fd00::1/64
MTU = 1420

[Peer]
PublicKey = <base64>
PresharedKey = <base64>
AllowedIPs = 10.0.0.2/32, fd00::2/128
Endpoint = 198.18.0.2:51820        # or [2001:db8::1]:51820 or host.example:51820
PersistentKeepalive = 25
```

Keys are case-insensitive (as in `wg`); lists may be split over several lines. Keys that only
wg-quick's shell script acts on (DNS, Table, PostUp, ...) are ignored with a warning; anything
else unknown is an error, with its line number, so that a typo is not silently dropped.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import logging
import socket
from pathlib import Path

log = logging.getLogger(__name__)

MAX_CONFIG_BYTES = 1 << 20
MIN_MTU = 1280  # IPv6 minimum; WireGuard overhead comes on top of this
MAX_MTU = 65535 - 80

IGNORED_KEYS = frozenset({"dns", "table", "preup", "postup", "predown", "postdown", "saveconfig", "fwmark"})


class ConfigError(ValueError):
    """The configuration is invalid; `line` is the 1-based line number (0 when not tied to one)."""

    def __init__(self, message: str, line: int = 0, source: str = "") -> None:
        where = f"{source or 'config'}:{line}: " if line else (f"{source}: " if source else "")
        super().__init__(f"{where}{message}")
        self.line = line


@dataclasses.dataclass(frozen=True, slots=True)
class InterfaceSection:
    private_key: bytes
    listen_port: int | None = None
    addresses: tuple[str, ...] = ()
    mtu: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class PeerSection:
    public_key: bytes
    preshared_key: bytes | None = None
    allowed_ips: tuple[str, ...] = ()
    endpoint: tuple[str, int] | None = None  # (host as written, port); see resolve_endpoint
    persistent_keepalive: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class WgConfig:
    interface: InterfaceSection
    peers: tuple[PeerSection, ...] = ()
    warnings: tuple[str, ...] = ()


def decode_key(text: str) -> bytes:
    """Base64 text of a 32-byte key -> bytes; ValueError otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("key is not 32 bytes of base64")
    return raw


def parse_endpoint(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); ValueError if malformed."""
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0 or text[close + 1 : close + 2] != ":":
            raise ValueError(f"endpoint must be [ipv6]:port: {text!r}")
        host, port_text = text[1:close], text[close + 2 :]
        ipaddress.IPv6Address(host.split("%", 1)[0])
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"endpoint must be host:port (IPv6 in brackets): {text!r}")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"endpoint port must be 1-65535: {text!r}")
    return host, int(port_text)


def resolve_endpoint(endpoint: tuple[str, int]) -> tuple[str, int]:
    """Resolve a (host, port) endpoint to a numeric (address, port) usable as a socket address."""
    host, port = endpoint
    try:
        ip = ipaddress.ip_address(host)
        return str(ip), port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve endpoint host {host!r}: {exc}") from exc
    # Prefer IPv4 like wg(8) does in practice on dual-stack hosts behind NAT.
    infos.sort(key=lambda info: 0 if info[0] == socket.AF_INET else 1)
    return str(infos[0][4][0]), port


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def parse(text: str, source: str = "") -> WgConfig:
    """Parse wg-quick text; raise ConfigError (with a line number) on the first problem."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"configuration larger than {MAX_CONFIG_BYTES} bytes", source=source)
    warnings: list[str] = []
    section: str | None = None
    iface: dict[str, object] | None = None
    peers: list[dict[str, object]] = []
    current: dict[str, object] | None = None

    for lineno, raw_line in enumerate(text.splitlines(), start=1):

        def fail(message: str, _lineno: int = lineno) -> ConfigError:
            return ConfigError(message, _lineno, source)

        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise fail(f"malformed section header {line!r}")
            name = line[1:-1].strip().lower()
            if name == "interface":
                if iface is not None:
                    raise fail("second [Interface] section")
                iface = {"_line": lineno}
                current = iface
            elif name == "peer":
                current = {"_line": lineno}
                peers.append(current)
            else:
                raise fail(f"unknown section [{line[1:-1].strip()}]")
            section = name
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise fail(f"expected 'Key = Value', got {line!r}")
        key_l, value = key.strip().lower(), value.strip()
        if current is None:
            raise fail(f"{key.strip()} outside of a section")
        if key_l in IGNORED_KEYS:
            msg = (
                f"{source or 'config'}:{lineno}: ignoring wg-quick key {key.strip()} (not used by wiremeshd)"
            )
            warnings.append(msg)
            log.warning("config_key_ignored line=%d key=%s", lineno, key.strip())
            continue
        try:
            if section == "interface":
                _interface_key(current, key_l, value)
            else:
                _peer_key(current, key_l, value)
        except ValueError as exc:
            raise fail(f"{key.strip()}: {exc}") from None
        except KeyError:
            raise fail(f"unknown key {key.strip()!r} in [{section.title() if section else ''}]") from None

    if iface is None:
        raise ConfigError("missing [Interface] section", source=source)
    if "private_key" not in iface:
        raise ConfigError("[Interface] has no PrivateKey", int(str(iface["_line"])), source)
    seen: set[bytes] = set()
    peer_sections: list[PeerSection] = []
    for p in peers:
        pline = int(str(p.pop("_line")))
        if "public_key" not in p:
            raise ConfigError("[Peer] has no PublicKey", pline, source)
        if p["public_key"] in seen:
            raise ConfigError("duplicate [Peer] PublicKey", pline, source)
        seen.add(p["public_key"])  # type: ignore[arg-type]
        p["allowed_ips"] = tuple(p.get("allowed_ips", ()))  # type: ignore[arg-type]
        peer_sections.append(PeerSection(**p))  # type: ignore[arg-type]
    iface.pop("_line")
    iface["addresses"] = tuple(iface.get("addresses", ()))  # type: ignore[arg-type]
    return WgConfig(InterfaceSection(**iface), tuple(peer_sections), tuple(warnings))  # type: ignore[arg-type]


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise ValueError(f"not a port number: {value!r}")
    return int(value)


def _interface_key(d: dict[str, object], key: str, value: str) -> None:
    if key == "privatekey":
        d["private_key"] = decode_key(value)
    elif key == "listenport":
        d["listen_port"] = _port(value)
    elif key == "address":
        addrs = list(d.get("addresses", []))  # type: ignore[call-overload]
        for item in _split_list(value):
            ipaddress.ip_interface(item)  # ValueError names the bad one
            addrs.append(item)
        d["addresses"] = addrs
    elif key == "mtu":
        if not value.isdigit() or not MIN_MTU <= int(value) <= MAX_MTU:
            raise ValueError(f"must be an integer {MIN_MTU}-{MAX_MTU}: {value!r}")
        d["mtu"] = int(value)
    else:
        raise KeyError(key)


def _peer_key(d: dict[str, object], key: str, value: str) -> None:
    if key == "publickey":
        d["public_key"] = decode_key(value)
    elif key == "presharedkey":
        d["preshared_key"] = decode_key(value)
    elif key == "allowedips":
        nets = list(d.get("allowed_ips", []))  # type: ignore[call-overload]
        for item in _split_list(value):
            try:
                nets.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                raise ValueError(f"not an IP prefix: {item!r}") from None
        d["allowed_ips"] = nets
    elif key == "endpoint":
        d["endpoint"] = parse_endpoint(value)
    elif key == "persistentkeepalive":
        if value.lower() == "off":
            d["persistent_keepalive"] = 0
        elif value.isdigit() and 0 <= int(value) <= 65535:
            d["persistent_keepalive"] = int(value)
        else:
            raise ValueError(f"must be 'off' or 0-65535 seconds: {value!r}")
    else:
        raise KeyError(key)


def load(path: str | Path) -> WgConfig:
    """Read and parse a configuration file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=str(p)) from exc
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte {exc.start})", source=str(p)) from exc
    return parse(text, str(p))
