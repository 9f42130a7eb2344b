"""Key encoding and the primitives WireGuard builds on."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from wiremesh.core import crypto


def test_encode_decode_round_trip() -> None:
    key = crypto.generate_private_key()
    text = crypto.encode_key(key)
    assert len(text) == 44 and text.endswith("=")
    assert crypto.decode_key(text) == key


@pytest.mark.parametrize("text", ["", "not base64!", "AAAA", "A" * 42 + "==", "\u00e9" * 44])
def test_decode_key_rejects_bad_text(text: str) -> None:
    with pytest.raises(ValueError, match="not a valid 32-byte base64 key"):
        crypto.decode_key(text)


def test_dh_agrees_both_ways() -> None:
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    assert crypto.dh(a, crypto.public_key(b)) == crypto.dh(b, crypto.public_key(a))


def test_dh_with_low_order_point_is_an_authentication_error() -> None:
    with pytest.raises(crypto.AuthenticationError):
        crypto.dh(crypto.generate_private_key(), bytes(32))


def test_rfc7748_public_key_vector() -> None:
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    assert (
        crypto.public_key(alice).hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )


def test_hkdf_matches_hmac_construction() -> None:
    ck, ikm = b"c" * 32, b"input"
    prk = hmac.new(ck, ikm, hashlib.blake2s).digest()
    t1 = hmac.new(prk, b"\x01", hashlib.blake2s).digest()
    t2 = hmac.new(prk, t1 + b"\x02", hashlib.blake2s).digest()
    assert crypto.hkdf(ck, ikm, 2) == (t1, t2)


def test_mac_is_16_bytes_and_keyed() -> None:
    assert len(crypto.blake2s_mac(b"k" * 32, b"data")) == 16
    assert crypto.blake2s_mac(b"k" * 32, b"data") != crypto.blake2s_mac(b"j" * 32, b"data")


def test_xaead_round_trip_and_tamper_detection() -> None:
    key, nonce = b"k" * 32, b"n" * 24
    ct = crypto.xaead_encrypt(key, nonce, b"cookie", b"ad")
    assert crypto.xaead_decrypt(key, nonce, ct, b"ad") == b"cookie"
    with pytest.raises(crypto.AuthenticationError):
        crypto.xaead_decrypt(key, nonce, ct, b"other ad")


def test_aead_decrypt_rejects_wrong_counter() -> None:
    key = b"k" * 32
    ct = crypto.aead_encrypt(key, 7, b"x", b"")
    assert crypto.aead_decrypt(key, 7, ct, b"") == b"x"
    with pytest.raises(crypto.AuthenticationError):
        crypto.aead_decrypt(key, 8, ct, b"")
