"""The Lab: an "internet", NAT routers and hosts in network namespaces, torn down on exit."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from types import FrameType, TracebackType
from typing import Any, TypeVar

from wiremesh.lab import netns, portmap, registry
from wiremesh.lab.nat import (
    ADF_MAP,
    DROPS_COUNTER,
    EIM_MAP,
    FAULTS_CHAIN,
    FORWARD_CHAIN,
    HAIRPIN_KINDS,
    TABLE,
    NatKind,
    host_ruleset,
    host_ruleset6,
    router_ruleset,
    router_ruleset6,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

INTERNET_SUBNET = ipaddress.IPv4Network("198.18.0.0/16")  # RFC 2544 benchmark range
INTERNET_GATEWAY = ipaddress.IPv4Address("198.18.0.1")
INTERNET_ALT = ipaddress.IPv4Address("198.18.0.2")  # second gateway address, for the STUN responder
CGNAT_SUPERNET = ipaddress.IPv4Network("100.127.0.0/16")  # inside 100.64.0.0/10, away from mesh addresses
LAN_SUPERNET = ipaddress.IPv4Network("192.168.0.0/16")
# IPv6 (opt-in): RFC 5180 benchmarking space. The internet is one /64; router n's LAN is
# 2001:2:0:n::/64, routed to the router's WAN address by the internet namespace.
INTERNET6_SUBNET = ipaddress.IPv6Network("2001:2::/64")
INTERNET6_GATEWAY = ipaddress.IPv6Address("2001:2::1")

WAN_IFACE = "wan0"
LAN_BRIDGE = "lan0"
HOST_IFACE = "eth0"
INET_BRIDGE = "br0"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")
_PREFIX_RE = re.compile(r"^wm[0-9a-f]{4}-$")
COMMAND_TIMEOUT_S = 30.0
PROCESS_STOP_TIMEOUT_S = 3.0
COUNTED_DROP = f"counter name {DROPS_COUNTER} drop"
# Bridged frames (LAN to LAN, host to host on the internet) must not go through IP netfilter
# hooks: with br_netfilter loaded they would be conntracked and filtered like routed packets.
_NO_BRIDGE_NETFILTER = {
    "net.bridge.bridge-nf-call-iptables": 0,
    "net.bridge.bridge-nf-call-ip6tables": 0,
    "net.bridge.bridge-nf-call-arptables": 0,
}
MINIUPNPD_START_TIMEOUT_S = 15.0  # its STUN check alone may take 3 s per retry


class LabError(RuntimeError):
    """A lab operation failed (a command failed, a name is bad, the lab is closed)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Internet:
    """The public segment: a bridge in its own namespace holding the gateway address."""

    ns: str
    subnet: str
    gateway: str
    gateway6: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Router:
    """A NAT router namespace: ``wan0`` outside, bridge ``lan0`` (the LAN gateway) inside."""

    name: str
    ns: str
    kind: NatKind
    wan_address: str  # on the internet, or on the carrier's inside segment for double NAT
    wan_gateway: str
    lan_address: str  # the LAN gateway address
    lan_subnet: str
    cgnat: bool
    behind: Router | None
    wan_address6: str | None = None  # IPv6 (Lab(ipv6=True), routers directly on the internet)
    lan_address6: str | None = None
    lan_subnet6: str | None = None

    @property
    def public_address(self) -> str:
        """The address the internet sees traffic from this router's LAN come from."""
        return self.behind.public_address if self.behind is not None else self.wan_address


@dataclasses.dataclass(frozen=True, slots=True)
class Host:
    """An end host: interface ``eth0`` with one address, default route via its gateway."""

    name: str
    ns: str
    address: str
    gateway: str
    behind: Router | None
    iface: str = HOST_IFACE
    address6: str | None = None  # a public IPv6 address (Lab(ipv6=True)); None without IPv6

    @property
    def kind(self) -> NatKind:
        return self.behind.kind if self.behind is not None else NatKind.NONE

    @property
    def public_address(self) -> str:
        return self.behind.public_address if self.behind is not None else self.address


Node = Host | Router | Internet


