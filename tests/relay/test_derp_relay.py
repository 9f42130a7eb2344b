"""The relay service end to end on loopback: real NATS, real TCP, the agent's DERP client."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import httpx
import pytest
from nacl.public import PrivateKey
from relay_helpers import RegistryStandIn, StartRelay, key_text

from wiremesh.agent.derpclient import DerpClient, DerpError
from wiremesh.core.derp import frames
from wiremesh.core.derp.connection import ClientConnection, PacketReceived
from wiremesh.derp.server import DerpService

pytestmark = pytest.mark.timeout(60)


async def connect(service: DerpService, key: PrivateKey, **kw: object) -> DerpClient:
    return await DerpClient.connect("127.0.0.1", service.derp_ports[0], key, **kw)  # type: ignore[arg-type]


async def next_packet(client: DerpClient, timeout: float = 5.0) -> PacketReceived:
    event = await client.recv(timeout)
    assert isinstance(event, PacketReceived), event
    return event


async def eventually(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.02)


async def relay_with(
    registry: RegistryStandIn, start_relay: StartRelay, nats_url: str, *extra: str
) -> DerpService:
    return await start_relay("--nats", nats_url, "--region", "r", "--replica-id", "r1", *extra)


async def test_registered_clients_exchange_packets(registry, start_relay, nats_url) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    ca, cb = await connect(relay, a), await connect(relay, b)
    await ca.send(bytes(b.public_key), b"hello b")
    got = await next_packet(cb)
    assert (got.src, got.packet) == (bytes(a.public_key), b"hello b")
    await ca.close()
    await cb.close()


async def test_unregistered_key_is_refused(registry, start_relay, nats_url) -> None:
    relay = await relay_with(registry, start_relay, nats_url)
    with pytest.raises(DerpError, match="closed"):
        await connect(relay, PrivateKey.generate())
    assert relay.relay.stats.refused["unregistered_key"] == 1


async def test_key_added_after_start_may_connect(registry, start_relay, nats_url) -> None:
    relay = await relay_with(registry, start_relay, nats_url)
    late = PrivateKey.generate()
    await registry.add(late)
    await eventually(lambda: relay.authority.allowed(bytes(late.public_key)))
    client = await connect(relay, late)
    assert await client.ping() >= 0
    await client.close()


async def test_client_receives_only_packets_addressed_to_its_own_key(registry, start_relay, nats_url) -> None:
    a, b, c = (registry.register(PrivateKey.generate()) for _ in range(3))
    relay = await relay_with(registry, start_relay, nats_url)
    ca, cb, cc = await connect(relay, a), await connect(relay, b), await connect(relay, c)
    for i in range(20):
        await ca.send(bytes(b.public_key), b"for b %d" % i)
    await ca.send(bytes(c.public_key), b"for c")
    got = await next_packet(cc)
    assert got.packet == b"for c"
    await cc.ping()  # a round trip: anything else queued for c would have arrived by now
    assert cc._events.empty()
    packets = [(await next_packet(cb)).packet for _ in range(20)]
    assert packets == [b"for b %d" % i for i in range(20)]
    for client in (ca, cb, cc):
        await client.close()


async def test_client_cannot_claim_a_key_it_does_not_hold(registry, start_relay, nats_url) -> None:
    victim = registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    impostor = PrivateKey.generate()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.derp_ports[0])
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    server_key_frame = await reader.readexactly(5 + 40 + frames.CHALLENGE_LEN)
    conn = ClientConnection(impostor, now=0)
    conn.receive_data(server_key_frame, 0)
    hello = bytearray(conn.data_to_send())
    hello[5:37] = bytes(victim.public_key)  # claim the victim's key, sealed with our own
    writer.write(bytes(hello))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, no ServerInfo
    assert relay.relay.stats.closes["protocol_error"] == 1
    writer.close()


async def test_garbage_frame_closes_only_that_connection(registry, start_relay, nats_url) -> None:
    a, b, bad = (registry.register(PrivateKey.generate()) for _ in range(3))
    relay = await relay_with(registry, start_relay, nats_url)
    ca, cb, cbad = await connect(relay, a), await connect(relay, b), await connect(relay, bad)
    cbad.send_raw(frames.encode(frames.RecvPacket(bytes(32), b"server-only frame from a client")))
    await cbad.wait_closed(5)
    await ca.send(bytes(b.public_key), b"still here")
    assert (await next_packet(cb)).packet == b"still here"
    assert relay.relay.stats.closes["protocol_error"] == 1
    await ca.close()
    await cb.close()


async def test_oversized_frame_closes_only_that_connection(registry, start_relay, nats_url) -> None:
    a, b, bad = (registry.register(PrivateKey.generate()) for _ in range(3))
    relay = await relay_with(registry, start_relay, nats_url)
    ca, cb, cbad = await connect(relay, a), await connect(relay, b), await connect(relay, bad)
    cbad.send_raw(frames.frame_header(frames.FrameType.SEND_PACKET, 32 + frames.MAX_PACKET_SIZE + 1 + 64))
    await cbad.wait_closed(5)
    await ca.send(bytes(b.public_key), b"unaffected")
    assert (await next_packet(cb)).packet == b"unaffected"
    assert relay.relay.stats.closes["protocol_error"] == 1
    await ca.close()
    await cb.close()


async def test_truncated_handshake_garbage_closes_only_that_connection(
    registry, start_relay, nats_url
) -> None:
    a = registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    ca = await connect(relay, a)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.derp_ports[0])
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    writer.write(b"\x02\x00\x00\x00\x50" + os.urandom(80))  # a ClientInfo that does not open
    await reader.readuntil(b"\r\n\r\n")
    await asyncio.wait_for(reader.read(), 5)
    assert await ca.ping() >= 0
    writer.close()
    await ca.close()


async def test_revoked_node_is_disconnected(registry, start_relay, nats_url) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    ca, cb = await connect(relay, a), await connect(relay, b)
    await registry.remove(b)
    await cb.wait_closed(5)
    assert cb.closed
    assert relay.relay.stats.closes["revoked"] == 1
    with pytest.raises(DerpError):
        await connect(relay, b)
    assert await ca.ping() >= 0
    await ca.close()


async def test_expired_node_key_is_disconnected(registry, start_relay, nats_url) -> None:
    a = registry.register(PrivateKey.generate(), expires_at=time.time() + 1.5)
    relay = await relay_with(registry, start_relay, nats_url)
    ca = await connect(relay, a)
    await ca.wait_closed(6)
    assert relay.relay.stats.closes["revoked"] == 1


async def test_sender_learns_peer_gone_for_unknown_destination(registry, start_relay, nats_url) -> None:
    a = registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    ca = await connect(relay, a)
    nobody = bytes(PrivateKey.generate().public_key)
    await ca.send(nobody, b"anyone there?")
    event = await ca.recv(5)
    assert event == frames.PeerGone(nobody, frames.PeerGoneReason.NOT_HERE)
    assert relay.relay.stats.drops["no_such_peer"] == 1
    await ca.close()


async def test_receiver_learns_peer_gone_when_sender_disconnects(registry, start_relay, nats_url) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    ca, cb = await connect(relay, a), await connect(relay, b)
    await ca.send(bytes(b.public_key), b"hi")
    await next_packet(cb)
    await ca.close()
    event = await cb.recv(5)
    assert event == frames.PeerGone(bytes(a.public_key), frames.PeerGoneReason.DISCONNECTED)
    await cb.close()


async def test_clients_on_different_replicas_reach_each_other(registry, start_relay, nats_url) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1 = await start_relay("--nats", nats_url, "--region", "eu", "--replica-id", "eu-1")
    r2 = await start_relay("--nats", nats_url, "--region", "eu", "--replica-id", "eu-2")
    ca, cb = await connect(r1, a), await connect(r2, b)
    await eventually(lambda: bytes(b.public_key) in r1.mesh.remote and bytes(a.public_key) in r2.mesh.remote)
    await ca.send(bytes(b.public_key), b"across replicas")
    got = await next_packet(cb)
    assert (got.src, got.packet) == (bytes(a.public_key), b"across replicas")
    await cb.send(bytes(a.public_key), b"and back")
    assert (await next_packet(ca)).packet == b"and back"
    assert r1.relay.stats.cross_replica_sent == 1 and r2.relay.stats.cross_replica_received == 1
    await ca.close()
    await cb.close()


async def test_replica_started_later_learns_existing_presence(registry, start_relay, nats_url) -> None:
    a = registry.register(PrivateKey.generate())
    r1 = await start_relay("--nats", nats_url, "--region", "eu", "--replica-id", "eu-1")
    ca = await connect(r1, a)
    r2 = await start_relay("--nats", nats_url, "--region", "eu", "--replica-id", "eu-2")
    await eventually(lambda: r2.mesh.remote.get(bytes(a.public_key)) == "eu-1")
    await ca.close()


async def test_full_send_queue_drops_and_counts_without_blocking_others(
    registry, start_relay, nats_url
) -> None:
    a, b, stuck = (registry.register(PrivateKey.generate()) for _ in range(3))
    relay = await relay_with(registry, start_relay, nats_url, "--max-queue-bytes", "65536")
    ca, cb = await connect(relay, a), await connect(relay, b)
    # A client that completes the handshake and then never reads again.
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.derp_ports[0])
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    conn = ClientConnection(stuck, now=0)
    conn.receive_data(await reader.readexactly(45 + frames.CHALLENGE_LEN), 0)
    writer.write(conn.data_to_send())
    await eventually(lambda: bytes(stuck.public_key) in relay.relay.clients)
    packet = os.urandom(1400)
    dst = bytes(stuck.public_key)
    for _ in range(200):
        for _ in range(100):
            ca.send_nowait(dst, packet)
        await ca._writer.drain()
        if relay.relay.stats.drops["queue_full"]:
            break
    await eventually(lambda: relay.relay.stats.drops["queue_full"] > 0, 10)
    await ca.send(bytes(b.public_key), b"not blocked")
    assert (await next_packet(cb)).packet == b"not blocked"
    writer.close()
    await ca.close()
    await cb.close()


async def test_rate_limit_is_advertised_and_pauses_a_fast_sender(registry, start_relay, nats_url) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    relay = await relay_with(
        registry, start_relay, nats_url, "--rate-bytes-per-second", "100000", "--rate-burst", "20000"
    )
    ca, cb = await connect(relay, a), await connect(relay, b)
    assert ca.server_info["TokenBucketBytesPerSecond"] == 100000
    for _ in range(40):
        ca.send_nowait(bytes(b.public_key), os.urandom(1000))
    await ca._writer.drain()
    for _ in range(40):
        await next_packet(cb, 10)  # all arrive: paced, not dropped
    assert relay.relay.stats.drops["rate_limited_pause"] >= 1
    await ca.close()
    await cb.close()


async def test_client_that_stops_answering_pings_is_closed_as_idle(registry, start_relay, nats_url) -> None:
    silent = registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url, "--keepalive", "0.2", "--idle-timeout", "0.6")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.derp_ports[0])
    writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    conn = ClientConnection(silent, now=0)  # says CanAckPings, then never answers
    conn.receive_data(await reader.readexactly(45 + frames.CHALLENGE_LEN), 0)
    writer.write(conn.data_to_send())
    with contextlib.suppress(ConnectionError):
        while await asyncio.wait_for(reader.read(4096), 5):
            pass
    assert relay.relay.stats.closes["idle"] == 1
    writer.close()


async def test_http_get_without_upgrade_is_answered_426(registry, start_relay, nats_url) -> None:
    relay = await relay_with(registry, start_relay, nats_url)
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{relay.derp_ports[0]}/derp")
    assert response.status_code == 426


async def test_malformed_http_request_is_refused(registry, start_relay, nats_url) -> None:
    relay = await relay_with(registry, start_relay, nats_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.derp_ports[0])
    writer.write(b"\x16\x03\x01garbage that is not HTTP\r\n\r\n")
    response = await asyncio.wait_for(reader.read(), 5)
    assert response.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_fast_start_skips_the_101_response(registry, start_relay, nats_url) -> None:
    a = registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    client = await connect(relay, a, fast_start=True)
    assert client.server_key == relay.relay.public_key
    await client.close()


async def test_metrics_count_forwarded_packets(registry, start_relay, nats_url) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    ca, cb = await connect(relay, a), await connect(relay, b)
    ca.note_preferred(True)
    await ca.send(bytes(b.public_key), b"x" * 100)
    await next_packet(cb)
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{relay.admin_port}/metrics")).text
        health = await http.get(f"http://127.0.0.1:{relay.admin_port}/healthz")
    assert "derp_packets_forwarded_total 1.0" in text
    assert "derp_bytes_forwarded_total 100.0" in text
    assert "derp_clients 2.0" in text
    assert "derp_clients_home 1.0" in text
    assert health.status_code == 200
    await ca.close()
    await cb.close()


async def test_allow_keys_file_admits_listed_keys_without_nats(tmp_path, start_relay) -> None:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    keys = tmp_path / "allowed"
    keys.write_text(f"# bench keys\n{key_text(a)}\n\n{key_text(b)}\n")
    relay = await start_relay("--allow-keys-file", str(keys))
    ca, cb = await connect(relay, a), await connect(relay, b)
    await ca.send(bytes(b.public_key), b"no nats needed")
    assert (await next_packet(cb)).packet == b"no nats needed"
    with pytest.raises(DerpError):
        await connect(relay, PrivateKey.generate())
    await ca.close()
    await cb.close()


async def test_server_key_persists_in_the_key_file(tmp_path, start_relay) -> None:
    keys = tmp_path / "allowed"
    keys.write_text("")
    first = await start_relay("--allow-keys-file", str(keys), key_file=tmp_path / "k")
    second = await start_relay("--allow-keys-file", str(keys), key_file=tmp_path / "k")
    assert first.relay.public_key == second.relay.public_key
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


async def test_clients_are_refused_until_the_registry_answers(nats_url, nats_server, start_relay) -> None:
    a = PrivateKey.generate()
    relay = await start_relay("--nats", nats_url, "--region", "r", "--replica-id", "r1", wait_synced=False)
    assert not relay.authority.synced
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"http://127.0.0.1:{relay.admin_port}/readyz")).status_code == 503
    with pytest.raises(DerpError):
        await connect(relay, a)
    assert relay.relay.stats.refused["registry_not_synced"] == 1
    nc = await nats_server.connect("keys")
    late_registry = RegistryStandIn(nc)
    late_registry.register(a)
    await late_registry.start()
    await eventually(lambda: relay.authority.synced, 10)
    client = await connect(relay, a)
    assert await client.ping() >= 0
    await client.close()
    await nc.close()


async def test_a_burst_across_replicas_arrives_complete_and_in_order(registry, start_relay, nats_url) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    r1 = await start_relay("--nats", nats_url, "--region", "eu", "--replica-id", "eu-1")
    r2 = await start_relay("--nats", nats_url, "--region", "eu", "--replica-id", "eu-2")
    ca, cb = await connect(r1, a), await connect(r2, b)
    await eventually(lambda: bytes(b.public_key) in r1.mesh.remote)
    for i in range(300):
        ca.send_nowait(bytes(b.public_key), i.to_bytes(4, "big") + os.urandom(1200))
    await ca._writer.drain()
    got = [int.from_bytes((await next_packet(cb)).packet[:4], "big") for _ in range(300)]
    assert got == list(range(300))
    await ca.close()
    await cb.close()


async def test_malformed_cross_replica_message_is_counted_and_dropped(
    registry, start_relay, nats_url, nats_server
) -> None:
    from wiremesh.core import bus

    relay = await start_relay("--nats", nats_url, "--region", "eu", "--replica-id", "eu-1")
    nc = await nats_server.connect("derp")  # a replica that sends garbage
    await nc.publish(bus.DERP_FORWARD.format(region="eu", replica="eu-1"), b"\x00\x00\xff\xff" + bytes(70))
    await nc.flush()
    await eventually(lambda: relay.relay.stats.drops["mesh_malformed"] == 1)
    await nc.close()


async def test_second_connection_with_the_same_key_replaces_the_first(
    registry, start_relay, nats_url
) -> None:
    a, b = registry.register(PrivateKey.generate()), registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    first, cb = await connect(relay, a), await connect(relay, b)
    second = await connect(relay, a)
    await first.wait_closed(5)
    await cb.send(bytes(a.public_key), b"to the newest")
    assert (await next_packet(second)).packet == b"to the newest"
    assert relay.relay.stats.closes["replaced"] == 1
    await second.close()
    await cb.close()


async def test_clients_are_told_the_relay_is_restarting_when_it_stops(tmp_path, start_relay) -> None:
    a = PrivateKey.generate()
    keys = tmp_path / "allowed"
    keys.write_text(key_text(a) + "\n")
    relay = await start_relay("--allow-keys-file", str(keys))
    client = await connect(relay, a)
    await relay.stop()
    assert await client.recv(5) == frames.Restarting(reconnect_in_ms=1000, try_for_ms=30000)
    await client.close()


async def test_relay_serves_derp_over_tls(tmp_path, start_relay) -> None:
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derp.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("derp.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    a, b = PrivateKey.generate(), PrivateKey.generate()
    keys = tmp_path / "allowed"
    keys.write_text(f"{key_text(a)}\n{key_text(b)}\n")
    relay = await start_relay(
        "--allow-keys-file", str(keys), "--tls-cert", str(cert_path), "--tls-key", str(key_path)
    )
    ctx = ssl.create_default_context(cafile=str(cert_path))
    ctx.check_hostname = False  # we dial 127.0.0.1; the chain is still verified against our CA
    ca = await DerpClient.connect("127.0.0.1", relay.derp_ports[0], a, ssl=ctx)
    cb = await DerpClient.connect("127.0.0.1", relay.derp_ports[0], b, ssl=ctx)
    await ca.send(bytes(b.public_key), b"over tls")
    assert (await next_packet(cb)).packet == b"over tls"
    await ca.close()
    await cb.close()


async def test_malformed_registry_event_is_ignored(registry, start_relay, nats_url) -> None:
    from wiremesh.core import bus

    a = registry.register(PrivateKey.generate())
    relay = await relay_with(registry, start_relay, nats_url)
    ca = await connect(relay, a)
    await registry.nc.publish(bus.NODE_KEY_REMOVED, b'{"node_key": "not base64!"}')
    await registry.nc.publish(bus.NODE_KEY_REMOVED, b"\xff garbage")
    await registry.nc.flush()
    assert await ca.ping() >= 0
    assert relay.authority.allowed(bytes(a.public_key))
    await ca.close()


async def test_malformed_allow_keys_file_is_reported_with_its_line(tmp_path, start_relay) -> None:
    keys = tmp_path / "allowed"
    keys.write_text(f"{key_text(PrivateKey.generate())}\nnot-a-key\n")
    with pytest.raises(ValueError, match=r"allowed:2: not a base64 key"):
        await start_relay("--allow-keys-file", str(keys))
