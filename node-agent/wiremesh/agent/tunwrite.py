"""Decrypted packets into the TUN, the same for the Engine and its receive worker: the packet
filter judges each run of one flow once, runs of one TCP flow are merged into GSO writes
(wiremesh.core.gro) when the TUN takes a virtio_net_hdr, and every write is counted."""

from __future__ import annotations

import os
from collections import Counter
from typing import Protocol

from wiremesh.core import gro


class FlowFilter(Protocol):
    def admit_flow(self, packet: bytes, count: int, now: float) -> bool: ...


def deliver(
    fd: int,
    packets: list[bytes],
    flows: list[tuple[int, int]],
    flt: FlowFilter | None,
    now: float,
    vnet: bool,
    io: Counter[str],
    drops: Counter[str],
) -> None:
    """Write `packets` (flows: their [start, end) runs of one flow) to the TUN `fd`."""
    writes: list[bytes] = []
    for a, b in flows:
        if flt is not None and not flt.admit_flow(packets[a], b - a, now):
            drops["inbound_filter"] += b - a
            continue
        io["tun_packets_written"] += b - a
        if vnet:
            writes += gro.coalesce(packets[a:b])
        else:
            writes += packets[a:b]
    io["tun_writes"] += len(writes)
    write = os.write
    for data in writes:
        try:
            write(fd, data)
        except OSError:
            drops["tun_write_error"] += 1