@dataclasses.dataclass(frozen=True, slots=True)
class RuleHandle:
    """Rules added together by the lab (fault injection); pass it to ``Lab.remove_rule``."""

    ns: str
    rules: tuple[tuple[str, str, int], ...]  # (nft family, chain, rule handle)


@dataclasses.dataclass(slots=True)
class _Segment:
    """An L2 segment a node can attach to: the internet bridge or a router's LAN bridge."""

    ns: str
    bridge: str
    network: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    next_host: int
    ports: int = 0
    used: set[ipaddress.IPv4Address] = dataclasses.field(default_factory=set)
    network6: ipaddress.IPv6Network | None = None
    gateway6: ipaddress.IPv6Address | None = None

    def address6_for(self, addr: ipaddress.IPv4Address) -> ipaddress.IPv6Address | None:
        """The IPv6 twin of a v4 address on this segment: its last two octets as the host part."""
        if self.network6 is None:
            return None
        packed = addr.packed
        return self.network6.network_address + ((packed[2] << 16) | packed[3])

    def allocate(self) -> ipaddress.IPv4Address:
        # Skip .0 and .255 in every /24 so addresses read naturally (198.18.1.1, not 198.18.1.0).
        while True:
            addr = self.network.network_address + self.next_host
            self.next_host += 1
            if addr not in self.network or addr == self.network.broadcast_address:
                raise LabError(f"segment {self.network} is full")
            if int(addr) & 0xFF not in (0, 255) and addr not in self.used:
                self.used.add(addr)
                return addr


# Strong references: a lab nobody closed (or kept a reference to) is still torn down at exit.
_live_labs: set[Lab] = set()
_safety_net_lock = threading.Lock()
_safety_net_installed = False


