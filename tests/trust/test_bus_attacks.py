"""Each bus attack of the security review (issue 9), performed against real processes and refused.

Real parts: a nats-server configured from wiremesh.core.busauth (an NKey per service role and
the role's subject permissions), wiremesh-keys and wiremesh-coord as processes, a relay
(DerpService) following the real key registry, agents' control and DERP clients. Before the
bus had credentials, anyone who could reach NATS could do every one of these; each test now
holds a credential that must not allow the attack (or none), performs it, sees nats-server
refuse it, and checks that nothing happened.

To know that a refused message *would* have been handled by now, each test then sends the same
kind of message legitimately and waits for its effect: the bus delivers one subscription's
messages in order, so the attack's (sent and flushed first) would have come before it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest
from fixtures_services import ControlPlane, NatsServer
from nacl.public import PrivateKey

from wiremesh.agent.control import ControlClient
from wiremesh.agent.derpclient import DerpClient, DerpError
from wiremesh.core import bus, busauth, crypto
from wiremesh.core.derp.connection import PacketReceived
from wiremesh.derp.keyauth import encode_key
from wiremesh.derp.presence import PresenceDelta
from wiremesh.derp.server import DerpService, build_parser

pytestmark = pytest.mark.timeout(120)

REGION, REPLICA = "r", "r1"
WAIT = 15.0  # generous: a busy 2-core machine


class Attacker:
    """A NATS client holding one role's credential; it hears nats-server's refusals."""

    def __init__(self, nc: Any, errors: asyncio.Queue[str]) -> None:
        self.nc = nc
        self.errors = errors

    @classmethod
    async def connect(cls, server: NatsServer, role: str) -> Attacker:
        errors: asyncio.Queue[str] = asyncio.Queue()

        async def on_error(exc: Exception) -> None:
            errors.put_nowait(str(exc))

        nc = await server.connect(role, error_cb=on_error, allow_reconnect=False)
        return cls(nc, errors)

    async def refused(self, action: str, subject: str) -> None:
        """Wait for nats-server to refuse `action` ("publish" or "subscription") on `subject`."""
        wanted = f'permissions violation for {action} to "{subject}"'
        async with asyncio.timeout(WAIT):
            while wanted not in (await self.errors.get()).lower():
                pass

    async def publish(self, subject: str, payload: bytes, reply: str = "") -> None:
        await self.nc.publish(subject, payload, reply=reply)
        await self.nc.flush()

    async def close(self) -> None:
        await self.nc.close()


@dataclasses.dataclass
class Node:
    """A node registered with coord through the agents' control channel."""

    node_id: int
    node_key: PrivateKey
    client: ControlClient

    @property
    def node_key_text(self) -> str:
        return crypto.encode_key(bytes(self.node_key.public_key))


async def register(plane: ControlPlane, hostname: str) -> Node:
    client = ControlClient(plane.url, crypto.generate_private_key(), timeout=10)
    node_key, disco_key = crypto.generate_private_key(), crypto.generate_private_key()
    result = await client.login(
        crypto.encode_key(crypto.public_key(node_key)),
        crypto.encode_key(crypto.public_key(disco_key)),
        hostname,
        auth_key=plane.auth_key(),
    )
    return Node(result.node_id, PrivateKey(node_key), client)


def node(plane: ControlPlane, node_id: int) -> dict[str, Any]:
    return dict(plane.admin("GET", f"/nodes/{node_id}"))


