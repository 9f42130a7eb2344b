"""Micro-benchmark of the WireGuard core's per-packet cost: Device.send and Device.receive of
1400-byte IPv4 packets between two in-memory Devices (no sockets). Prints microseconds per packet
and the implied single-core packet rate, next to a bare ChaCha20-Poly1305 seal/open of the same size
as the reference floor.

    .venv/bin/python bench/wg_core.py [packets]
"""

from __future__ import annotations

import ipaddress
import os
import struct
import sys
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wiremesh.core import crypto
from wiremesh.core.wireguard import Device, PeerConfig

SIZE = 1400
BATCH = 1000


def ipv4(src: str, dst: str, size: int) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        size,
        0,
        0,
        64,
        17,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + os.urandom(size - 20)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 200_000
    now = time.time()
    ka, kb = crypto.generate_private_key(), crypto.generate_private_key()
    a, b = Device(ka, now), Device(kb, now)
    a_ep, b_ep = ("192.0.2.1", 1), ("192.0.2.2", 2)
    a.set_peer(PeerConfig(crypto.public_key(kb), allowed_ips=("10.0.0.2/32",), endpoint=b_ep))
    b.set_peer(PeerConfig(crypto.public_key(ka), allowed_ips=("10.0.0.1/32",), endpoint=a_ep))
    packet = ipv4("10.0.0.1", "10.0.0.2", SIZE)
    a.send(packet, now)
    for _ in range(4):
        for d, _ep in a.datagrams_to_send():
            b.receive(d, a_ep, now)
        for d, _ep in b.datagrams_to_send():
            a.receive(d, b_ep, now)

    # Batches of BATCH packets (send all, then receive all), best of several rounds to damp the
    # noise of a shared machine; a bounded batch keeps the allocator out of the measurement.
    send_times: list[float] = []
    recv_times: list[float] = []
    for _ in range(max(1, count // BATCH)):
        t0 = time.perf_counter()
        sealed = [a.send(packet, now) for _ in range(BATCH)]
        t1 = time.perf_counter()
        for out in sealed:
            assert out is not None
            b.receive(out[0], a_ep, now)
        t2 = time.perf_counter()
        send_times.append((t1 - t0) / BATCH)
        recv_times.append((t2 - t1) / BATCH)
    assert b.drops.total() == 0, b.drops
    t_send, t_recv = min(send_times), min(recv_times)

    aead = ChaCha20Poly1305(os.urandom(32))
    nonce = bytes(12)
    ct = aead.encrypt(nonce, packet, None)
    seal_times: list[float] = []
    open_times: list[float] = []
    for _ in range(max(1, count // BATCH)):
        t0 = time.perf_counter()
        for _ in range(BATCH):
            aead.encrypt(nonce, packet, None)
        t1 = time.perf_counter()
        for _ in range(BATCH):
            aead.decrypt(nonce, ct, None)
        t2 = time.perf_counter()
        seal_times.append((t1 - t0) / BATCH)
        open_times.append((t2 - t1) / BATCH)
    t_seal, t_open = min(seal_times), min(open_times)

    print(f"packets: {count} x {SIZE} bytes, best batch of {BATCH}")
    print(
        f"Device.send     {t_send * 1e6:6.2f} us/packet  ({1 / t_send / 1e3:7.0f} kpps, {SIZE * 8 / t_send / 1e6:6.0f} Mbit/s)"
    )
    print(
        f"Device.receive  {t_recv * 1e6:6.2f} us/packet  ({1 / t_recv / 1e3:7.0f} kpps, {SIZE * 8 / t_recv / 1e6:6.0f} Mbit/s)"
    )
    print(f"bare AEAD seal  {t_seal * 1e6:6.2f} us/packet   ratio send/seal {t_send / t_seal:4.2f}")
    print(f"bare AEAD open  {t_open * 1e6:6.2f} us/packet   ratio recv/open {t_recv / t_open:4.2f}")


if __name__ == "__main__":
    main()
