"""Pinning coord's control key: its fingerprint, and pre-auth keys that carry it.

An agent must know coord's public key before it seals a request to it; learning it from
`GET /key` over plain HTTP lets anyone on the path substitute their own. So the key is pinned:
given on the command line, persisted after the first login, or carried in the pre-auth key.
Coord appends its key's fingerprint to every pre-auth key its admin API hands out:

    wmauth-<prefix>-<secret>                 the key registry's form (still accepted by coord)
    wmauth-<prefix>-<secret>-<fingerprint>   what `wiremesh admin authkeys create` prints

The fingerprint is 32 hex digits (the first 16 bytes of a domain-separated SHA-256 of the key):
an agent holding such a pre-auth key fetches the key from `GET /key` and accepts it only if its
fingerprint matches, so the pre-auth key alone is enough to join over plain HTTP safely.
"""

from __future__ import annotations

import hashlib
import hmac
import re

FINGERPRINT_HEX = 32
_FINGERPRINT = re.compile(r"^[0-9a-f]{32}$")
_DOMAIN = b"wiremesh coord key fingerprint v1\x00"


def fingerprint(public_key: bytes) -> str:
    return hashlib.sha256(_DOMAIN + public_key).hexdigest()[:FINGERPRINT_HEX]


def matches(public_key: bytes, expected: str) -> bool:
    return hmac.compare_digest(fingerprint(public_key).encode(), expected.lower().encode())


def with_fingerprint(auth_key: str, public_key: bytes) -> str:
    """The registry's pre-auth key with coord's key fingerprint appended."""
    return f"{auth_key}-{fingerprint(public_key)}"


def split_auth_key(auth_key: str) -> tuple[str, str | None]:
    """(the key as the registry knows it, coord's key fingerprint or None for the old form)."""
    head, sep, tail = auth_key.rpartition("-")
    if sep and head.count("-") == 2 and _FINGERPRINT.match(tail):
        return head, tail
    return auth_key, None