async def eventually(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def relay(control_plane: ControlPlane, tmp_path: Any) -> AsyncIterator[DerpService]:
    """A relay replica that admits the node keys the real key registry lists."""
    args = build_parser().parse_args(
        [
            "--listen", "127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0",
            "--key-file", str(tmp_path / "derp.key"),
            *control_plane.nats.args("derp", url_flag="--nats"),
            "--region", REGION,
            "--replica-id", REPLICA,
        ]
    )  # fmt: skip
    service = DerpService(args)
    await service.start()
    try:
        await eventually(lambda: service.authority.synced, "the relay to list the registry's keys")
        yield service
    finally:
        await service.stop()


async def derp_client(relay: DerpService, key: PrivateKey) -> DerpClient:
    return await DerpClient.connect("127.0.0.1", relay.derp_ports[0], key)


# --- who may connect at all ---------------------------------------------------------------


async def test_a_client_without_a_credential_is_refused(control_plane: ControlPlane) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await control_plane.nats.connect(None, allow_reconnect=False, max_reconnect_attempts=0)


async def test_a_client_with_an_nkey_the_bus_does_not_know_is_refused(
    control_plane: ControlPlane, tmp_path: Any
) -> None:
    seed, _public = busauth.new_nkey_user()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(control_plane.nats.url, nkeys_seed_str=seed, allow_reconnect=False)


# --- hole 1: minting reusable pre-auth keys for any user and tag --------------------------


@pytest.mark.parametrize("role", ["derp", "keys"])
async def test_only_coord_may_ask_the_registry_to_mint_a_pre_auth_key(
    control_plane: ControlPlane, role: str
) -> None:
    attacker = await Attacker.connect(control_plane.nats, role)
    try:
        mint = bus.AuthKeyCreate(user="mallory", reusable=True, tags=("tag:prod",), expires_in=None)
        request = asyncio.ensure_future(
            attacker.nc.request(bus.AUTH_KEY_CREATE, bus.encode(mint), timeout=WAIT)
        )
        await attacker.refused("publish", bus.AUTH_KEY_CREATE)
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await request
    finally:
        await attacker.close()
    # The admin API (coord asking the registry, as it may) lists every key: none is mallory's.
    assert all(key["user"] != "mallory" for key in control_plane.admin("GET", "/authkeys"))


@pytest.mark.parametrize("role", ["coord", "derp"])
@pytest.mark.parametrize("subject", [bus.AUTH_KEY_CONSUME, bus.AUTH_KEY_CREATE, bus.NODE_KEY_LIST])
async def test_only_keys_may_answer_as_the_registry(
    control_plane: ControlPlane, role: str, subject: str
) -> None:
    """Answering registry requests would read every pre-auth key presented at login (and the
    secrets minted), or hand the relays a forged list of node keys."""
    attacker = await Attacker.connect(control_plane.nats, role)
    try:
        await attacker.nc.subscribe(subject, queue=bus.KEYS_QUEUE)
        await attacker.nc.flush()
        await attacker.refused("subscription", subject)
    finally:
        await attacker.close()


# --- hole 2: admitting node keys to the relay -----------------------------------------------


@pytest.mark.parametrize("role", ["coord", "derp"])
async def test_only_keys_may_admit_a_node_key_to_the_relay(
    control_plane: ControlPlane, relay: DerpService, role: str
) -> None:
    intruder = PrivateKey.generate()
    attacker = await Attacker.connect(control_plane.nats, role)
    try:
        forged = bus.NodeKeyEvent(node_key=crypto.encode_key(bytes(intruder.public_key)))
        await attacker.publish(bus.NODE_KEY_ADDED, bus.encode(forged))
        await attacker.refused("publish", bus.NODE_KEY_ADDED)
    finally:
        await attacker.close()
    # A real registration makes the registry announce a key; once the relay admits that one, it
    # has handled everything published before it.
    member = await register(control_plane, "member")
    try:
        await eventually(
            lambda: relay.authority.allowed(bytes(member.node_key.public_key)), "the member's key"
        )
        with pytest.raises(DerpError):
            await derp_client(relay, intruder)
        client = await derp_client(relay, member.node_key)
        await client.close()
    finally:
        await member.client.aclose()


# --- hole 3: expiring nodes -----------------------------------------------------------------


@pytest.mark.parametrize("role", ["coord", "derp"])
async def test_only_keys_may_announce_that_a_node_key_is_gone(control_plane: ControlPlane, role: str) -> None:
    victim, witness = await register(control_plane, "victim"), await register(control_plane, "witness")
    attacker = await Attacker.connect(control_plane.nats, role)
    registry = await Attacker.connect(control_plane.nats, "keys")
    try:
        gone = bus.NodeKeyEvent(node_key=victim.node_key_text, node_id=victim.node_id, reason="revoked")
        await attacker.publish(bus.NODE_KEY_REMOVED, bus.encode(gone))
        await attacker.refused("publish", bus.NODE_KEY_REMOVED)
        # The registry's own credential may say so: coord expires the witness when it hears it.
        gone = bus.NodeKeyEvent(node_key=witness.node_key_text, node_id=witness.node_id, reason="revoked")
        await registry.publish(bus.NODE_KEY_REMOVED, bus.encode(gone))
        await eventually(lambda: node(control_plane, witness.node_id)["expired"], "the witness to expire")
        assert not node(control_plane, victim.node_id)["expired"]
    finally:
        await attacker.close()
        await registry.close()
        await victim.client.aclose()
        await witness.client.aclose()


@pytest.mark.parametrize(
    ("subject", "request_for", "admin_call"),
    [
        (bus.NODE_KEY_EXPIRE, lambda node_id: bus.NodeKeyExpire(node_id=node_id), ("POST", "/expire")),
        (bus.NODE_KEY_REVOKE, lambda node_id: bus.NodeKeyRevoke(node_id=node_id), ("DELETE", "")),
    ],
)
async def test_only_coord_may_ask_the_registry_to_expire_or_revoke_a_node(
    control_plane: ControlPlane, relay: DerpService, subject: str, request_for: Any, admin_call: Any
) -> None:
    victim, witness = await register(control_plane, "victim"), await register(control_plane, "witness")
    victim_key, witness_key = bytes(victim.node_key.public_key), bytes(witness.node_key.public_key)
    await eventually(
        lambda: relay.authority.allowed(victim_key) and relay.authority.allowed(witness_key), "both keys"
    )
    attacker = await Attacker.connect(control_plane.nats, "derp")
    try:
        await attacker.publish(subject, bus.encode(request_for(victim.node_id)))
        await attacker.refused("publish", subject)
        # Through coord's admin API, the one way to ask, the witness goes; the relay hears it.
        method, suffix = admin_call
        control_plane.admin(method, f"/nodes/{witness.node_id}{suffix}")
        await eventually(lambda: not relay.authority.allowed(witness_key), "the witness key's removal")
        assert relay.authority.allowed(victim_key)
        assert not node(control_plane, victim.node_id)["expired"]
    finally:
        await attacker.close()
        await victim.client.aclose()
        await witness.client.aclose()


# --- hole 4: injecting relayed packets with a forged source ----------------------------------


def forward_record(src: bytes, dst: bytes, packet: bytes) -> bytes:
    return struct.pack("!I", 64 + len(packet)) + src + dst + packet


@pytest.mark.parametrize("role", ["coord", "keys"])
async def test_only_relays_may_forward_packets_between_replicas(
    control_plane: ControlPlane, relay: DerpService, role: str
) -> None:
    victim, peer = await register(control_plane, "victim"), await register(control_plane, "peer")
    victim_key, peer_key = bytes(victim.node_key.public_key), bytes(peer.node_key.public_key)
    await eventually(
        lambda: relay.authority.allowed(victim_key) and relay.authority.allowed(peer_key), "both keys"
    )
    client = await derp_client(relay, victim.node_key)
    attacker = await Attacker.connect(control_plane.nats, role)
    subject = bus.DERP_FORWARD.format(region=REGION, replica=REPLICA)
    try:
        # "From the peer": the victim would trust the source key the relay reports.
        await attacker.publish(subject, forward_record(peer_key, victim_key, b"forged"))
        await attacker.refused("publish", subject)
        replica = await Attacker.connect(control_plane.nats, "derp")
        await replica.publish(subject, forward_record(peer_key, victim_key, b"from a replica"))
        await replica.close()
        event = await client.recv(WAIT)
        assert isinstance(event, PacketReceived) and event.packet == b"from a replica", event
    finally:
        await attacker.close()
        await client.close()
        await victim.client.aclose()
        await peer.client.aclose()


# --- hole 5: kicking relay clients ---------------------------------------------------------


@pytest.mark.parametrize("role", ["coord", "keys"])
async def test_only_relays_may_announce_presence(
    control_plane: ControlPlane, relay: DerpService, role: str
) -> None:
    """A newer "present" from another replica makes a relay drop its own connection for that
    key: a forged one would kick any client off the relay."""
    victim = await register(control_plane, "victim")
    victim_key = bytes(victim.node_key.public_key)
    await eventually(lambda: relay.authority.allowed(victim_key), "the victim's key")
    client = await derp_client(relay, victim.node_key)
    await eventually(lambda: victim_key in relay.relay.clients, "the victim's connection")
    subject = bus.DERP_LEASE.format(region=REGION, kind="delta")

    def claim(key: bytes, replica: str) -> bytes:
        return bus.encode(PresenceDelta(REGION, replica, "x", 1, encode_key(key), True, time.time() + 3600))

    attacker = await Attacker.connect(control_plane.nats, role)
    try:
        await attacker.publish(subject, claim(victim_key, "evil"))
        await attacker.refused("publish", subject)
        witness_key = PrivateKey.generate().public_key
        replica = await Attacker.connect(control_plane.nats, "derp")
        await replica.publish(subject, claim(bytes(witness_key), "r2"))
        await replica.close()
        await eventually(lambda: bytes(witness_key) in relay.mesh.remote, "the replica's announcement")
        assert victim_key in relay.relay.clients
        assert await client.ping() >= 0
    finally:
        await attacker.close()
        await client.close()
        await victim.client.aclose()


# --- replies go only to inboxes ------------------------------------------------------------


async def test_the_registry_answers_only_to_a_reply_inbox(control_plane: ControlPlane) -> None:
    """allow_responses lets keys publish to a request's reply subject: a request naming an event
    subject as its reply-to must not make the registry publish a message there."""
    listener = await control_plane.nats.connect("derp")
    heard: list[bytes] = []

    async def on_removed(msg: Any) -> None:
        heard.append(msg.data)

    await listener.subscribe(bus.NODE_KEY_REMOVED, cb=on_removed)
    await listener.flush()
    requester = await control_plane.nats.connect("derp")
    try:
        await requester.publish(
            bus.NODE_KEY_LIST, bus.encode(bus.NodeKeyListRequest()), reply=bus.NODE_KEY_REMOVED
        )
        await requester.flush()
        # The same subscription in the registry answers this one after the first.
        reply = await requester.request(bus.NODE_KEY_LIST, bus.encode(bus.NodeKeyListRequest()), timeout=WAIT)
        bus.decode(bus.NodeKeyList, reply.data)
        await listener.flush()
        assert heard == []
    finally:
        await requester.close()
        await listener.close()


# --- TLS ---------------------------------------------------------------------------------------


async def test_services_reach_a_tls_bus_and_a_plaintext_client_is_refused(control_plane_factory: Any) -> None:
    plane = control_plane_factory(nats_tls=True)  # keys and coord connected over TLS to be ready
    client = await register(plane, "over-tls")  # a login needs coord -> keys over the bus
    await client.client.aclose()
    with pytest.raises((nats.errors.Error, OSError)):
        await nats.connect(
            plane.nats.url,
            nkeys_seed_str=busauth.read_credential(plane.nats.credentials("coord")).nkey_seed,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=5,
        )
