"""The Noise Protocol Framework (revision 34), the parts wiremesh uses, written once.

Only the 25519 / ChaChaPoly / BLAKE2s suite is implemented; handshake patterns come from a table,
so WireGuard (`Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s`) and the agent<->coord control channel
(`Noise_IK_25519_ChaChaPoly_BLAKE2s`, own prologue) share this code.

Typical use (IK, the initiator knows the responder's static public key)::

    i = HandshakeState(b"Noise_IK_25519_ChaChaPoly_BLAKE2s", True, prologue, s=client_priv, rs=server_pub)
    r = HandshakeState(b"Noise_IK_25519_ChaChaPoly_BLAKE2s", False, prologue, s=server_priv, rs=None)
    msg1 = i.write_message(b"hello")          # -> e, es, s, ss
    assert r.read_message(msg1) == b"hello"   # r.remote_static is now the client's public key
    msg2 = r.write_message(b"")               # <- e, ee, se
    i.read_message(msg2)
    i_send, i_recv = i.split()
    r_recv, r_send = r.split()                # split() gives (initiator->responder, responder->initiator)

A responder that only learns which pre-shared key to use after reading the first message (WireGuard
looks the peer up by the static key inside it) may assign `psk` between `read_message` and the
`write_message` that consumes the psk token.

Errors: every failure raises a NoiseError subclass; a HandshakeState that raised is not reusable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wiremesh.core import crypto

__all__ = [
    "MAX_MESSAGE_SIZE",
    "CipherState",
    "DecryptError",
    "HandshakeState",
    "NoiseError",
    "NoiseStateError",
    "NoiseValueError",
    "SymmetricState",
]

MAX_MESSAGE_SIZE = 65535
DH_LEN = 32
HASH_LEN = 32
TAG_LEN = 16
MAX_NONCE = 2**64 - 1  # reserved by the spec; using it is an error


class NoiseError(Exception):
    """Base class of all Noise failures."""


class DecryptError(NoiseError):
    """An AEAD tag did not verify (wrong key, tampered or truncated message)."""


class NoiseStateError(NoiseError):
    """An operation out of order: writing when it is the peer's turn, splitting too early, nonce exhausted."""


class NoiseValueError(NoiseError):
    """Malformed input: wrong sizes, unsupported protocol name, missing keys, bad public keys."""


# Handshake patterns: (pre-message tokens for the initiator, for the responder, message token lists).
# Messages alternate initiator -> responder -> initiator ...
@dataclass(frozen=True, slots=True)
class _Pattern:
    initiator_pre: tuple[str, ...]
    responder_pre: tuple[str, ...]
    messages: tuple[tuple[str, ...], ...]


