"""TUN interfaces through /dev/net/tun, in the calling thread's network namespace.

A TUN interface exists as long as the file descriptor returned here is open (we never set
TUNSETPERSIST), so closing it is also how the interface is removed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct

log = logging.getLogger("wiremesh.agent.engine")

TUN_DEVICE = "/dev/net/tun"

# From linux/if_tun.h.
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

IFNAMSIZ = 16
MAX_IFNAME = IFNAMSIZ - 1


class TunError(OSError):
    """The TUN interface could not be created or configured."""


def validate_ifname(name: str) -> str:
    """Return `name` if the kernel would accept it as an interface name, else raise ValueError."""
    if not name or len(name.encode()) > MAX_IFNAME:
        raise ValueError(f"interface name must be 1-{MAX_IFNAME} bytes: {name!r}")
    if name in (".", "..") or any(c in name for c in "/: \t\n") or not name.isprintable():
        raise ValueError(f"interface name contains a character the kernel refuses: {name!r}")
    return name


def open_tun(name: str, *, vnet_hdr: bool = False, nonblocking: bool = True) -> int:
    """Create (or attach to) TUN interface `name` and return its file descriptor.

    Packets read and written are bare IP packets (IFF_NO_PI). With `vnet_hdr` each packet is
    preceded by a struct virtio_net_hdr, which is what enables the GSO/TSO offloads.
    """
    validate_ifname(name)
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
    fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0))
    try:
        ifr = struct.pack("16sH22x", name.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError as exc:
        os.close(fd)
        raise TunError(exc.errno, f"cannot create TUN interface {name!r}: {exc.strerror}") from exc
    return fd


def set_offload(fd: int, flags: int) -> None:
    """Tell the kernel which offloads our reader can handle (TUN_F_* flags); needs IFF_VNET_HDR."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as exc:
        raise TunError(exc.errno, f"TUNSETOFFLOAD {flags:#x} refused: {exc.strerror}") from exc


def open_with_offloads(name: str, vnet_hdr: bool, tso: bool) -> tuple[int, bool, bool]:
    """Open TUN `name` with the offloads asked for, or fewer where the kernel refuses them:
    (fd, with virtio_net_hdr, with TSO). TSO needs the header."""
    try:
        fd = open_tun(name, vnet_hdr=vnet_hdr)
    except TunError:
        if not vnet_hdr:
            raise
        log.info("tun_vnet_hdr_unavailable interface=%s", name)
        vnet_hdr = False
        fd = open_tun(name)
    if not (vnet_hdr and tso):
        return fd, vnet_hdr, False
    try:
        set_offload(fd, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except TunError as exc:
        log.info("tun_tso_unavailable interface=%s error=%s", name, exc)
        return fd, vnet_hdr, False
    return fd, vnet_hdr, True
