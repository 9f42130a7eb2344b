"""wg-quick style configuration parsing (wiremesh.agent.wgconfig)."""

from __future__ import annotations

import base64

import pytest

from wiremesh.agent import wgconfig
from wiremesh.agent.wgconfig import ConfigError

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(1, 33))).decode()
KEY_C = base64.b64encode(bytes(range(2, 34))).decode()

FULL = f"""
# a comment
[Interface]
PrivateKey = {KEY_A}
ListenPort = 51820
Address = 10.0.0.1/24, fd00::1/64
Address = 10.1.0.1/32
MTU = 1380

[Peer]
PublicKey = {KEY_B}
PresharedKey = {KEY_C}
AllowedIPs = 10.0.0.2/32, fd00::2/128  # trailing comment
AllowedIPs = 192.168.7.0/24
Endpoint = 198.18.0.2:51821
PersistentKeepalive = 25

[peer]
publickey = {KEY_C}
endpoint = [2001:db8::1]:9000
"""


def test_full_config_parses_every_supported_key() -> None:
    cfg = wgconfig.parse(FULL)
    assert cfg.interface.private_key == bytes(range(32))
    assert cfg.interface.listen_port == 51820
    assert cfg.interface.addresses == ("10.0.0.1/24", "fd00::1/64", "10.1.0.1/32")
    assert cfg.interface.mtu == 1380
    first, second = cfg.peers
    assert first.public_key == bytes(range(1, 33))
    assert first.preshared_key == bytes(range(2, 34))
    assert first.allowed_ips == ("10.0.0.2/32", "fd00::2/128", "192.168.7.0/24")
    assert first.endpoint == ("198.18.0.2", 51821)
    assert first.persistent_keepalive == 25
    assert second.endpoint == ("2001:db8::1", 9000)
    assert second.preshared_key is None


def test_allowed_ips_with_host_bits_are_normalised_like_wg() -> None:
    cfg = wgconfig.parse(
        f"[Interface]\nPrivateKey={KEY_A}\n[Peer]\nPublicKey={KEY_B}\nAllowedIPs=10.0.0.7/24\n"
    )
    assert cfg.peers[0].allowed_ips == ("10.0.0.0/24",)


def test_wg_quick_only_keys_are_ignored_with_a_warning() -> None:
    cfg = wgconfig.parse(f"[Interface]\nPrivateKey={KEY_A}\nDNS = 1.1.1.1\nPostUp = iptables -A x\n")
    assert len(cfg.warnings) == 2
    assert ":3: ignoring wg-quick key DNS" in cfg.warnings[0]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        (f"[Interface]\nPrivateKey = {KEY_A}\nListenPort = 70000\n", 3, "ListenPort"),
        (f"[Interface]\nPrivateKey = {KEY_A}\n\nMTU = 9\n", 4, "MTU"),
        ("[Interface]\nPrivateKey = notbase64!\n", 2, "PrivateKey"),
        (f"[Interface]\nPrivateKey = {KEY_A}\nAddres = 10.0.0.1/24\n", 3, "unknown key 'Addres'"),
        (
            f"[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nAllowedIPs = 10.0.0.300/32\n",
            5,
            "10.0.0.300",
        ),
        (
            f"[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nEndpoint = 2001:db8::1:51820\n",
            5,
            "Endpoint",
        ),
        (f"[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nEndpoint = host:0\n", 5, "port"),
        (f"[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nAllowedIPs = 10.0.0.0/8\n", 3, "no PublicKey"),
        (f"[Interface]\nPrivateKey = {KEY_A}\n[Interface]\n", 3, "second [Interface]"),
        ("PrivateKey = x\n", 1, "outside of a section"),
        (f"[Interface]\nPrivateKey = {KEY_A}\n[Peers]\n", 3, "unknown section"),
        (f"[Interface]\nPrivateKey = {KEY_A}\njunk line\n", 3, "expected 'Key = Value'"),
        (
            f"[Interface]\nPrivateKey = {KEY_A}\n[Peer]\nPublicKey = {KEY_B}\nPersistentKeepalive = -1\n",
            5,
            "PersistentKeepalive",
        ),
    ],
)
def test_bad_input_names_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        wgconfig.parse(text, "wm0.conf")
    assert err.value.line == line
    assert f"wm0.conf:{line}:" in str(err.value)
    assert fragment in str(err.value)


def test_missing_interface_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="missing \\[Interface\\]"):
        wgconfig.parse(f"[Peer]\nPublicKey = {KEY_B}\n")


def test_missing_private_key_is_an_error() -> None:
    with pytest.raises(ConfigError, match="no PrivateKey"):
        wgconfig.parse("[Interface]\nListenPort = 1\n")


def test_duplicate_peer_is_an_error() -> None:
    with pytest.raises(ConfigError, match="duplicate"):
        wgconfig.parse(
            f"[Interface]\nPrivateKey={KEY_A}\n[Peer]\nPublicKey={KEY_B}\n[Peer]\nPublicKey={KEY_B}\n"
        )


def test_oversized_file_is_refused() -> None:
    with pytest.raises(ConfigError, match="larger than"):
        wgconfig.parse("#" * (wgconfig.MAX_CONFIG_BYTES + 1))


def test_load_reports_unreadable_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        wgconfig.load(tmp_path / "absent.conf")


def test_load_reports_non_utf8(tmp_path) -> None:
    path = tmp_path / "bad.conf"
    path.write_bytes(b"[Interface]\n\xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        wgconfig.load(path)


def test_numeric_endpoint_resolves_to_itself() -> None:
    assert wgconfig.resolve_endpoint(("198.18.0.9", 5)) == ("198.18.0.9", 5)


def test_localhost_endpoint_resolves_through_the_resolver() -> None:
    host, port = wgconfig.resolve_endpoint(("localhost", 7))
    assert host in ("127.0.0.1", "::1") and port == 7