def _close_all_labs() -> None:
    for lab in list(_live_labs):
        lab.close()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Tear the labs down, then die of SIGTERM as the process would have without us (raising
    # SystemExit instead would let a test runner catch it and carry on).
    _close_all_labs()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_safety_net() -> None:
    global _safety_net_installed
    with _safety_net_lock:
        if _safety_net_installed:
            return
        _safety_net_installed = True
        atexit.register(_close_all_labs)
        if threading.current_thread() is threading.main_thread():
            # Only where nobody else handles the signal: an application's own handler wins.
            for signum in (signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(ValueError, OSError):
                    if signal.getsignal(signum) in (signal.SIG_DFL, None):
                        signal.signal(signum, _on_sigterm)


class Lab:
    """Owns every namespace, link, rule and process it creates; ``close()`` removes them all.

    Use as a context manager. See the package docstring for the API tour.
    """

    def __init__(self, prefix: str | None = None, *, ipv6: bool = False) -> None:
        if prefix is not None and not _PREFIX_RE.match(prefix):
            raise ValueError(f"lab prefix must look like 'wm3f9a-', got {prefix!r}")
        registry.reap_stale()
        self.prefix = registry.claim(prefix)
        self._owner_pid = os.getpid()
        self.ipv6 = ipv6
        self._namespaces: list[str] = []
        self._names: set[str] = set()
        self._processes: list[subprocess.Popen[Any]] = []
        self._internet: Internet | None = None
        self._inet_segment: _Segment | None = None
        self._lan_segments: dict[str, _Segment] = {}  # router ns -> its LAN segment
        self._next_lan = 1
        self._next_cgnat = 1
        self._closed = False
        self._tmpdir: str | None = None
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._stun_proc: subprocess.Popen[Any] | None = None
        self._miniupnpd_logs: dict[str, str] = {}
        self._udp_blocks: dict[str, list[RuleHandle]] = {}
        _live_labs.add(self)
        _install_safety_net()

    # -- context management -------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace this lab created (and has not yet removed)."""
        return tuple(self._namespaces)

    @property
    def tmpdir(self) -> str:
        """A private directory removed at close (configs, pid files, logs)."""
        if self._tmpdir is None:
            self._tmpdir = tempfile.mkdtemp(prefix=f"{self.prefix}lab-")
        return self._tmpdir

    def close(self) -> None:
        """Stop every process, delete every namespace. Safe to call more than once."""
        if self._closed or os.getpid() != self._owner_pid:
            # A forked child inherits the object but must not tear down its parent's lab.
            return
        self._closed = True
        _live_labs.discard(self)
        for proc in reversed(self._processes):
            _stop_process(proc)
        self._processes.clear()
        for sock in list(self._sockets):
            sock.close()
        for ns in reversed(self._namespaces):
            try:
                registry.destroy_namespace(ns, keep_pid=os.getpid())
            except Exception:
                log.exception("lab: removing namespace %s failed", ns)
        self._namespaces.clear()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if not any(netns.exists(self.prefix + name) for name in self._names):
            registry.release(self.prefix)

    # -- commands -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise LabError("lab is closed")

    def ns_of(self, node: Node | str) -> str:
        """The namespace name of ``node``, after checking this lab created it and it still exists."""
        ns = node if isinstance(node, str) else node.ns
        if ns not in self._namespaces:
            raise LabError(f"namespace {ns!r} does not belong to this lab")
        if not netns.exists(ns):
            raise LabError(f"namespace {ns!r} no longer exists")
        return ns

    def exec_prefix(self, node: Node | str) -> list[str]:
        """``["ip", "netns", "exec", NS]``: prepend to a command to run it inside ``node``."""
        return ["ip", "netns", "exec", self.ns_of(node)]

    def run(
        self,
        node: Node | str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``node``'s namespace and wait; output is captured as text."""
        self._check_open()
        _check_argv(argv)
        cmd = [*self.exec_prefix(node), *argv]
        result = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            input=input,
            env=dict(env) if env is not None else None,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def popen(
        self, node: Node | str, argv: Sequence[str], *, host_mounts: bool = False, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``node``; the lab stops it (its whole process group) at close.

        ``host_mounts``: join only the network namespace and keep this process's mount namespace
        (``ip netns exec`` gives every command a private one). Processes that must see each
        other's mounts, such as a kubelet and its container runtime, need it.
        """
        self._check_open()
        _check_argv(argv)
        kwargs.setdefault("start_new_session", True)
        if host_mounts:
            prefix = ["nsenter", f"--net={os.path.join(netns.NETNS_DIR, self.ns_of(node))}", "--"]
        else:
            prefix = self.exec_prefix(node)
        proc: subprocess.Popen[Any] = subprocess.Popen([*prefix, *argv], **kwargs)
        self._processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> None:
        """Stop a process started with ``popen`` now (SIGTERM, then SIGKILL)."""
        _stop_process(proc)
        if proc in self._processes:
            self._processes.remove(proc)

    def socket(
        self, node: Node | str, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM, proto: int = 0
    ) -> socket.socket:
        """A socket created inside ``node``'s namespace, for in-process probes and servers.

        The lab closes it at close() if the caller has not.
        """
        self._check_open()
        sock = netns.open_socket(self.ns_of(node), family, type, proto)
        self._sockets.add(sock)
        return sock

    def call_in(self, node: Node | str, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a thread inside ``node``'s namespace and return its result.

        Sockets, TUN devices and HTTP clients created inside ``fn`` belong to that namespace.
        """
        self._check_open()
        return netns.call_in(self.ns_of(node), fn)

    def _ip(self, ns: str, *args: str) -> None:
        self._cmd(["ip", "-n", ns, *args])

    def _cmd(self, cmd: Sequence[str], input: str | None = None) -> str:
        result = subprocess.run(
            list(cmd), capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT_S, input=input
        )
        if result.returncode != 0:
            raise LabError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def _ns_exec(self, ns: str, argv: Sequence[str], input: str | None = None) -> str:
        return self._cmd(["ip", "netns", "exec", ns, *argv], input=input)

    def _nft(self, ns: str, ruleset: str) -> None:
        self._ns_exec(ns, ["nft", "-f", "-"], input=ruleset)

    def sysctl(self, node: Node | str, values: Mapping[str, int]) -> None:
        """Set sysctls (dotted names, e.g. net.ipv4.ip_forward) inside ``node``'s namespace."""
        self._sysctl(self.ns_of(node), values)

    def _sysctl(self, ns: str, values: Mapping[str, int]) -> None:
        """Set sysctls (dotted names) inside ``ns``; net.bridge.*/net.ipv6.* are skipped if absent."""

        # Written straight into /proc from inside the namespace: no subprocess per value.
        def write() -> None:
            for key, value in values.items():
                path = "/proc/sys/" + key.replace(".", "/")
                if key.startswith(("net.bridge.", "net.ipv6.")) and not os.path.exists(path):
                    continue
                with open(path, "w") as f:
                    f.write(str(value))

        # /proc/sys/net reflects the namespace of the thread that opens it.
        netns.call_in(ns, write)

    # -- building -----------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        self._check_open()
        if not _NAME_RE.match(name):
            raise ValueError(f"lab node names are 1-20 chars of [a-z0-9-], got {name!r}")
        if name in self._names:
            raise ValueError(f"lab already has a node named {name!r}")

    def _new_namespace(self, name: str) -> str:
        self._check_name(name)
        ns = self.prefix + name
        self._cmd(["ip", "netns", "add", ns])
        self._names.add(name)
        self._namespaces.append(ns)
        self._ip(ns, "link", "set", "lo", "up")
        # No duplicate address detection on lab links: it holds every new IPv6 address (link-local
        # ones included, which neighbour discovery needs) tentative for a second or two.
        self._sysctl(ns, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0})
        return ns

    def internet(self) -> Internet:
        """The public segment (created on first use): bridge ``br0`` holding 198.18.0.1/16."""
        if self._internet is not None:
            return self._internet
        ns = self._new_namespace("inet")
        self._ip(ns, "link", "add", INET_BRIDGE, "type", "bridge", "forward_delay", "0")
        self._ip(ns, "addr", "add", f"{INTERNET_GATEWAY}/{INTERNET_SUBNET.prefixlen}", "dev", INET_BRIDGE)
        self._ip(ns, "addr", "add", f"{INTERNET_ALT}/{INTERNET_SUBNET.prefixlen}", "dev", INET_BRIDGE)
        if self.ipv6:
            # It routes between the internet /64 and the routers' LAN /64s.
            self._sysctl(ns, {"net.ipv6.conf.all.forwarding": 1})
            self._ip(ns, "-6", "addr", "add", f"{INTERNET6_GATEWAY}/64", "dev", INET_BRIDGE, "nodad")
        self._ip(ns, "link", "set", INET_BRIDGE, "up")
        self._sysctl(ns, {**_NO_BRIDGE_NETFILTER, "net.ipv4.ip_forward": 0})
        self._inet_segment = _Segment(ns, INET_BRIDGE, INTERNET_SUBNET, INTERNET_GATEWAY, next_host=256)
        self._inet_segment.used.add(INTERNET_ALT)
        if self.ipv6:
            self._inet_segment.network6, self._inet_segment.gateway6 = INTERNET6_SUBNET, INTERNET6_GATEWAY
        self._internet = Internet(
            ns=ns,
            subnet=str(INTERNET_SUBNET),
            gateway=str(INTERNET_GATEWAY),
            gateway6=str(INTERNET6_GATEWAY) if self.ipv6 else None,
        )
        return self._internet

    def _segment_for(self, behind: Router | None) -> _Segment:
        if behind is None:
            self.internet()
            assert self._inet_segment is not None
            return self._inet_segment
        self.ns_of(behind)
        return self._lan_segments[behind.ns]

    @staticmethod
    def _reserve(segment: _Segment, address: str | None) -> ipaddress.IPv4Address:
        """Pick (or check and take) an address on ``segment``, before anything is built."""
        if address is None:
            return segment.allocate()
        addr = ipaddress.IPv4Address(address)
        if addr not in segment.network or addr == segment.gateway or addr in segment.used:
            raise ValueError(f"{address} is not a free address in {segment.network}")
        segment.used.add(addr)
        return addr

    def _attach(
        self, ns: str, iface: str, segment: _Segment, addr: ipaddress.IPv4Address
    ) -> tuple[str, str, str | None]:
        """Link ``ns`` to ``segment`` with a veth named ``iface`` on the ``ns`` side."""
        segment.ports += 1
        port = f"p{segment.ports}"
        # Both ends are created directly inside lab namespaces: nothing ever appears in the root one.
        self._ip(ns, "link", "add", iface, "type", "veth", "peer", "name", port, "netns", segment.ns)
        self._ip(segment.ns, "link", "set", port, "master", segment.bridge, "up")
        self._ip(ns, "addr", "add", f"{addr}/{segment.network.prefixlen}", "dev", iface)
        addr6 = segment.address6_for(addr)
        if addr6 is not None:
            # nodad: the address is usable at once (no 1 s duplicate-address detection wait).
            self._ip(ns, "-6", "addr", "add", f"{addr6}/64", "dev", iface, "nodad")
        self._ip(ns, "link", "set", iface, "up")
        self._ip(ns, "route", "add", "default", "via", str(segment.gateway))
        if addr6 is not None:
            self._ip(ns, "-6", "route", "add", "default", "via", str(segment.gateway6), "dev", iface)
        return str(addr), str(segment.gateway), str(addr6) if addr6 is not None else None

    def host(self, name: str, behind: Router | None = None, *, address: str | None = None) -> Host:
        """A host on the internet (``behind=None``) or on a router's LAN."""
        self._check_name(name)
        segment = self._segment_for(behind)
        reserved = self._reserve(segment, address)
        ns = self._new_namespace(name)
        addr, gateway, addr6 = self._attach(ns, HOST_IFACE, segment, reserved)
        if behind is None:
            self._nft(ns, host_ruleset())
            if addr6 is not None:
                self._nft(ns, host_ruleset6())
        return Host(name=name, ns=ns, address=addr, gateway=gateway, behind=behind, address6=addr6)

    def nat_router(
        self,
        name: str,
        kind: NatKind = NatKind.EIM_APDF,
        *,
        behind: Router | None = None,
        cgnat: bool = False,
        wan_address: str | None = None,
        hairpin: bool = False,
    ) -> Router:
        """A NAT router of ``kind`` with its WAN on the internet (or on ``behind``'s LAN).

        Its LAN is 192.168.<n>.0/24, or 100.127.<n>.0/24 for a carrier-grade NAT (``cgnat``).
        ``hairpin`` (EIM kinds only): UDP from the LAN to a LAN host's public mapping loops back.
        """
        if not kind.is_router:
            raise ValueError("NatKind.NONE has no router; use lab.host(name) for a public host")
        if hairpin and kind not in HAIRPIN_KINDS:
            raise ValueError(f"hairpinning needs an endpoint-independent mapping, not {kind}")
        self._check_name(name)
        segment = self._segment_for(behind)
        reserved = self._reserve(segment, wan_address)
        ns = self._new_namespace(name)
        # A hairpinned packet leaves by the interface it came in on; no ICMP redirects for that.
        self._sysctl(ns, {"net.ipv4.conf.all.send_redirects": 0, "net.ipv4.conf.default.send_redirects": 0})
        wan_addr, wan_gw, wan_addr6 = self._attach(ns, WAN_IFACE, segment, reserved)
        if cgnat:
            lan_net = ipaddress.IPv4Network(f"100.127.{self._next_cgnat}.0/24")
            self._next_cgnat += 1
        else:
            lan_net = ipaddress.IPv4Network(f"192.168.{self._next_lan}.0/24")
            self._next_lan += 1
        if self._next_lan > 255 or self._next_cgnat > 255:
            raise LabError("out of LAN subnets")
        lan_gw = lan_net.network_address + 1
        self._ip(ns, "link", "add", LAN_BRIDGE, "type", "bridge", "forward_delay", "0")
        self._ip(ns, "addr", "add", f"{lan_gw}/{lan_net.prefixlen}", "dev", LAN_BRIDGE)
        self._ip(ns, "link", "set", LAN_BRIDGE, "up")
        self._sysctl(ns, {**_NO_BRIDGE_NETFILTER, "net.ipv4.ip_forward": 1})
        self._nft(
            ns, router_ruleset(kind, WAN_IFACE, LAN_BRIDGE, (wan_addr, str(lan_net)) if hairpin else None)
        )
        segment_lan = _Segment(ns, LAN_BRIDGE, lan_net, lan_gw, next_host=10)
        lan6: ipaddress.IPv6Network | None = None
        # IPv6 only behind routers directly on the internet; carriers in the lab are IPv4-only.
        if wan_addr6 is not None and not cgnat:
            lan_index = int(lan_net.network_address.packed[2])
            lan6 = ipaddress.IPv6Network(f"2001:2:0:{lan_index:x}::/64")
            segment_lan.network6, segment_lan.gateway6 = lan6, lan6.network_address + 1
            self._sysctl(ns, {"net.ipv6.conf.all.forwarding": 1})
            self._ip(ns, "-6", "addr", "add", f"{segment_lan.gateway6}/64", "dev", LAN_BRIDGE, "nodad")
            self._nft(ns, router_ruleset6(kind, WAN_IFACE))
            inet = self.internet()
            self._ip(inet.ns, "-6", "route", "add", str(lan6), "via", wan_addr6)
        self._lan_segments[ns] = segment_lan
        router = Router(
            name=name,
            ns=ns,
            kind=kind,
            wan_address=wan_addr,
            wan_gateway=wan_gw,
            lan_address=str(lan_gw),
            lan_subnet=str(lan_net),
            cgnat=cgnat,
            behind=behind,
            wan_address6=wan_addr6,
            lan_address6=str(segment_lan.gateway6) if lan6 is not None else None,
            lan_subnet6=str(lan6) if lan6 is not None else None,
        )
        if kind is NatKind.PORTMAP:
            self._start_miniupnpd(router)
        return router

    def _stun_responder(self) -> str:
        """Start (once) the lab's STUN responder on the internet gateway; return its address."""
        inet = self.internet()
        if self._stun_proc is None:
            socks = []
            for addr in (INTERNET_GATEWAY, INTERNET_ALT):
                for port in (portmap.STUN_PORT, portmap.STUN_ALT_PORT):
                    sock = self.socket(inet)
                    sock.bind((str(addr), port))
                    socks.append(sock)
            fds = [sock.fileno() for sock in socks]
            # The sockets are bound before the child starts, so it is ready the moment this returns.
            self._stun_proc = self.popen(
                inet,
                [sys.executable, "-m", "wiremesh.lab.stunecho", "--fds", ",".join(map(str, fds))],
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            for sock in socks:
                sock.close()
        return inet.gateway

    def _start_miniupnpd(self, router: Router) -> None:
        ns = router.ns
        self._nft(ns, portmap.upnp_ruleset())
        stun_host = self._stun_responder()
        # The router's own firewall lets the STUN responder's answers from its other address and
        # port in (miniupnpd's reachability check needs them); nothing else new gets in.
        stun_sources = f"{{ {INTERNET_GATEWAY}, {INTERNET_ALT} }}"
        stun_ports = f"{{ {portmap.STUN_PORT}, {portmap.STUN_ALT_PORT} }}"
        self._nft(
            ns,
            f'insert rule ip {TABLE} input iifname "{WAN_IFACE}" '
            f"ip saddr {stun_sources} udp sport {stun_ports} accept\n",
        )
        conf = os.path.join(self.tmpdir, f"{router.name}-miniupnpd.conf")
        with open(conf, "w") as f:
            f.write(
                portmap.miniupnpd_config(
                    wan=WAN_IFACE,
                    lan=LAN_BRIDGE,
                    lan_subnet=router.lan_subnet,
                    stun_host=stun_host,
                    lease_file=os.path.join(self.tmpdir, f"{router.name}-miniupnpd.leases"),
                )
            )
        logfile = os.path.join(self.tmpdir, f"{router.name}-miniupnpd.log")
        with open(logfile, "w") as log_out:
            proc = self.popen(
                router,
                [
                    "miniupnpd",
                    "-d",
                    "-f",
                    conf,
                    "-P",
                    os.path.join(self.tmpdir, f"{router.name}-miniupnpd.pid"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
            )
        self._miniupnpd_logs[ns] = logfile
        # Ready when it answers NAT-PMP on the LAN; its STUN check runs before that.
        probe = self.socket(router)
        try:
            deadline = time.monotonic() + MINIUPNPD_START_TIMEOUT_S
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                if portmap.natpmp_public_address(probe, router.lan_address, 0.2) is not None:
                    return
        finally:
            probe.close()
        raise LabError(f"miniupnpd in {ns} did not start: {self.miniupnpd_log(router)[-2000:]}")

    def miniupnpd_log(self, router: Router) -> str:
        """What miniupnpd on a PORTMAP router has logged so far (for debugging tests)."""
        path = self._miniupnpd_logs.get(router.ns)
        if path is None:
            raise LabError(f"{router.name} runs no miniupnpd")
        with open(path, errors="replace") as f:
            return f.read()

    def device(self, name: str, kind: NatKind) -> Host:
        """A host with its own router of ``kind`` (named ``<name>-nat``), or public for NONE."""
        if not kind.is_router:
            return self.host(name)
        return self.host(name, behind=self.nat_router(f"{name}-nat", kind))

    # -- faults and state ---------------------------------------------------------------------

    def set_udp_timeouts(self, router: Router, *, unreplied: int, replied: int) -> None:
        """How long (seconds) the router keeps an idle UDP mapping: one-way, and once replied to.

        The kernel defaults are 30 and 120 s; shorten them to test keepalives and rebinding.
        """
        if unreplied < 1 or replied < 1:
            raise ValueError("conntrack timeouts are whole seconds >= 1")
        self._sysctl(
            self.ns_of(router),
            {
                "net.netfilter.nf_conntrack_udp_timeout": unreplied,
                "net.netfilter.nf_conntrack_udp_timeout_stream": replied,
            },
        )

    def conntrack_entries(self, node: Router | Host, proto: str = "udp") -> list[str]:
        """The router's current conntrack entries for ``proto``, one text line each."""
        result = self.run(node, ["conntrack", "-L", "-p", proto], check=False)
        return [line for line in result.stdout.splitlines() if line.strip()]

    def drops(self, node: Router | Host) -> int:
        """Packets dropped so far by the node's lab rules (NAT filtering, UDP blocking, fault rules).

        IPv4 and IPv6 together. Lets a test wait for the event "it was dropped" instead of sleeping.
        """
        if isinstance(node, Host) and node.behind is not None:
            raise ValueError(f"{node.name} is behind a router and has no lab rules; ask its router")
        ns = self.ns_of(node)
        total = 0
        for family in self._families(node):
            out = self._ns_exec(ns, ["nft", "-j", "list", "counter", family, TABLE, DROPS_COUNTER])
            for item in json.loads(out).get("nftables", []):
                counter = item.get("counter")
                if counter is not None:
                    total += int(counter.get("packets", 0))
        return total

    def wait_drops(self, node: Router | Host, more_than: int, timeout: float = 10.0) -> int:
        """Wait until ``drops(node) > more_than``; returns the new count or raises LabError."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.drops(node)
            if count > more_than:
                return count
            if time.monotonic() > deadline:
                raise LabError(f"{node.name} dropped no more than {more_than} packets within {timeout} s")
            time.sleep(0.01)

    def flush_conntrack(self, node: Router | Host) -> None:
        """Forget every NAT mapping and connection in ``node`` (a NAT rebinding)."""
        ns = self.ns_of(node)
        result = subprocess.run(
            ["ip", "netns", "exec", ns, "conntrack", "-F"],
            capture_output=True,
            text=True,
            check=False,
            timeout=COMMAND_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise LabError(f"conntrack -F in {ns} failed: {result.stderr.strip()}")
        if isinstance(node, Router):
            # The NAT's own memory of mappings lives in these maps as well as in conntrack.
            listing = self._ns_exec(ns, ["nft", "list", "table", "ip", TABLE])
            for name in (ADF_MAP, EIM_MAP):
                if f"map {name} {{" in listing:
                    self._ns_exec(ns, ["nft", "flush", "map", "ip", TABLE, name])

    def rebind(self, router: Router, ports: tuple[int, int] = (20000, 29999)) -> RuleHandle:
        """A NAT rebinding that moves the LAN's UDP mappings to other public ports: the router
        forgets every mapping, and new ones take a port from ``ports`` (until the returned rule
        is removed)."""
        ns = self.ns_of(router)
        # Inserted first in postrouting, so it wins over the plain masquerade.
        rule = f"ip saddr {router.lan_subnet} meta l4proto udp masquerade to :{ports[0]}-{ports[1]}"
        out = self._ns_exec(
            ns, ["nft", "--echo", "--handle", "insert", "rule", "ip", TABLE, "postrouting", *rule.split()]
        )
        match = re.search(r"# handle (\d+)", out)
        if match is None:
            raise LabError(f"nft did not report a rule handle: {out!r}")
        handle = RuleHandle(ns=ns, rules=(("ip", "postrouting", int(match.group(1))),))
        self.flush_conntrack(router)
        return handle

    def _add_rules(self, ns: str, rules: Sequence[tuple[str, str, str]]) -> RuleHandle:
        added: list[tuple[str, str, int]] = []
        try:
            for family, chain, rule in rules:
                out = self._ns_exec(
                    ns, ["nft", "--echo", "--handle", "add", "rule", family, TABLE, chain, *rule.split()]
                )
                match = re.search(r"# handle (\d+)", out)
                if match is None:
                    raise LabError(f"nft did not report a rule handle: {out!r}")
                added.append((family, chain, int(match.group(1))))
        except BaseException:
            self.remove_rule(RuleHandle(ns=ns, rules=tuple(added)))
            raise
        return RuleHandle(ns=ns, rules=tuple(added))

    def remove_rule(self, handle: RuleHandle) -> None:
        """Remove the rules added by ``block_udp`` or ``drop_between``."""
        ns = self.ns_of(handle.ns)
        blocks = self._udp_blocks.get(ns, [])
        if handle in blocks:
            blocks.remove(handle)
        for family, chain, number in handle.rules:
            self._ns_exec(ns, ["nft", "delete", "rule", family, TABLE, chain, "handle", str(number)])

    def _families(self, node: Router | Host) -> list[str]:
        has6 = node.lan_subnet6 is not None if isinstance(node, Router) else node.address6 is not None
        return ["ip", "ip6"] if has6 else ["ip"]

    def block_udp(self, router: Router) -> RuleHandle:
        """Drop all UDP the router would forward, both ways (TCP still passes).

        Undo with ``unblock_udp(router)`` or ``remove_rule(handle)``.
        """
        ns = self.ns_of(router)
        handle = self._add_rules(
            ns, [(f, FAULTS_CHAIN, f"meta l4proto udp {COUNTED_DROP}") for f in self._families(router)]
        )
        self._udp_blocks.setdefault(ns, []).append(handle)
        return handle

    def unblock_udp(self, router: Router) -> None:
        """Remove every ``block_udp`` rule still on the router (no-op when there is none)."""
        for handle in self._udp_blocks.pop(self.ns_of(router), []):
            self.remove_rule(handle)

    def drop_between(self, node: Router | Host, address: str) -> RuleHandle:
        """Drop all traffic between ``node`` (a router's LAN, or a public host) and ``address``.

        ``address`` may be IPv4 or IPv6.
        """
        ns = self.ns_of(node)
        ip = ipaddress.ip_address(address)
        family, match = ("ip", "ip") if ip.version == 4 else ("ip6", "ip6")
        if family not in self._families(node):
            raise ValueError(f"{node.name} has no IPv{ip.version}")
        if isinstance(node, Router):
            return self._add_rules(
                ns,
                [
                    (family, FAULTS_CHAIN, f"{match} daddr {ip} {COUNTED_DROP}"),
                    (family, FAULTS_CHAIN, f"{match} saddr {ip} {COUNTED_DROP}"),
                ],
            )
        if node.behind is not None:
            raise ValueError("drop_between on a host behind a router: pass the router instead")
        return self._add_rules(
            ns,
            [
                (family, f"{FAULTS_CHAIN}_out", f"{match} daddr {ip} {COUNTED_DROP}"),
                (family, f"{FAULTS_CHAIN}_in", f"{match} saddr {ip} {COUNTED_DROP}"),
            ],
        )


def _check_argv(argv: Sequence[str]) -> None:
    if isinstance(argv, str | bytes) or not argv:
        raise TypeError("argv must be a non-empty list of arguments, not a string")


def _stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            # The whole group: popen starts each process in its own session.
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            proc.wait(timeout=PROCESS_STOP_TIMEOUT_S)
            return
        except subprocess.TimeoutExpired:
            continue
    log.error("lab: process %d did not exit", proc.pid)


# `FORWARD_CHAIN` is part of the documented ruleset; re-exported for callers adding their own rules.
__all__ = [
    "FORWARD_CHAIN",
    "Host",
    "Internet",
    "Lab",
    "LabError",
    "NatKind",
    "Node",
    "Router",
    "RuleHandle",
]
