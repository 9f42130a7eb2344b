"""Fuzz targets: every parser that takes bytes from the network or a user.

Each target takes one input and either consumes it or refuses it with the error its module
documents for bad input; any other exception (or a counted internal error) is a finding. The
same functions run under atheris (fuzz/run.py, coverage-guided) and, for the crashes found, as
plain regression tests (tests/fuzz/).

    wireguard   a Device with one peer receives the bytes as a UDP datagram
    disco       a disco message: decoded as plaintext and opened as a sealed box
    stun        a STUN message parsed, and answered as the STUN server would
    derp        DERP frames: the relay's connection state machine, then the frame codec
    control     the agent<->coord Noise channel: a request as coord opens it, a response stream
                as the agent reads it, and the JSON messages inside
    netmap      a netmap or delta as the agent decodes it from coord's JSON
    policy      a HuJSON policy file: parsed, checked, compiled for three nodes
    wgquick     a wg-quick style configuration file
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

from nacl.public import PrivateKey

from wiremesh.agent import wgconfig
from wiremesh.core import crypto, disco, stun
from wiremesh.core.control import messages as cm
from wiremesh.core.control.channel import ClientCall, ControlError, FrameReader, ReplayGuard, ServerCall
from wiremesh.core.derp import frames
from wiremesh.core.derp.connection import ServerConnection
from wiremesh.core.derp.frames import FrameError
from wiremesh.core.netmap import MapDelta, NetmapError, NetworkMap
from wiremesh.core.policy import PolicyCompiler, check_policy
from wiremesh.core.policy.model import PolicyNode
from wiremesh.core.wireguard import Device, PeerConfig

NOW = 1_700_000_000.0
# Fixed keys: a fuzzer needs the same behaviour for the same input.
_WG_A = bytes(range(1, 33))
_WG_B = bytes(range(2, 34))
_CONTROL = bytes(range(3, 35))
_MACHINE = bytes(range(4, 36))
_DERP = PrivateKey(bytes(range(5, 37)))
_DISCO_A = disco.DiscoKey(bytes(range(6, 38)))
_DISCO_B = disco.DiscoKey(bytes(range(7, 39)))
_SOURCE = ("198.18.0.1", 41641)


class Finding(AssertionError):
    """An input that broke a target's contract (not an exception the parser may raise)."""


def wireguard(data: bytes) -> None:
    device = Device(_WG_A, NOW)
    device.set_peer(PeerConfig(crypto.public_key(_WG_B), None, ("100.64.0.2/32",), _SOURCE))
    device.receive(data, _SOURCE, NOW)
    device.handle_timer(NOW + 1)
    if device.drops["internal_error"]:
        raise Finding("Device.receive hit an internal error")


def disco_message(data: bytes) -> None:
    disco.is_disco(data)
    with contextlib.suppress(disco.DiscoError):
        disco.decode(data)
    with contextlib.suppress(disco.DiscoError):
        _DISCO_A.open(data)
    sealed = _DISCO_B.seal(
        disco.Ping(tx_id=bytes(12), node_key=data[:32].ljust(32, b"\0")), _DISCO_A.public_key
    )
    _DISCO_A.open(sealed)  # a well-formed message still opens after any input


def stun_message(data: bytes) -> None:
    stun.is_stun(data)
    with contextlib.suppress(stun.StunError):
        stun.parse_message(data, allow_classic=True)
    stun.answer(data, _SOURCE)


def derp(data: bytes) -> None:
    conn = ServerConnection(_DERP, now=NOW, challenge=bytes(32), require_challenge=False)
    # The first byte splits the input in two chunks: frames split across reads must behave alike.
    cut = data[0] if data else 0
    try:
        for chunk in (data[1 : 1 + cut], data[1 + cut :]):
            for event in conn.receive_data(chunk, NOW):
                if type(event).__name__ == "ClientHello":
                    conn.accept(NOW)
            conn.data_to_send()
    except FrameError:
        pass
    reader = frames.FrameReader(frames.MAX_FRAME_LEN)
    try:
        for frame_type, payload in reader.feed(data):
            if frame_type in frames.KNOWN_TYPES:
                frame = frames.parse(frame_type, payload)
                if not isinstance(frame, frames.ServerKey):
                    frames.encode(frame)
    except FrameError:
        pass


def control(data: bytes) -> None:
    with contextlib.suppress(ControlError):
        ServerCall(_CONTROL, data, NOW, ReplayGuard())
    reader = FrameReader(max_frame=1 << 16)
    try:
        frames_in = reader.feed(data)
    except ControlError:
        frames_in = []
    call = ClientCall(_MACHINE, crypto.public_key(_CONTROL), b"{}", NOW)
    for frame in frames_in[:4]:
        with contextlib.suppress(ControlError):
            call.read_response(frame)
        with contextlib.suppress(ControlError):
            call.open_frame(frame)
    for cls in (cm.LoginRequest, cm.MapRequest, cm.UpdateRequest, cm.LoginResponse, cm.Reply):
        with contextlib.suppress(ControlError):
            cm.decode(cls, data)


def netmap(data: bytes) -> None:
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return  # coord sends JSON it wrote; the decoding below is what must hold
    try:
        current = NetworkMap.from_json(raw)
    except NetmapError:
        return
    with contextlib.suppress(NetmapError):
        MapDelta.from_json(raw).apply(current)


_NODES = [
    PolicyNode(1, "alice@example.com", frozenset(), ("100.64.0.1", "fd7a:115c:a1e0::1")),
    PolicyNode(2, "bob@example.com", frozenset({"tag:web"}), ("100.64.0.2",), ("192.168.1.0/24",)),
    PolicyNode(3, "bob@example.com", frozenset(), ("100.64.0.3",)),
]


def policy(data: bytes) -> None:
    parsed, _diagnostics = check_policy(data)
    if parsed is None:
        return
    compiler = PolicyCompiler(parsed, _NODES)
    for node in _NODES:
        compiler.compiled(node.id)


def wgquick(data: bytes) -> None:
    text = data.decode("utf-8", errors="replace")
    with contextlib.suppress(wgconfig.ConfigError):
        wgconfig.parse(text, "fuzz.conf")


TARGETS: dict[str, Callable[[bytes], None]] = {
    "wireguard": wireguard,
    "disco": disco_message,
    "stun": stun_message,
    "derp": derp,
    "control": control,
    "netmap": netmap,
    "policy": policy,
    "wgquick": wgquick,
}
