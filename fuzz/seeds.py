"""Write the seed corpora (fuzz/corpus/TARGET/seed-*): real messages from our own encoders, so
the fuzzer starts from valid inputs and mutates them. Run it again after a wire format changes:

    .venv/bin/python fuzz/seeds.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nacl.public import PrivateKey

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import targets  # noqa: E402

from wiremesh.core import crypto, disco, stun  # noqa: E402
from wiremesh.core.control import messages as cm  # noqa: E402
from wiremesh.core.control.channel import ClientCall, ReplayGuard, ServerCall  # noqa: E402
from wiremesh.core.derp import frames  # noqa: E402
from wiremesh.core.derp.connection import ClientConnection, ServerConnection  # noqa: E402
from wiremesh.core.netmap import MapDelta, NetworkMap, Node  # noqa: E402
from wiremesh.core.wireguard import Device, PeerConfig  # noqa: E402

ROOT = HERE.parent


def wireguard() -> list[bytes]:
    """An initiation from the peer the target's device knows, and a few other message types."""
    peer = Device(targets._WG_B, targets.NOW)
    peer.set_peer(PeerConfig(crypto.public_key(targets._WG_A), None, ("100.64.0.1/32",), targets._SOURCE))
    peer.send(bytes.fromhex("4500001c000000004001f7dc64400002644000010800f7ff00000000"), targets.NOW)
    out = [datagram for datagram, _ in peer.datagrams_to_send()]
    return [
        *out,
        b"\x02\x00\x00\x00" + bytes(88),
        b"\x03\x00\x00\x00" + bytes(60),
        b"\x04\x00\x00\x00" + bytes(32),
    ]


def disco_seeds() -> list[bytes]:
    ping = disco.Ping(tx_id=bytes(range(12)), node_key=bytes(32))
    pong = disco.Pong(tx_id=bytes(range(12)), source=("198.18.0.2", 41641))
    cmm = disco.CallMeMaybe(
        (disco.Endpoint(("198.18.0.2", 41641), disco.EndpointKind.STUN),), mapping_varies=True, birthday=True
    )
    plain = [disco.encode(m) for m in (ping, pong, cmm)]
    return [*plain, targets._DISCO_B.seal(ping, targets._DISCO_A.public_key)]


def stun_seeds() -> list[bytes]:
    request = stun.encode_message(stun.binding_request(bytes(12), software="seed"))
    return [request, stun.answer(request, targets._SOURCE).reply or b""]


def derp_seeds() -> list[bytes]:
    server = ServerConnection(targets._DERP, now=targets.NOW, challenge=bytes(32), require_challenge=False)
    client = ClientConnection(PrivateKey(bytes(range(9, 41))), now=targets.NOW)
    client.receive_data(server.data_to_send(), targets.NOW)
    client_info = client.data_to_send()
    stream = b"".join(
        frames.encode(f)
        for f in (
            frames.SendPacket(bytes(32), b"hello"),
            frames.Ping(b"12345678"),
            frames.NotePreferred(True),
            frames.KeepAlive(),
        )
    )
    return [b"\x00" + client_info + stream, bytes([len(client_info)]) + client_info + stream]


def control_seeds() -> list[bytes]:
    login = cm.LoginRequest(node_key="k" * 43 + "=", disco_key="d" * 43 + "=", hostname="seed")
    call = ClientCall(targets._MACHINE, crypto.public_key(targets._CONTROL), cm.encode(login), targets.NOW)
    server = ServerCall(targets._CONTROL, call.request, targets.NOW, ReplayGuard())
    response = server.respond(cm.encode(cm.Reply()))
    return [call.request, response + server.seal_frame(b'{"type":"keepalive"}'), cm.encode(login)]


def netmap_seeds() -> list[bytes]:
    def node(i: int) -> Node:
        return Node(
            id=i,
            name=f"n{i}",
            hostname=f"n{i}",
            user="u",
            node_key=f"k{i}",
            disco_key=f"d{i}",
            addresses=(f"100.64.0.{i}/32",),
            allowed_ips=(f"100.64.0.{i}/32",),
            endpoints=("198.18.0.2:41641",),
        )

    full = NetworkMap(version=1, self_node=node(1), peers=(node(2), node(3)))
    delta = MapDelta(version=2, peers_changed=(node(4),), peers_removed=(3,))
    return [json.dumps(full.to_json()).encode(), json.dumps(delta.to_json()).encode()]


def policy_seeds() -> list[bytes]:
    return [p.read_bytes() for p in sorted((ROOT / "tests" / "policy" / "examples").glob("*.hujson"))]


def wgquick_seeds() -> list[bytes]:
    key = crypto.encode_key(bytes(range(32)))
    return [
        (
            f"[Interface]\nPrivateKey = {key}\nListenPort = 51820\nAddress = 10.0.0.1/24, fd00::1/64\nMTU = 1420\n\n"
            f"[Peer]\nPublicKey = {key}\nPresharedKey = {key}\nAllowedIPs = 10.0.0.2/32, ::/0\n"
            "Endpoint = 198.18.0.2:51820\nPersistentKeepalive = 25\n"
        ).encode()
    ]


SEEDS = {
    "wireguard": wireguard,
    "disco": disco_seeds,
    "stun": stun_seeds,
    "derp": derp_seeds,
    "control": control_seeds,
    "netmap": netmap_seeds,
    "policy": policy_seeds,
    "wgquick": wgquick_seeds,
}


def main() -> None:
    for name, make in SEEDS.items():
        directory = HERE / "corpus" / name
        directory.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(make()):
            (directory / f"seed-{i}").write_bytes(seed)
            targets.TARGETS[name](seed)  # every seed is accepted input


if __name__ == "__main__":
    main()
