"""The lab owns what it creates: names, safety checks, fault rules and teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from wiremesh.lab import Lab, LabError, NatKind
from wiremesh.lab.probe import first_arrival, observed_source, udp_socket

pytestmark = pytest.mark.netns


def namespace_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_every_namespace_carries_the_lab_prefix(lab: Lab) -> None:
    lab.device("a", NatKind.EIM_APDF)
    lab.host("pub")
    assert lab.prefix.startswith("wm")
    assert all(ns.startswith(lab.prefix) for ns in lab.namespaces)
    assert set(lab.namespaces) <= namespace_names()


def test_two_labs_use_the_same_node_names_side_by_side() -> None:
    with Lab() as one, Lab() as two:
        a1, a2 = one.device("a", NatKind.EIM_APDF), two.device("a", NatKind.EIM_APDF)
        assert a1.ns != a2.ns
        one.run(a1, ["ping", "-c1", "-W2", one.host("pub").address])
        two.run(a2, ["ping", "-c1", "-W2", two.host("pub").address])


def test_duplicate_node_name_is_refused(lab: Lab) -> None:
    lab.host("a")
    with pytest.raises(ValueError, match="already has a node named"):
        lab.host("a")


def test_bad_node_name_is_refused(lab: Lab) -> None:
    with pytest.raises(ValueError, match="names are"):
        lab.host("Bad Name!")


def test_root_namespace_gets_no_lab_address_or_route(lab: Lab) -> None:
    lab.device("a", NatKind.EIM_APDF)
    lab.host("pub")
    addrs = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    assert "198.18." not in addrs + routes
    assert "192.168.1." not in routes


def test_run_refuses_a_namespace_the_lab_did_not_create(lab: Lab) -> None:
    lab.host("a")
    with pytest.raises(LabError, match="does not belong"):
        lab.run("wm0000-a", ["true"])


def test_run_refuses_a_namespace_that_no_longer_exists(lab: Lab) -> None:
    a = lab.host("a")
    subprocess.run(["ip", "netns", "del", a.ns], check=True)
    with pytest.raises(LabError, match="no longer exists"):
        lab.run(a, ["true"])


def test_run_raises_with_stderr_when_the_command_fails(lab: Lab) -> None:
    a = lab.host("a")
    with pytest.raises(LabError, match="exited 1"):
        lab.run(a, ["sh", "-c", "echo oops >&2; exit 1"])


def test_close_removes_every_namespace() -> None:
    with Lab() as lab:
        lab.device("a", NatKind.EIM_ADF)
        lab.host("pub")
        created = set(lab.namespaces)
    assert created
    assert not created & namespace_names()


def test_close_removes_namespaces_after_an_error() -> None:
    created: set[str] = set()
    with pytest.raises(RuntimeError, match="boom"), Lab() as lab:
        lab.device("a", NatKind.EDM)
        created = set(lab.namespaces)
        raise RuntimeError("boom")
    assert created
    assert not created & namespace_names()


def test_close_stops_processes_started_with_popen() -> None:
    with Lab() as lab:
        proc = lab.popen(lab.host("a"), ["sleep", "600"])
        pid = proc.pid
        assert pid_alive(pid)
    assert proc.poll() is not None
    assert not pid_alive(pid)


def test_close_stops_daemons_that_left_the_process_tree() -> None:
    with Lab() as lab:
        a = lab.host("a")
        # A double fork, as daemons (wireguard-go) do: the lab never saw this PID.
        out = lab.run(a, ["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"]).stdout
        pid = int(out.strip())
        assert pid_alive(pid)
    assert wait_until(lambda: not pid_alive(pid))


def test_close_is_idempotent_and_refuses_later_use() -> None:
    lab = Lab()
    a = lab.host("a")
    lab.close()
    lab.close()
    with pytest.raises(LabError):
        lab.run(a, ["true"])


def test_block_udp_drops_udp_until_removed(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.EIM_APDF)
    assert a.behind is not None
    inside, server = udp_socket(lab, a), udp_socket(lab, pub, 3478)
    handle = lab.block_udp(a.behind)
    before = lab.drops(a.behind)
    inside.sendto(b"blocked", (pub.address, 3478))
    lab.wait_drops(a.behind, before)
    udp_socket(lab, lab.host("pub2")).sendto(b"marker", (pub.address, 3478))
    assert first_arrival(server) == b"marker"
    lab.remove_rule(handle)
    assert observed_source(inside, server, (pub.address, 3478))[0] == a.public_address


def test_drop_between_cuts_only_that_address(lab: Lab) -> None:
    pub, other, third = lab.host("pub"), lab.host("other"), lab.host("third")
    a = lab.device("a", NatKind.EIM_APDF)
    assert a.behind is not None
    inside, to_pub, to_other = udp_socket(lab, a), udp_socket(lab, pub, 3478), udp_socket(lab, other, 3478)
    handle = lab.drop_between(a.behind, pub.address)
    before = lab.drops(a.behind)
    inside.sendto(b"dropped", (pub.address, 3478))
    lab.wait_drops(a.behind, before)
    udp_socket(lab, third).sendto(b"marker", (pub.address, 3478))
    assert first_arrival(to_pub) == b"marker"
    assert observed_source(inside, to_other, (other.address, 3478))[0] == a.public_address
    lab.remove_rule(handle)
    assert observed_source(inside, to_pub, (pub.address, 3478))[0] == a.public_address


def test_drop_between_works_on_a_public_host(lab: Lab) -> None:
    pub, other, third = lab.host("pub"), lab.host("other"), lab.host("third")
    sender, receiver = udp_socket(lab, pub), udp_socket(lab, other, 3478)
    handle = lab.drop_between(pub, other.address)
    before = lab.drops(pub)
    with contextlib.suppress(PermissionError):  # a local output drop fails the send with EPERM
        sender.sendto(b"dropped", (other.address, 3478))
    lab.wait_drops(pub, before)
    udp_socket(lab, third).sendto(b"marker", (other.address, 3478))
    assert first_arrival(receiver) == b"marker"
    lab.remove_rule(handle)
    assert observed_source(sender, receiver, (other.address, 3478))[0] == pub.address


def test_flush_conntrack_forgets_the_mapping(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.EIM_APDF)
    assert a.behind is not None
    inside, server = udp_socket(lab, a), udp_socket(lab, pub, 3478)
    mapped = observed_source(inside, server, (pub.address, 3478))
    lab.flush_conntrack(a.behind)
    before = lab.drops(a.behind)
    server.sendto(b"after-flush", mapped)
    lab.wait_drops(a.behind, before)
    lanpeer = udp_socket(lab, lab.host("lanpeer", behind=a.behind))
    lanpeer.sendto(b"marker", (a.address, inside.getsockname()[1]))
    assert first_arrival(inside) == b"marker"


# The child starts with the default dispositions: a test runner started under nohup (as a
# background `make test` may be) ignores SIGHUP, children inherit that, and the lab rightly
# leaves an ignored signal ignored; that made the SIGHUP case time out.
LAB_CHILD = """
import signal, sys, time
from wiremesh.lab import Lab, NatKind
for signum in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, signal.SIG_DFL)
lab = Lab()
lab.device("a", NatKind.EIM_APDF)
lab.popen(lab.host("pub"), ["sleep", "600"])
print(lab.prefix, flush=True)
time.sleep(600)
"""


def start_lab_child() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", LAB_CHILD], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout is not None
    prefix = proc.stdout.readline().strip()
    assert prefix.startswith("wm"), prefix
    return proc, prefix


def lab_namespaces(prefix: str) -> set[str]:
    return {ns for ns in namespace_names() if ns.startswith(prefix)}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_termination_signal_tears_the_lab_down_and_still_kills(signum: int) -> None:
    proc, prefix = start_lab_child()
    try:
        assert lab_namespaces(prefix)
        proc.send_signal(signum)
        assert proc.wait(timeout=20) == -signum
        assert not lab_namespaces(prefix)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_new_lab_removes_what_a_killed_lab_left_behind() -> None:
    proc, prefix = start_lab_child()
    assert lab_namespaces(prefix)
    proc.kill()
    proc.wait()
    # (Any lab started meanwhile, by another test process, may already have reaped them.)
    with Lab():
        assert not lab_namespaces(prefix)


def test_a_claimed_prefix_cannot_be_used_twice(lab: Lab) -> None:
    with pytest.raises(RuntimeError, match="in use"):
        Lab(prefix=lab.prefix)


def test_short_udp_timeout_expires_an_idle_mapping(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.EIM_APDF)
    assert a.behind is not None
    lab.set_udp_timeouts(a.behind, unreplied=1, replied=1)
    inside, server = udp_socket(lab, a), udp_socket(lab, pub, 3478)
    mapped = observed_source(inside, server, (pub.address, 3478))
    assert lab.conntrack_entries(a.behind)
    assert wait_until(lambda: not lab.conntrack_entries(a.behind), timeout=10)
    before = lab.drops(a.behind)
    server.sendto(b"after-expiry", mapped)
    lab.wait_drops(a.behind, before)
    lanpeer = udp_socket(lab, lab.host("lanpeer", behind=a.behind))
    lanpeer.sendto(b"marker", (a.address, inside.getsockname()[1]))
    assert first_arrival(inside) == b"marker"


ROOT_SYSCTLS = [
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_udp_timeout",
]


def read_root_sysctls() -> dict[str, str]:
    out = {}
    for name in ROOT_SYSCTLS:
        with contextlib.suppress(FileNotFoundError), open(f"/proc/sys/{name}") as f:
            out[name] = f.read().strip()
    return out


def test_building_a_lab_leaves_root_namespace_sysctls_alone() -> None:
    before = read_root_sysctls()
    with Lab(ipv6=True) as lab:
        a = lab.device("a", NatKind.EIM_APDF)
        assert a.behind is not None
        lab.set_udp_timeouts(a.behind, unreplied=2, replied=3)
        assert read_root_sysctls() == before


def test_routers_forward_and_keep_bridged_lan_traffic_out_of_netfilter(lab: Lab) -> None:
    a = lab.device("a", NatKind.EIM_APDF)
    assert a.behind is not None
    out = lab.run(a.behind, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip()
    assert out == "1"
    if os.path.exists("/proc/sys/net/bridge"):
        value = lab.run(a.behind, ["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"]).stdout.strip()
        assert value == "0"


def test_run_refuses_a_command_string(lab: Lab) -> None:
    a = lab.host("a")
    with pytest.raises(TypeError, match="argv"):
        lab.run(a, "ping -c1 198.18.0.1")


def test_unblock_udp_lets_udp_through_again(lab: Lab) -> None:
    pub = lab.host("pub")
    a = lab.device("a", NatKind.EIM_APDF)
    assert a.behind is not None
    inside, server = udp_socket(lab, a), udp_socket(lab, pub, 3478)
    lab.block_udp(a.behind)
    lab.block_udp(a.behind)
    lab.unblock_udp(a.behind)
    assert observed_source(inside, server, (pub.address, 3478))[0] == a.public_address
    lab.unblock_udp(a.behind)  # nothing left to remove: no error


def test_reaping_never_touches_namespaces_no_dead_lab_claimed() -> None:
    stranger = f"wm{os.urandom(2).hex()}-notours"
    subprocess.run(["ip", "netns", "add", stranger], check=True)
    try:
        with Lab():
            assert stranger in namespace_names()
        assert stranger in namespace_names()
    finally:
        subprocess.run(["ip", "netns", "del", stranger], check=False)


UNCLOSED_LAB_CHILD = """
from wiremesh.lab import Lab, NatKind
def build():
    lab = Lab()
    lab.device("a", NatKind.EIM_APDF)
    print(lab.prefix, flush=True)
build()  # the Lab object is dropped without close(); exit must still tear it down
"""


def test_a_lab_dropped_without_close_is_torn_down_at_exit() -> None:
    out = subprocess.run(
        [sys.executable, "-c", UNCLOSED_LAB_CHILD], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    prefix = out.strip()
    assert prefix.startswith("wm")
    assert not lab_namespaces(prefix)


def test_explicit_public_address_is_used_and_cannot_be_taken_twice(lab: Lab) -> None:
    pub = lab.host("pub", address="198.18.200.7")
    assert pub.address == "198.18.200.7"
    assert "198.18.200.7/16" in lab.run(pub, ["ip", "-4", "addr", "show", "dev", "eth0"]).stdout
    with pytest.raises(ValueError, match="not a free address"):
        lab.host("again", address="198.18.200.7")
    with pytest.raises(ValueError, match="not a free address"):
        lab.host("gateway", address="198.18.0.1")
    # A refused node leaves nothing behind, and its name stays free.
    assert not any(ns.endswith(("-again", "-gateway")) for ns in lab.namespaces)
    lab.host("again")
