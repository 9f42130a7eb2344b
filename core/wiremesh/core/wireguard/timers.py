"""WireGuard's protocol constants (whitepaper section 6 and wireguard.com/protocol)."""

from __future__ import annotations

REKEY_AFTER_MESSAGES = 2**60
REJECT_AFTER_MESSAGES = 2**64 - 2**13 - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 1.0 / 3.0
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
# A responder ignores initiations from one peer that arrive faster than this (flood protection).
HANDSHAKE_INITIATION_RATE = 1.0 / 50.0
# Key material is erased this long after the last session was derived.
ZERO_KEYS_AFTER = 3 * REJECT_AFTER_TIME
# An initiator that receives data on a session this old starts a rekey (so it happens before expiry).
REKEY_ON_RECEIVE_AFTER = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
# Packets held per peer while its handshake is in flight.
MAX_QUEUED_PACKETS = 128
