"""Decrypted packets into the TUN, the same for the Engine and its receive worker: the packet
filter judges each run of one flow once (the transport kernel made the runs and, when the TUN
takes a virtio_net_hdr, merged their TCP segments into GSO writes), and every write is counted."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Protocol

from wiremesh.core.wireguard.transport import Flow


class FlowFilter(Protocol):
    def admit_flow(self, packet: bytes, count: int, now: float) -> bool: ...

    def in_live_flow(self, packet: bytes, now: float) -> bool: ...


def deliver(
    fd: int,
    flows: list[Flow],
    flt: FlowFilter | None,
    now: float,
    io: Counter[str],
    drops: Counter[str],
    refresh: Callable[[], None] | None = None,
) -> None:
    """Write each flow's TUN writes to `fd` if the filter admits the flow (judged by its first
    packet, counted as all of them). `refresh`, if given, brings the filter up to date (flows of
    ours it may not have heard of yet); it is called before the first flow that is not live is
    judged."""
    writes: list[bytes] = []
    for first, count, flow_writes in flows:
        if flt is not None:
            if refresh is not None and not flt.in_live_flow(first, now):
                refresh()
                refresh = None  # once per batch: what it brought applies to the rest as well
            if not flt.admit_flow(first, count, now):
                drops["inbound_filter"] += count
                continue
        io["tun_packets_written"] += count
        writes += flow_writes
    io["tun_writes"] += len(writes)
    write = os.write
    for data in writes:
        try:
            write(fd, data)
        except OSError:
            drops["tun_write_error"] += 1
