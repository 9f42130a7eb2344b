"""mac1 / mac2 and cookie replies: WireGuard's DoS mitigation (whitepaper section 5.4.7).

mac1 proves the sender knows our public key; under load the responder additionally demands mac2,
keyed with a cookie bound to the sender's address and a secret that rotates every two minutes,
and answers a handshake message without it with an encrypted cookie reply.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Hashable

from wiremesh.core import crypto
from wiremesh.core.wireguard.messages import (
    COOKIE_REPLY_HEADER,
    LABEL_COOKIE,
    LABEL_MAC1,
    MESSAGE_COOKIE_REPLY,
)
from wiremesh.core.wireguard.timers import COOKIE_REFRESH_TIME

__all__ = [
    "COOKIE_REFRESH_TIME",
    "CookieChecker",
    "HandshakeRateLimiter",
    "add_macs",
    "endpoint_bytes",
    "open_cookie_reply",
]

_ZERO_MAC = bytes(16)


def endpoint_bytes(endpoint: Hashable) -> bytes:
    """Bytes identifying a sender's address for its cookie: packed IP and port for (host, port)
    tuples, a stable text form for any other endpoint object (e.g. a relay path)."""
    if isinstance(endpoint, tuple) and len(endpoint) >= 2 and isinstance(endpoint[1], int):
        try:
            return ipaddress.ip_address(endpoint[0]).packed + (endpoint[1] & 0xFFFF).to_bytes(2, "big")
        except ValueError:
            pass
    return repr(endpoint).encode("utf-8", "replace")


class CookieChecker:
    """Responder side: verifies mac1/mac2 of messages addressed to our static key, makes cookie replies."""

    def __init__(self, our_public_key: bytes, now: float) -> None:
        self.mac1_key = crypto.blake2s_hash(LABEL_MAC1, our_public_key)
        self.cookie_key = crypto.blake2s_hash(LABEL_COOKIE, our_public_key)
        self._secret = os.urandom(32)
        self._secret_time = now

    def mac1_valid(self, message: bytes, mac1_offset: int) -> bool:
        expected = crypto.blake2s_mac(self.mac1_key, message[:mac1_offset])
        return hmac.compare_digest(expected, message[mac1_offset : mac1_offset + 16])

    def _cookie(self, source: Hashable, now: float) -> bytes:
        if now - self._secret_time >= COOKIE_REFRESH_TIME or now < self._secret_time:
            self._secret = os.urandom(32)
            self._secret_time = now
        return crypto.blake2s_mac(self._secret, endpoint_bytes(source))

    def mac2_valid(self, message: bytes, mac1_offset: int, source: Hashable, now: float) -> bool:
        mac2_offset = mac1_offset + 16
        mac2 = message[mac2_offset : mac2_offset + 16]
        if mac2 == _ZERO_MAC:
            return False
        expected = crypto.blake2s_mac(self._cookie(source, now), message[:mac2_offset])
        return hmac.compare_digest(expected, mac2)

    def cookie_reply(
        self, message: bytes, mac1_offset: int, sender_index: int, source: Hashable, now: float
    ) -> bytes:
        nonce = os.urandom(crypto.XNONCE_SIZE)
        mac1 = message[mac1_offset : mac1_offset + 16]
        sealed = crypto.xaead_encrypt(self.cookie_key, nonce, self._cookie(source, now), mac1)
        return COOKIE_REPLY_HEADER.pack(MESSAGE_COOKIE_REPLY, sender_index) + nonce + sealed


def open_cookie_reply(peer_cookie_key: bytes, reply: bytes, last_mac1: bytes) -> bytes:
    """Initiator side: the cookie inside a reply to the handshake message whose mac1 was `last_mac1`.
    AuthenticationError if it was not made for that message by that peer."""
    return crypto.xaead_decrypt(peer_cookie_key, reply[8:32], reply[32:64], last_mac1)


def add_macs(message: bytes, peer_mac1_key: bytes, cookie: bytes | None) -> tuple[bytes, bytes]:
    """Append mac1 and mac2 (zeros without a fresh cookie); returns (message with macs, mac1)."""
    mac1 = crypto.blake2s_mac(peer_mac1_key, message)
    with_mac1 = message + mac1
    mac2 = crypto.blake2s_mac(cookie, with_mac1) if cookie is not None else _ZERO_MAC
    return with_mac1 + mac2, mac1


class HandshakeRateLimiter:
    """Per source address token bucket for handshake messages that passed mac2 while under load:
    a proven address still may not make us spend more than a few DH operations per second."""

    PER_SECOND = 20.0
    BURST = 5.0
    MAX_SOURCES = 4096

    def __init__(self) -> None:
        self._buckets: dict[object, tuple[float, float]] = {}  # source host -> (tokens, last time)

    def allow(self, source: Hashable, now: float) -> bool:
        host: object = source[0] if isinstance(source, tuple) and source else source
        tokens, last = self._buckets.get(host, (self.BURST, now))
        tokens = min(self.BURST, tokens + max(0.0, now - last) * self.PER_SECOND)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if host not in self._buckets and len(self._buckets) >= self.MAX_SOURCES:
            # Forget sources whose buckets have refilled; they are indistinguishable from new ones.
            horizon = now - self.BURST / self.PER_SECOND
            self._buckets = {h: v for h, v in self._buckets.items() if v[1] > horizon}
            if len(self._buckets) >= self.MAX_SOURCES:
                self._buckets.clear()
        self._buckets[host] = (tokens, now)
        return allowed