_PATTERNS: dict[str, _Pattern] = {
    "NN": _Pattern((), (), (("e",), ("e", "ee"))),
    "NK": _Pattern((), ("s",), (("e", "es"), ("e", "ee"))),
    "IK": _Pattern((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se"))),
    "XX": _Pattern((), (), (("e",), ("e", "ee", "s", "es"), ("s", "se"))),
}


@dataclass(frozen=True, slots=True)
class _Protocol:
    name: bytes
    pattern: _Pattern
    psk_positions: tuple[int, ...]
    initial_h: bytes


@functools.lru_cache(maxsize=32)
def _parse_protocol(name: bytes) -> _Protocol:
    try:
        text = name.decode("ascii")
        prefix, pattern_text, dh_name, cipher_name, hash_name = text.split("_")
    except (UnicodeDecodeError, ValueError):
        raise NoiseValueError(f"not a Noise protocol name: {name!r}") from None
    if prefix != "Noise" or (dh_name, cipher_name, hash_name) != ("25519", "ChaChaPoly", "BLAKE2s"):
        raise NoiseValueError(f"unsupported Noise protocol {text!r} (only 25519_ChaChaPoly_BLAKE2s)")
    base = pattern_text
    positions: list[int] = []
    # Modifiers such as "psk2" (several joined with "+") follow the base pattern letters.
    for i, ch in enumerate(pattern_text):
        if ch.islower():
            base = pattern_text[:i]
            for modifier in pattern_text[i:].split("+"):
                if not modifier.startswith("psk") or not modifier[3:].isdigit():
                    raise NoiseValueError(f"unsupported pattern modifier {modifier!r}")
                positions.append(int(modifier[3:]))
            break
    pattern = _PATTERNS.get(base)
    if pattern is None:
        raise NoiseValueError(f"unsupported handshake pattern {base!r}")
    messages = [list(m) for m in pattern.messages]
    for pos in positions:
        if pos == 0:
            messages[0].insert(0, "psk")
        elif pos <= len(messages):
            messages[pos - 1].append("psk")
        else:
            raise NoiseValueError(f"psk{pos} is beyond the pattern's {len(messages)} messages")
    pattern = _Pattern(pattern.initiator_pre, pattern.responder_pre, tuple(tuple(m) for m in messages))
    initial_h = name.ljust(HASH_LEN, b"\x00") if len(name) <= HASH_LEN else crypto.blake2s_hash(name)
    return _Protocol(name, pattern, tuple(positions), initial_h)


class CipherState:
    """A key and a 64-bit nonce counter. Without a key, encryption is the identity (Noise spec)."""

    __slots__ = ("_aead", "_key", "n")

    def __init__(self, key: bytes | None = None) -> None:
        self._key: bytes | None = None
        self._aead: ChaCha20Poly1305 | None = None
        self.n = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes | None) -> None:
        if key is not None and len(key) != 32:
            raise NoiseValueError("cipher key must be 32 bytes")
        self._key = key
        self._aead = ChaCha20Poly1305(key) if key is not None else None
        self.n = 0

    @property
    def key(self) -> bytes | None:
        return self._key

    def has_key(self) -> bool:
        return self._key is not None

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        if self._aead is None:
            return plaintext
        if self.n >= MAX_NONCE:
            raise NoiseStateError("nonce exhausted; rekey or start a new handshake")
        out = self._aead.encrypt(crypto.aead_nonce(self.n), plaintext, ad)
        self.n += 1
        return out

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        if self._aead is None:
            return ciphertext
        if self.n >= MAX_NONCE:
            raise NoiseStateError("nonce exhausted; rekey or start a new handshake")
        if len(ciphertext) < TAG_LEN:
            raise DecryptError("ciphertext shorter than the authentication tag")
        try:
            out = self._aead.decrypt(crypto.aead_nonce(self.n), ciphertext, ad)
        except InvalidTag:
            raise DecryptError("authentication tag mismatch") from None
        self.n += 1
        return out

    def copy(self) -> CipherState:
        clone = CipherState()
        clone._key, clone._aead, clone.n = self._key, self._aead, self.n
        return clone

    def rekey(self) -> None:
        """REKEY(k) from the spec: k = first 32 bytes of ENCRYPT(k, maxnonce, zerolen, zeros)."""
        if self._aead is None:
            raise NoiseStateError("no key to rekey")
        new_key = self._aead.encrypt(crypto.aead_nonce(MAX_NONCE), bytes(32), b"")[:32]
        n = self.n
        self.initialize_key(new_key)
        self.n = n


class SymmetricState:
    """The chaining key ck, handshake hash h and the current CipherState."""

    __slots__ = ("ck", "cs", "h")

    def __init__(self, protocol_name: bytes) -> None:
        protocol = _parse_protocol(protocol_name)
        self.h = protocol.initial_h
        self.ck = protocol.initial_h
        self.cs = CipherState()

    def copy(self) -> SymmetricState:
        clone = SymmetricState.__new__(SymmetricState)
        clone.h, clone.ck, clone.cs = self.h, self.ck, self.cs.copy()
        return clone

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_k = crypto.hkdf(self.ck, input_key_material, 2)
        self.cs.initialize_key(temp_k)

    def mix_hash(self, data: bytes) -> None:
        self.h = crypto.blake2s_hash(self.h, data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.ck, temp_h, temp_k = crypto.hkdf(self.ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self.cs.initialize_key(temp_k)

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = crypto.hkdf(self.ck, b"", 2)
        return CipherState(k1), CipherState(k2)


class HandshakeState:
    """One Noise handshake, for one role.

    protocol_name: e.g. b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s".
    s: our static private key (may be None for patterns that send no static key).
    rs: the peer's static public key when the pattern pre-shares it (IK initiator), else None.
    psk: 32-byte pre-shared key for psk patterns (may also be set later, see the module doc).
    psk_position: optional cross-check of the position in the protocol name.
    ephemeral: a fixed ephemeral private key, for test vectors only.
    """

    def __init__(
        self,
        protocol_name: bytes,
        initiator: bool,
        prologue: bytes,
        s: bytes | None,
        rs: bytes | None,
        psk: bytes | None = None,
        psk_position: int | None = None,
        ephemeral: bytes | None = None,
    ) -> None:
        protocol = _parse_protocol(protocol_name)
        if psk_position is not None and psk_position not in protocol.psk_positions:
            raise NoiseValueError(f"psk{psk_position} does not match protocol {protocol_name!r}")
        self._protocol = protocol
        self.initiator = initiator
        self._ss = SymmetricState(protocol_name)
        self._s = s
        self._s_pub = crypto.public_key(s) if s is not None else None
        self._e = ephemeral
        self._e_pub: bytes | None = None
        self.remote_static: bytes | None = rs
        self.remote_ephemeral: bytes | None = None
        self.psk = psk
        self._message_index = 0
        self._failed = False
        if rs is not None and len(rs) != DH_LEN:
            raise NoiseValueError("remote static key must be 32 bytes")
        self._ss.mix_hash(prologue)
        pattern = protocol.pattern
        for token in pattern.initiator_pre:
            key = self._s_pub if initiator else rs
            self._pre_message(token, key, "initiator")
        for token in pattern.responder_pre:
            key = rs if initiator else self._s_pub
            self._pre_message(token, key, "responder")

    def _pre_message(self, token: str, key: bytes | None, side: str) -> None:
        if token != "s" or key is None:
            raise NoiseValueError(f"the pattern needs the {side}'s static key before the handshake")
        self._ss.mix_hash(key)

    def copy(self) -> HandshakeState:
        """An independent copy: lets a caller try a message that may be forged without losing the
        state (WireGuard must survive a bogus response carrying a valid index)."""
        clone = HandshakeState.__new__(HandshakeState)
        for name, value in vars(self).items():
            setattr(clone, name, value)
        clone._ss = self._ss.copy()
        return clone

    @property
    def handshake_hash(self) -> bytes:
        return self._ss.h

    @property
    def local_static_public(self) -> bytes | None:
        return self._s_pub

    def is_finished(self) -> bool:
        return self._message_index >= len(self._protocol.pattern.messages)

    def _my_turn(self) -> bool:
        return (self._message_index % 2 == 0) == self.initiator

    def _uses_psk(self) -> bool:
        return bool(self._protocol.psk_positions)

    def _dh(self, ours: bytes | None, theirs: bytes | None) -> bytes:
        if ours is None or theirs is None:
            raise NoiseValueError("a DH token needs a key that is missing")
        try:
            return crypto.dh(ours, theirs)
        except crypto.AuthenticationError:
            raise NoiseValueError("peer sent a low-order public key") from None

    def _dh_token(self, token: str) -> bytes:
        # First letter: initiator's key, second: responder's key.
        first, second = token[0], token[1]
        if self.initiator:
            ours = self._e if first == "e" else self._s
            theirs = self.remote_ephemeral if second == "e" else self.remote_static
        else:
            ours = self._e if second == "e" else self._s
            theirs = self.remote_ephemeral if first == "e" else self.remote_static
        return self._dh(ours, theirs)

    def _mix_psk(self) -> None:
        if self.psk is None or len(self.psk) != 32:
            raise NoiseValueError("this pattern needs a 32-byte pre-shared key")
        self._ss.mix_key_and_hash(self.psk)

    def _check_usable(self, writing: bool) -> None:
        if self._failed:
            raise NoiseStateError("handshake already failed")
        if self.is_finished():
            raise NoiseStateError("handshake already finished")
        if self._my_turn() != writing:
            raise NoiseStateError("not this side's turn to " + ("write" if writing else "read"))

    def write_message(self, payload: bytes) -> bytes:
        """Process the next message pattern as sender; returns the handshake message."""
        self._check_usable(writing=True)
        try:
            out = bytearray()
            for token in self._protocol.pattern.messages[self._message_index]:
                if token == "e":
                    if self._e is None:
                        self._e = crypto.generate_private_key()
                    self._e_pub = crypto.public_key(self._e)
                    out += self._e_pub
                    self._ss.mix_hash(self._e_pub)
                    if self._uses_psk():
                        self._ss.mix_key(self._e_pub)
                elif token == "s":
                    if self._s_pub is None:
                        raise NoiseValueError("the pattern sends a static key but none was given")
                    out += self._ss.encrypt_and_hash(self._s_pub)
                elif token == "psk":
                    self._mix_psk()
                else:
                    self._ss.mix_key(self._dh_token(token))
            out += self._ss.encrypt_and_hash(payload)
        except NoiseError:
            self._failed = True
            raise
        if len(out) > MAX_MESSAGE_SIZE:
            self._failed = True
            raise NoiseValueError("handshake message exceeds 65535 bytes")
        self._message_index += 1
        return bytes(out)

    def read_message(self, message: bytes) -> bytes:
        """Process the next message pattern as receiver; returns the decrypted payload."""
        self._check_usable(writing=False)
        if len(message) > MAX_MESSAGE_SIZE:
            self._failed = True
            raise NoiseValueError("handshake message exceeds 65535 bytes")
        view = bytes(message)
        pos = 0
        try:
            for token in self._protocol.pattern.messages[self._message_index]:
                if token == "e":
                    if len(view) - pos < DH_LEN:
                        raise NoiseValueError("handshake message too short for an ephemeral key")
                    self.remote_ephemeral = view[pos : pos + DH_LEN]
                    pos += DH_LEN
                    self._ss.mix_hash(self.remote_ephemeral)
                    if self._uses_psk():
                        self._ss.mix_key(self.remote_ephemeral)
                elif token == "s":
                    size = DH_LEN + (TAG_LEN if self._ss.cs.has_key() else 0)
                    if len(view) - pos < size:
                        raise NoiseValueError("handshake message too short for a static key")
                    self.remote_static = self._ss.decrypt_and_hash(view[pos : pos + size])
                    pos += size
                elif token == "psk":
                    self._mix_psk()
                else:
                    self._ss.mix_key(self._dh_token(token))
            payload = self._ss.decrypt_and_hash(view[pos:])
        except NoiseError:
            self._failed = True
            raise
        self._message_index += 1
        return payload

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator-to-responder, responder-to-initiator) cipher states, once the handshake is done."""
        if not self.is_finished() or self._failed:
            raise NoiseStateError("split before the handshake finished")
        return self._ss.split()
