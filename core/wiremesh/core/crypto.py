"""Cryptographic primitives as WireGuard and our Noise channels use them.

X25519 for key agreement, BLAKE2s for hashing, keyed MACs and HMAC/HKDF, ChaCha20-Poly1305 for
transport and handshake AEAD, XChaCha20-Poly1305 for WireGuard cookie replies. Keys are raw bytes
everywhere; `encode_key`/`decode_key` convert to and from the base64 text that `wg` prints.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac as _hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _sodium
from nacl.exceptions import CryptoError as _NaclCryptoError

__all__ = [
    "AEAD_TAG_SIZE",
    "HASH_SIZE",
    "KEY_SIZE",
    "MAC_SIZE",
    "XNONCE_SIZE",
    "AuthenticationError",
    "ChaCha20Poly1305",
    "InvalidTag",
    "aead_decrypt",
    "aead_encrypt",
    "aead_nonce",
    "blake2s_hash",
    "blake2s_mac",
    "decode_key",
    "dh",
    "encode_key",
    "generate_private_key",
    "hkdf",
    "hmac_blake2s",
    "public_key",
    "xaead_decrypt",
    "xaead_encrypt",
]

KEY_SIZE = 32
HASH_SIZE = 32
MAC_SIZE = 16
AEAD_TAG_SIZE = 16
XNONCE_SIZE = 24

_NONCE_PREFIX = b"\x00\x00\x00\x00"
_COUNTER = struct.Struct("<Q")


class AuthenticationError(ValueError):
    """An AEAD tag did not verify, or a key agreement produced an unusable (all-zero) result."""


def generate_private_key() -> bytes:
    """A fresh X25519 private key, 32 raw bytes (clamping happens inside X25519, as in `wg genkey`)."""
    key = bytearray(os.urandom(KEY_SIZE))
    # Clamp like `wg genkey` does so the stored key is canonical; X25519 clamps again anyway.
    key[0] &= 248
    key[31] = (key[31] & 127) | 64
    return bytes(key)


def public_key(private_key: bytes) -> bytes:
    """The X25519 public key belonging to `private_key`."""
    _check_len(private_key, "private key")
    return X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()


def encode_key(key: bytes) -> str:
    """Base64 text of a 32-byte key, as `wg` prints it."""
    _check_len(key, "key")
    return base64.b64encode(key).decode("ascii")


def decode_key(text: str) -> bytes:
    """Raw bytes of a base64 key; ValueError on anything that is not exactly 32 bytes of base64."""
    stripped = text.strip()
    try:
        raw = base64.b64decode(stripped.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise ValueError(f"{stripped[:64]!r} is not a valid 32-byte base64 key") from None
    if len(raw) != KEY_SIZE:
        raise ValueError(f"{stripped[:64]!r} is not a valid 32-byte base64 key")
    return raw


def dh(private_key: bytes, public_key: bytes) -> bytes:
    """X25519(private_key, public_key). AuthenticationError when the result is all zero
    (a low-order public key), which WireGuard treats as a failed handshake."""
    _check_len(private_key, "private key")
    _check_len(public_key, "public key")
    try:
        return X25519PrivateKey.from_private_bytes(private_key).exchange(
            X25519PublicKey.from_public_bytes(public_key)
        )
    except ValueError:
        raise AuthenticationError("X25519 produced an all-zero shared secret") from None


def blake2s_hash(*parts: bytes) -> bytes:
    """HASH(parts[0] || parts[1] || ...), 32-byte BLAKE2s."""
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def blake2s_mac(key: bytes, data: bytes) -> bytes:
    """MAC(key, data): keyed BLAKE2s with a 16-byte output (WireGuard's mac1, mac2, cookie)."""
    return hashlib.blake2s(data, key=key, digest_size=MAC_SIZE).digest()


def hmac_blake2s(key: bytes, data: bytes) -> bytes:
    """HMAC-BLAKE2s (the HMAC construction over unkeyed BLAKE2s-256, block size 64)."""
    return _hmac.digest(key, data, hashlib.blake2s)


def hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> tuple[bytes, ...]:
    """Noise's HKDF over HMAC-BLAKE2s: 1 to 3 outputs of 32 bytes each."""
    if not 1 <= outputs <= 3:
        raise ValueError("hkdf produces 1 to 3 outputs")
    prk = hmac_blake2s(chaining_key, input_key_material)
    out: list[bytes] = []
    previous = b""
    for i in range(1, outputs + 1):
        previous = hmac_blake2s(prk, previous + bytes((i,)))
        out.append(previous)
    return tuple(out)


def aead_nonce(counter: int) -> bytes:
    """The 96-bit ChaCha20-Poly1305 nonce: 32 zero bits then the 64-bit little-endian counter."""
    return _NONCE_PREFIX + _COUNTER.pack(counter)


def aead_encrypt(key: bytes, counter: int, plaintext: bytes, ad: bytes) -> bytes:
    """One-shot ChaCha20-Poly1305 seal (handshake use; the data path reuses cipher objects)."""
    return ChaCha20Poly1305(key).encrypt(aead_nonce(counter), plaintext, ad)


def aead_decrypt(key: bytes, counter: int, ciphertext: bytes, ad: bytes) -> bytes:
    """One-shot ChaCha20-Poly1305 open; AuthenticationError when the tag does not verify."""
    if len(ciphertext) < AEAD_TAG_SIZE:
        raise AuthenticationError("ciphertext shorter than the tag")
    try:
        return ChaCha20Poly1305(key).decrypt(aead_nonce(counter), ciphertext, ad)
    except InvalidTag:
        raise AuthenticationError("AEAD tag mismatch") from None


def xaead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 seal with a 24-byte nonce (WireGuard cookie replies)."""
    return bytes(_sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, ad, nonce, key))


def xaead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    """XChaCha20-Poly1305 open; AuthenticationError when the tag does not verify."""
    if len(nonce) != XNONCE_SIZE or len(ciphertext) < AEAD_TAG_SIZE:
        raise AuthenticationError("malformed XChaCha20-Poly1305 input")
    try:
        return bytes(_sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, ad, nonce, key))
    except _NaclCryptoError:
        raise AuthenticationError("XAEAD tag mismatch") from None


def _check_len(key: bytes, what: str) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"{what} must be {KEY_SIZE} bytes, got {len(key)}")
