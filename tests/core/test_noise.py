"""Noise handshake machinery: an official vector for IK, round trips, and failures."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wiremesh.core import crypto
from wiremesh.core.noise import (
    CipherState,
    DecryptError,
    HandshakeState,
    NoiseError,
    NoiseStateError,
    NoiseValueError,
)

IK = b"Noise_IK_25519_ChaChaPoly_BLAKE2s"
IKPSK2 = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"

# Noise_IK_25519_ChaChaPoly_BLAKE2s vector published with noise-c (inputs and expected outputs).
VEC_INIT_S = "e61ef9919cde45dd5f82166404bd08e38bceb5dfdfded0a34c8df7ed542214d1"
VEC_INIT_E = "893e28b9dc6ca8d611ab664754b8ceb7bac5117349a4439a6b0569da977c464a"
VEC_RESP_S = "4a3acbfdb163dec651dfa3194dece676d437029c62a408b4c5ea9114246e4893"
VEC_RESP_E = "bbdb4cdbd309f1a1f2e1456967fe288cadd6f712d65dc7b7793d5e63da6b375b"
VEC_RESP_PUB = "31e0303fd6418d2f8c0e78b91f22e8caed0fbe48656dcf4767e4834f701b8f62"
VEC_PROLOGUE = "50726f6c6f677565313233"
VEC_MESSAGES = [
    (
        "4c756477696720766f6e204d69736573",
        "ca35def5ae56cec33dc2036731ab14896bc4c75dbb07a61f879f8e3afa4c79440b03ddc7aac5123d06a1b23b71670e32e76c"
        "28239a7ca4ac8f784de7e44c1adb78f2058771dfd4229fbdc85c5fba3b587b1d171ce368229c7b752ac25b8faf4e7b2fab7326"
        "f0d6fa1fdbef58de623245",
    ),
    (
        "4d757272617920526f746862617264",
        "95ebc60d2b1fa672c1f46a8aa265ef51bfe38e7ccb39ec5be34069f144808843d9b5a8927f0ac9655ef76833bc7e55269c08"
        "1ec38c61031f76fe15b2aaaad5",
    ),
]
VEC_HASH = "45e34c56ca0de9c348e104edcf503035e5559ceed661ac22916f6f171696d994"
VEC_TRANSPORT = [
    ("i", "462e20412e20486179656b", "2c256ed08fcd08c2980f954ee4beaccb61c9581340f5dd2fd1cf3b"),
    ("r", "4361726c204d656e676572", "d6033f70eee20945c7c9dba304e397ee3b284ff5e00fd9efb095d3"),
    (
        "i",
        "4a65616e2d426170746973746520536179",
        "a9c068ca5d8babf72560652d8e851adbfac35c8a66e810d560863173e96adf4cfe",
    ),
    (
        "r",
        "457567656e2042f6686d20766f6e2042617765726b",
        "2a09d8f459e5927e40fdd2eddc99bdafb04e13a26f145cb5cfe9e6ba34c94331ebc17d5156",
    ),
]


def _vector_pair() -> tuple[HandshakeState, HandshakeState]:
    prologue = bytes.fromhex(VEC_PROLOGUE)
    i = HandshakeState(
        IK,
        True,
        prologue,
        s=bytes.fromhex(VEC_INIT_S),
        rs=bytes.fromhex(VEC_RESP_PUB),
        ephemeral=bytes.fromhex(VEC_INIT_E),
    )
    r = HandshakeState(
        IK, False, prologue, s=bytes.fromhex(VEC_RESP_S), rs=None, ephemeral=bytes.fromhex(VEC_RESP_E)
    )
    return i, r


def test_ik_matches_published_vector_messages_hash_and_transport() -> None:
    assert crypto.public_key(bytes.fromhex(VEC_RESP_S)).hex() == VEC_RESP_PUB
    i, r = _vector_pair()
    (p0, c0), (p1, c1) = VEC_MESSAGES
    m0 = i.write_message(bytes.fromhex(p0))
    assert m0.hex() == c0
    assert r.read_message(m0).hex() == p0
    assert r.remote_static == crypto.public_key(bytes.fromhex(VEC_INIT_S))
    m1 = r.write_message(bytes.fromhex(p1))
    assert m1.hex() == c1
    assert i.read_message(m1).hex() == p1
    assert i.handshake_hash.hex() == VEC_HASH == r.handshake_hash.hex()
    i_send, i_recv = i.split()
    r_recv, r_send = r.split()
    for who, plain, cipher in VEC_TRANSPORT:
        sender, receiver = (i_send, r_recv) if who == "i" else (r_send, i_recv)
        ct = sender.encrypt_with_ad(b"", bytes.fromhex(plain))
        assert ct.hex() == cipher
        assert receiver.decrypt_with_ad(b"", ct).hex() == plain


def _keys() -> tuple[bytes, bytes]:
    return crypto.generate_private_key(), crypto.generate_private_key()


def test_ikpsk2_round_trip_gives_matching_transport_keys() -> None:
    si, sr = _keys()
    psk = bytes(range(32))
    i = HandshakeState(IKPSK2, True, b"p", s=si, rs=crypto.public_key(sr), psk=psk, psk_position=2)
    r = HandshakeState(IKPSK2, False, b"p", s=sr, rs=None)
    assert r.read_message(i.write_message(b"ts")) == b"ts"
    r.psk = psk  # learnt only once the initiator's static key is known
    assert i.read_message(r.write_message(b"")) == b""
    i_send, i_recv = i.split()
    r_recv, r_send = r.split()
    assert r_recv.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"up")) == b"up"
    assert i_recv.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"down")) == b"down"


def test_psk_mismatch_fails_the_response() -> None:
    si, sr = _keys()
    i = HandshakeState(IKPSK2, True, b"", s=si, rs=crypto.public_key(sr), psk=bytes(32))
    r = HandshakeState(IKPSK2, False, b"", s=sr, rs=None, psk=b"\x01" * 32)
    r.read_message(i.write_message(b""))
    with pytest.raises(DecryptError):
        i.read_message(r.write_message(b""))


def test_wrong_responder_key_fails_the_first_message() -> None:
    si, sr = _keys()
    other = crypto.generate_private_key()
    i = HandshakeState(IK, True, b"", s=si, rs=crypto.public_key(other))
    r = HandshakeState(IK, False, b"", s=sr, rs=None)
    with pytest.raises(DecryptError):
        r.read_message(i.write_message(b"x"))


def test_prologue_mismatch_fails() -> None:
    si, sr = _keys()
    i = HandshakeState(IK, True, b"a", s=si, rs=crypto.public_key(sr))
    r = HandshakeState(IK, False, b"b", s=sr, rs=None)
    with pytest.raises(DecryptError):
        r.read_message(i.write_message(b""))


def test_truncated_message_is_rejected() -> None:
    si, sr = _keys()
    i = HandshakeState(IK, True, b"", s=si, rs=crypto.public_key(sr))
    r = HandshakeState(IK, False, b"", s=sr, rs=None)
    with pytest.raises(NoiseValueError):
        r.read_message(i.write_message(b"")[:40])


def test_out_of_turn_operations_raise_state_errors() -> None:
    si, sr = _keys()
    i = HandshakeState(IK, True, b"", s=si, rs=crypto.public_key(sr))
    with pytest.raises(NoiseStateError):
        i.read_message(b"\x00" * 96)
    with pytest.raises(NoiseStateError):
        i.split()


def test_unsupported_protocol_name_is_rejected() -> None:
    with pytest.raises(NoiseValueError):
        HandshakeState(b"Noise_IK_448_AESGCM_SHA512", True, b"", s=bytes(32), rs=bytes(32))


def test_ik_initiator_without_responder_key_is_rejected() -> None:
    with pytest.raises(NoiseValueError):
        HandshakeState(IK, True, b"", s=crypto.generate_private_key(), rs=None)


def test_cipher_state_counts_nonces_and_rejects_tampering() -> None:
    a, b = CipherState(bytes(32)), CipherState(bytes(32))
    ct = a.encrypt_with_ad(b"ad", b"hello")
    assert a.n == 1
    tampered = bytes([ct[0] ^ 1]) + ct[1:]
    with pytest.raises(DecryptError):
        b.decrypt_with_ad(b"ad", tampered)
    assert b.n == 0
    assert b.decrypt_with_ad(b"ad", ct) == b"hello"


def test_xx_round_trip_learns_both_static_keys() -> None:
    si, sr = _keys()
    name = b"Noise_XX_25519_ChaChaPoly_BLAKE2s"
    i = HandshakeState(name, True, b"", s=si, rs=None)
    r = HandshakeState(name, False, b"", s=sr, rs=None)
    r.read_message(i.write_message(b""))
    i.read_message(r.write_message(b""))
    r.read_message(i.write_message(b""))
    assert i.remote_static == crypto.public_key(sr)
    assert r.remote_static == crypto.public_key(si)
    assert i.handshake_hash == r.handshake_hash


def test_psk0_modifier_round_trip() -> None:
    name = b"Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s"
    i = HandshakeState(name, True, b"", s=None, rs=None, psk=b"k" * 32)
    r = HandshakeState(name, False, b"", s=None, rs=None, psk=b"k" * 32)
    assert r.read_message(i.write_message(b"one")) == b"one"
    assert i.read_message(r.write_message(b"two")) == b"two"
    assert i.handshake_hash == r.handshake_hash


def test_psk_pattern_without_psk_is_rejected() -> None:
    si, sr = _keys()
    i = HandshakeState(IKPSK2, True, b"", s=si, rs=crypto.public_key(sr))
    r = HandshakeState(IKPSK2, False, b"", s=sr, rs=None)
    r.read_message(i.write_message(b""))
    with pytest.raises(NoiseValueError):
        r.write_message(b"")


def test_copy_lets_a_failed_read_be_retried_with_the_real_message() -> None:
    si, sr = _keys()
    i = HandshakeState(IK, True, b"", s=si, rs=crypto.public_key(sr))
    r = HandshakeState(IK, False, b"", s=sr, rs=None)
    r.read_message(i.write_message(b""))
    reply = r.write_message(b"ok")
    attempt = i.copy()
    with pytest.raises(DecryptError):
        attempt.read_message(reply[:-1] + bytes([reply[-1] ^ 1]))
    assert i.read_message(reply) == b"ok"


@given(st.binary(max_size=200))
def test_responder_read_of_random_bytes_raises_only_noise_errors(data: bytes) -> None:
    r = HandshakeState(IK, False, b"", s=_RESPONDER_KEY, rs=None)
    with contextlib.suppress(NoiseError):
        r.read_message(data)


_RESPONDER_KEY = crypto.generate_private_key()
