"""The agent <-> coord control channel, sans-I/O.

Every agent request is one HTTP POST whose body is the first message of a Noise IK
handshake (Noise_IK_25519_ChaChaPoly_BLAKE2s, prologue "wiremesh control v1"): the agent's
machine key is its static key, so a request that decrypts is authenticated by the machine
key, end to end, whatever terminates TLS in between. The encrypted payload starts with the
agent's clock (8 bytes, big-endian nanoseconds), then the request. Coord refuses a
handshake that does not decrypt (forged, or made for another coord key), one whose
timestamp is outside the freshness window (stale), and one whose ephemeral key it has
already seen within that window (replayed).

The response body is a sequence of frames, each `length u32 BE | bytes`. The first frame is
the second handshake message carrying the response; a streaming response (the netmap
stream) continues with transport frames sealed by the responder->initiator CipherState, so
their implicit counters must strictly increase: a dropped, reordered or replayed frame
fails to decrypt.
"""

from __future__ import annotations

import collections
import struct

from wiremesh.core import crypto
from wiremesh.core.noise import CipherState, HandshakeState, NoiseError

PROTOCOL = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
PROLOGUE = b"wiremesh control v1"
MAX_REQUEST_BYTES = 64 * 1024  # a whole request body: handshake + payload
MAX_FRAME_BYTES = 32 * 1024 * 1024  # a full netmap of a large tailnet fits
FRESHNESS_WINDOW = 120.0  # seconds of clock difference tolerated either way
_HEADER = struct.Struct(">I")
_TIMESTAMP = struct.Struct(">Q")
MSG1_OVERHEAD = 32 + 48 + 16  # e, encrypted s, payload tag


class ControlError(Exception):
    """Something the other side sent is refused; `status` is the HTTP status coord answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class HandshakeRefused(ControlError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 403)


class ClientCall:
    """One request from the agent (initiator) side."""

    def __init__(self, machine_private: bytes, server_public: bytes, payload: bytes, now: float) -> None:
        self.machine_public = crypto.public_key(machine_private)
        self._hs = HandshakeState(PROTOCOL, True, PROLOGUE, s=machine_private, rs=server_public)
        self.request = self._hs.write_message(_TIMESTAMP.pack(int(now * 1e9)) + payload)
        if len(self.request) > MAX_REQUEST_BYTES:
            raise ControlError(f"request too large ({len(self.request)} bytes)")
        self._recv: CipherState | None = None

    def read_response(self, message: bytes) -> bytes:
        """The response payload; after this, `open_frame` decrypts any following stream frames."""
        try:
            payload = self._hs.read_message(message)
            _send, self._recv = self._hs.split()
        except NoiseError as exc:
            raise ControlError(f"coord response did not authenticate: {exc}") from exc
        return payload

    def open_frame(self, frame: bytes) -> bytes:
        if self._recv is None:
            raise ControlError("stream frame before the handshake response")
        try:
            return self._recv.decrypt_with_ad(b"", frame)
        except NoiseError as exc:
            raise ControlError(f"stream frame did not authenticate: {exc}") from exc


class ReplayGuard:
    """Ephemeral keys seen within the freshness window (bounded; oldest forgotten first).

    A handshake older than the window is refused for staleness, so remembering keys for the
    window is enough to refuse every replay reaching this replica.
    """

    def __init__(self, window: float = FRESHNESS_WINDOW, max_entries: int = 1_000_000) -> None:
        self.window = window
        self.max_entries = max_entries
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    def check_and_remember(self, ephemeral: bytes, sent_at: float, now: float) -> None:
        if abs(now - sent_at) > self.window:
            raise HandshakeRefused(
                f"stale handshake: timestamp is {now - sent_at:+.0f}s off coord's clock "
                f"(window {self.window:.0f}s); check the clock"
            )
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at >= now - 2 * self.window and len(self._seen) < self.max_entries:
                break
            del self._seen[key]
        if ephemeral in self._seen:
            raise HandshakeRefused("replayed handshake refused")
        self._seen[ephemeral] = now

    def remember(self, ephemeral: bytes, now: float) -> None:
        """Record a handshake another replica accepted, so a replay to this one is refused too."""
        if len(self._seen) < self.max_entries:
            self._seen.setdefault(ephemeral, now)


class ServerCall:
    """One request on the coord (responder) side."""

    def __init__(self, server_private: bytes, message: bytes, now: float, guard: ReplayGuard) -> None:
        if len(message) > MAX_REQUEST_BYTES:
            raise ControlError("request too large", 413)
        if len(message) < MSG1_OVERHEAD + _TIMESTAMP.size:
            raise HandshakeRefused("malformed handshake: too short")
        self._hs = HandshakeState(PROTOCOL, False, PROLOGUE, s=server_private, rs=None)
        try:
            plaintext = self._hs.read_message(message)
        except NoiseError:
            raise HandshakeRefused(
                "handshake failed: not encrypted to this coord's key, or tampered with"
            ) from None
        if len(plaintext) < _TIMESTAMP.size or self._hs.remote_static is None:
            raise HandshakeRefused("malformed handshake payload")
        (sent_ns,) = _TIMESTAMP.unpack_from(plaintext)
        self.ephemeral = message[:32]
        self.sent_at = sent_ns / 1e9  # the agent's clock; within the freshness window of `now`
        guard.check_and_remember(self.ephemeral, self.sent_at, now)
        self.machine_key: bytes = self._hs.remote_static
        self.payload = plaintext[_TIMESTAMP.size :]
        self._send: CipherState | None = None

    def respond(self, payload: bytes) -> bytes:
        """The second handshake message carrying `payload`, framed."""
        message = self._hs.write_message(payload)
        _recv, self._send = self._hs.split()
        return frame(message)

    def seal_frame(self, plaintext: bytes) -> bytes:
        """A framed transport message for the stream that follows `respond`."""
        if self._send is None:
            raise ControlError("seal_frame before respond")
        return frame(self._send.encrypt_with_ad(b"", plaintext))


def frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data


class FrameReader:
    """Reassembles `length | bytes` frames from arbitrary chunks; refuses oversized frames."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buf += chunk
        frames: list[bytes] = []
        while len(self._buf) >= _HEADER.size:
            (length,) = _HEADER.unpack_from(self._buf)
            if length > self.max_frame:
                raise ControlError(f"frame of {length} bytes exceeds the {self.max_frame}-byte limit")
            end = _HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(bytes(self._buf[_HEADER.size : end]))
            del self._buf[:end]
        return frames

    @property
    def pending(self) -> int:
        return len(self._buf)
