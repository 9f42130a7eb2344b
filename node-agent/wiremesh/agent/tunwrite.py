"""Decrypted packets into the TUN, the same for the Engine and its receive worker: the packet
filter judges each run of one flow once, runs of one TCP flow are merged into GSO writes
(wiremesh.core.gro) when the TUN takes a virtio_net_hdr, and every write is counted."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from wiremesh.core import gro


class FlowFilter(Protocol):
    def admit_flow(self, packet: bytes, count: int, now: float) -> bool: ...

    def in_live_flow(self, packet: bytes, now: float) -> bool: ...


def deliver(
    fd: int,
    packets: list[bytes],
    flows: list[tuple[int, int]],
    flt: FlowFilter | None,
    now: float,
    vnet: bool,
    io: Counter[str],
    drops: Counter[str],
    refresh: Callable[[], None] | None = None,
) -> None:
    """Write `packets` (flows: their [start, end) runs of one flow) to the TUN `fd`. `refresh`,
    if given, brings the filter up to date (flows of ours it may not have heard of yet); it is
    called before the first run that is not in a live flow is judged."""
    writes: list[bytes] = []
    for a, b in flows:
        if flt is not None:
            if refresh is not None and not flt.in_live_flow(packets[a], now):
                refresh()
                refresh = None  # once per batch: what it brought applies to the rest as well
            if not flt.admit_flow(packets[a], b - a, now):
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
