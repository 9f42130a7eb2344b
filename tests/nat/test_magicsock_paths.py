"""magicsock core in memory: two (or more) PathSelector objects wired by a tiny simulated network."""

from __future__ import annotations

import random

import pytest

from wiremesh.core import disco
from wiremesh.core.disco import DiscoKey, Endpoint, EndpointKind
from wiremesh.core.magicsock import (
    AddressConfirmed,
    CloseProbeSockets,
    Direct,
    MappingChanged,
    OpenProbeSockets,
    PathChanged,
    PathSelector,
    PeerInfo,
    PingResult,
    Relay,
    choose_home_region,
)
from wiremesh.core.magicsock import core as mscore

REGION = 1


class Node:
    def __init__(self, name: str, public: tuple[str, int], lan: tuple[str, int] | None = None, **kw):
        self.name = name
        self.node_key = bytes([len(name)]) + name.encode().ljust(31, b"\0")
        self.disco = DiscoKey()
        self.public = public
        self.lan = lan
        self.ms = PathSelector(self.node_key, self.disco, 0.0, rng=random.Random(1), **kw)
        self.ms.set_home_region(REGION)
        self.events: list[object] = []
        eps = [Endpoint(public, EndpointKind.STUN)]
        if lan:
            eps.append(Endpoint(lan, EndpointKind.LOCAL))
        self.endpoints = tuple(eps)
        self.ms.set_local_endpoints(self.endpoints, False, 0.0)

    def info(self, with_endpoints: bool = True) -> PeerInfo:
        return PeerInfo(
            self.node_key, self.disco.public_key, self.endpoints if with_endpoints else (), REGION
        )


class Net:
    """Delivers Direct datagrams between node addresses unless blocked; Relay always works."""

    def __init__(self, *nodes: Node):
        self.nodes = nodes
        self.blocked: set[tuple[str, str]] = set()
        self.delivered: list[tuple[str, str, object]] = []
        self.relay_down = False

    def pump(self, now: float, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for node in self.nodes:
                while (ev := node.ms.next_event()) is not None:
                    node.events.append(ev)
                for data, dest in node.ms.datagrams_to_send():
                    moved = True
                    self._deliver(node, data, dest, now)
            if not moved:
                return

    def _deliver(self, src: Node, data: bytes, dest, now: float) -> None:
        if isinstance(dest, Relay):
            if self.relay_down:
                return
            for node in self.nodes:
                if node.node_key == dest.node_key:
                    node.ms.receive_disco(data, Relay(dest.region, src.node_key), now)
            return
        for node in self.nodes:
            for own, seen in ((node.public, src.public), (node.lan, src.lan)):
                if own is not None and dest.address == own:
                    if (src.name, node.name) in self.blocked or seen is None:
                        return
                    if own == node.lan and src.lan is None:
                        return  # LAN addresses are reachable only from the same LAN
                    node.ms.receive_disco(data, Direct(seen), now)
                    return

    def run(self, start: float, end: float, step: float = 0.05, traffic: bool = True) -> float:
        t = start
        while t < end:
            if traffic:
                for a in self.nodes:
                    for b in self.nodes:
                        if a is not b and b.node_key in a.ms.peers:
                            a.ms.route(b.node_key, t)
            for node in self.nodes:
                node.ms.handle_timer(t)
            self.pump(t)
            t += step
        return t


def pair(**kw) -> tuple[Node, Node, Net]:
    a = Node("a", ("198.18.1.2", 41641), **kw)
    b = Node("b", ("198.18.2.2", 41641), **kw)
    a.ms.set_peers([b.info()], 0.0)
    b.ms.set_peers([a.info()], 0.0)
    return a, b, Net(a, b)


def test_traffic_goes_through_the_relay_until_a_path_is_proven():
    a, b, _net = pair()
    assert a.ms.route(b.node_key, 0.0) == Relay(REGION, b.node_key)


def test_first_send_pings_every_endpoint_and_calls_the_peer_through_the_relay():
    a, b, _ = pair()
    a.ms.route(b.node_key, 0.0)
    dests = [d for _, d in a.ms.datagrams_to_send()]
    assert Direct(b.public) in dests
    assert Relay(REGION, b.node_key) in dests
    assert a.ms.counters["call_me_maybe_sent"] == 1


def test_first_pong_makes_the_direct_path_best():
    a, b, net = pair()
    a.ms.route(b.node_key, 0.0)
    net.pump(0.01)
    assert a.ms.route(b.node_key, 0.02) == Direct(b.public)
    assert any(isinstance(e, PathChanged) and e.direct == Direct(b.public) for e in a.events)
    assert any(isinstance(e, AddressConfirmed) for e in a.events)


def test_call_me_maybe_lets_a_peer_without_our_endpoints_find_us():
    a, b, net = pair()
    b.ms.set_peers([a.info(with_endpoints=False)], 0.0)
    a.ms.set_peers([b.info(with_endpoints=False)], 0.0)
    a.ms.route(b.node_key, 0.0)  # only a CallMeMaybe can go out: a knows no endpoint of b
    net.pump(0.01)
    assert b.ms.peers[a.node_key].trusted(0.02) == Direct(a.public)
    assert a.ms.peers[b.node_key].trusted(0.02) == Direct(b.public)


def test_blocked_direct_path_stays_on_the_relay():
    a, b, net = pair()
    net.blocked |= {("a", "b"), ("b", "a")}
    net.run(0.0, 10.0)
    assert a.ms.route(b.node_key, 10.0) == Relay(REGION, b.node_key)


def test_discovery_repeats_with_backoff_while_no_direct_path():
    a, _b, net = pair()
    net.blocked |= {("a", "b"), ("b", "a")}
    net.run(0.0, 60.0, step=0.25)
    rounds = a.ms.counters["discovery_rounds"]
    # 0, 1, 3, 7, 15, 30, 45: backoff doubling from 1 s to the 15 s cap
    assert 6 <= rounds <= 8


def test_heartbeats_keep_an_active_direct_path_trusted():
    a, b, net = pair()
    net.run(0.0, 30.0)
    assert a.ms.route(b.node_key, 30.0) == Direct(b.public)
    assert a.ms.counters["path_lost"] == 0


def test_losing_the_direct_path_falls_back_to_the_relay_within_three_seconds():
    a, b, net = pair()
    t = net.run(0.0, 5.0)
    net.blocked |= {("a", "b"), ("b", "a")}
    lost_at = t
    while a.ms.route(b.node_key, t) != Relay(REGION, b.node_key):
        t = net.run(t, t + 0.05)
    assert t - lost_at <= 3.0


def test_the_direct_path_returns_after_it_heals():
    a, b, net = pair()
    t = net.run(0.0, 5.0)
    net.blocked |= {("a", "b"), ("b", "a")}
    t = net.run(t, t + 10.0)
    assert isinstance(a.ms.route(b.node_key, t), Relay)
    net.blocked.clear()
    t = net.run(t, t + 16.0)
    assert a.ms.route(b.node_key, t) == Direct(b.public)


def test_idle_peer_sends_no_heartbeats():
    a, b, net = pair()
    a.ms.route(b.node_key, 0.0)
    net.pump(0.0)
    a.ms.datagrams_to_send()
    t = net.run(60.0, 70.0, traffic=False)
    sent = 0
    for tt in (t, t + 5):
        a.ms.handle_timer(tt)
        sent += len(a.ms.datagrams_to_send())
    assert sent == 0


def test_lan_path_is_preferred_over_the_public_one():
    a = Node("a", ("198.18.1.2", 41641), lan=("192.168.1.10", 41641))
    b = Node("b", ("198.18.1.2", 41642), lan=("192.168.1.11", 41641))
    a.ms.set_peers([b.info()], 0.0)
    b.ms.set_peers([a.info()], 0.0)
    net = Net(a, b)
    net.run(0.0, 2.0)
    assert a.ms.route(b.node_key, 2.0) == Direct(b.lan)


def test_pong_from_another_address_proves_nothing():
    a, b, _net = pair()
    a.ms.route(b.node_key, 0.0)
    out = a.ms.datagrams_to_send()
    ping_data = next(d for d, dest in out if dest == Direct(b.public))
    _, ping = b.disco.open(ping_data)
    forged = b.disco.seal(disco.Pong(ping.tx_id, a.public), a.disco.public_key)
    a.ms.receive_disco(forged, Direct(("198.18.9.9", 1)), 0.01)
    assert a.ms.drops["disco_pong_wrong_path"] == 1
    assert isinstance(a.ms.route(b.node_key, 0.02), Relay)


def test_disco_from_an_unknown_key_is_dropped_and_counted():
    a, _b, _ = pair()
    stranger = DiscoKey()
    a.ms.receive_disco(
        stranger.seal(disco.Ping(disco.new_tx_id(), bytes(32)), a.disco.public_key), Direct(("1.2.3.4", 5)), 0
    )
    a.ms.receive_disco(b"garbage", Direct(("1.2.3.4", 5)), 0)
    assert a.ms.drops["disco_unknown_sender"] == 1
    assert a.ms.drops["disco_malformed"] == 1
    assert a.ms.datagrams_to_send() == []


def test_ping_with_the_wrong_node_key_gets_no_pong():
    a, b, _ = pair()
    a.ms.receive_disco(
        b.disco.seal(disco.Ping(disco.new_tx_id(), bytes(32)), a.disco.public_key), Direct(b.public), 0
    )
    assert a.ms.drops["disco_ping_wrong_node_key"] == 1
    assert a.ms.datagrams_to_send() == []


def test_relay_route_follows_the_region_the_peer_used():
    a, b, net = pair()
    a.ms.note_relay_route(b.node_key, 7)
    net.blocked |= {("a", "b"), ("b", "a")}
    assert a.ms.route(b.node_key, 0.0) == Relay(7, b.node_key)
    a.ms.forget_relay_region(7)
    assert a.ms.route(b.node_key, 0.1) == Relay(REGION, b.node_key)


def test_user_ping_reports_the_relay_and_the_direct_answer():
    a, b, net = pair()
    a.ms.ping(b.node_key, 0.0)
    net.pump(0.01)
    vias = {type(e.via) for e in a.events if isinstance(e, PingResult)}
    assert vias == {Relay, Direct}


def test_symmetric_side_asks_for_probe_sockets_after_plain_punching_fails():
    a, b, net = pair(birthday_sockets=8, birthday_spray=50)
    a.ms.set_local_endpoints(a.endpoints, True, 0.0)
    net.blocked |= {("a", "b"), ("b", "a")}
    net.run(0.0, 4.0)
    asks = [e for e in a.events if isinstance(e, OpenProbeSockets)]
    assert asks == [OpenProbeSockets(b.node_key, 8)]


def test_birthday_call_makes_the_peer_spray_a_bounded_number_of_ports():
    a, b, net = pair(birthday_sockets=8, birthday_spray=50)
    a.ms.set_local_endpoints(a.endpoints, True, 0.0)
    net.blocked |= {("a", "b"), ("b", "a")}
    net.run(0.0, 4.0)
    a.ms.probe_sockets_opened(b.node_key, list(range(1, 9)), 4.0)
    out = a.ms.datagrams_to_send()
    assert sum(1 for _, d in out if isinstance(d, Direct) and d.socket != 0) == 8
    for data, dest in out:
        if isinstance(dest, Relay):
            b.ms.receive_disco(data, Relay(REGION, a.node_key), 4.0)
    sprayed = set()
    t = 4.0
    while t < 6.0:
        b.ms.handle_timer(t)
        sprayed |= {
            d.address for _, d in b.ms.datagrams_to_send() if isinstance(d, Direct) and d.address != a.public
        }
        t += 0.01
    assert len(sprayed) == 50
    assert {host for host, _ in sprayed} == {a.public[0]}


def test_a_birthday_call_naming_a_host_outside_the_netmap_sprays_nothing_there():
    """A peer's CallMeMaybe cannot aim our ~1400-packet spray at a third party: only hosts coord
    published for that peer (its STUN results) are sprayed."""
    a, b, _ = pair(birthday_sockets=8, birthday_spray=50)
    victim = "203.0.113.9"
    forged = disco.CallMeMaybe(
        (Endpoint((victim, 41641), EndpointKind.STUN), Endpoint(a.public, EndpointKind.STUN)),
        mapping_varies=True,
        birthday=True,
    )
    sealed = a.disco.seal(forged, b.disco.public_key)
    b.ms.receive_disco(sealed, Relay(REGION, a.node_key), 1.0)
    sprayed = set()
    t = 1.0
    while t < 3.0:
        b.ms.handle_timer(t)
        sprayed |= {d.address for _, d in b.ms.datagrams_to_send() if isinstance(d, Direct)}
        t += 0.01
    # At most the one ordinary discovery ping to the endpoint it named, never a spray of ports.
    assert {addr for addr in sprayed if addr[0] == victim} <= {(victim, 41641)}
    assert len({addr for addr in sprayed if addr[0] == a.public[0]}) >= 25  # a's netmap host still is
    assert b.ms.drops["birthday_host_not_in_netmap"] == 1


def test_birthday_hit_becomes_the_path_and_closes_the_other_probe_sockets():
    a, b, _ = pair(birthday_sockets=4, birthday_spray=10)
    a.ms.set_local_endpoints(a.endpoints, True, 0.0)
    # b's spray reached a's probe socket 3 (the "hit"): a answers from that socket.
    a.ms.peers[b.node_key].probe_sockets = (1, 2, 3, 4)
    tx = disco.new_tx_id()
    a.ms.receive_disco(b.disco.seal(disco.Ping(tx, b.node_key), a.disco.public_key), Direct(b.public, 3), 1.0)
    out = a.ms.datagrams_to_send()
    ping_back = [
        (d, dest)
        for d, dest in out
        if dest == Direct(b.public, 3) and b.disco.open(d)[1].__class__ is disco.Ping
    ]
    assert ping_back
    _, their_ping = b.disco.open(ping_back[0][0])
    a.ms.receive_disco(
        b.disco.seal(disco.Pong(their_ping.tx_id, ("198.18.1.2", 5555)), a.disco.public_key),
        Direct(b.public, 3),
        1.01,
    )
    assert a.ms.route(b.node_key, 1.02) == Direct(b.public, 3)
    assert CloseProbeSockets(b.node_key, (3,)) in [a.ms.next_event() for _ in range(5)]


def test_non_symmetric_pair_never_opens_probe_sockets():
    a, b, net = pair()
    net.blocked |= {("a", "b"), ("b", "a")}
    net.run(0.0, 20.0, step=0.1)
    assert not any(isinstance(e, OpenProbeSockets) for e in a.events + b.events)


def test_removed_peer_is_forgotten():
    a, b, _ = pair()
    a.ms.set_peers([], 0.0)
    assert a.ms.route(b.node_key, 0.0) is None


@pytest.mark.parametrize(
    ("latencies", "current", "unavailable", "expected"),
    [
        ({1: 0.030, 2: 0.010}, None, (), 2),
        ({1: 0.030, 2: 0.025}, 1, (), 1),  # not clearly faster: keep home
        ({1: 0.030, 2: 0.010}, 1, (), 2),
        ({1: 0.010, 2: 0.030}, 1, (1,), 2),  # home relay down: fail over
        ({}, None, (), None),
    ],
)
def test_home_region_is_the_closest_reachable_with_hysteresis(latencies, current, unavailable, expected):
    assert choose_home_region(latencies, current, unavailable) == expected


def test_heartbeat_constants_meet_the_three_second_fallback():
    assert mscore.HEARTBEAT_INTERVAL + mscore.PING_TIMEOUT < 3.0


def test_pong_showing_a_new_public_port_reports_that_our_nat_rebound():
    a, b, _net = pair()
    a.ms.route(b.node_key, 0.0)
    out = a.ms.datagrams_to_send()
    data = next(d for d, dest in out if dest == Direct(b.public))
    _, ping = b.disco.open(data)
    rebound = (a.public[0], a.public[1] + 1)
    a.ms.receive_disco(
        b.disco.seal(disco.Pong(ping.tx_id, rebound), a.disco.public_key), Direct(b.public), 0.01
    )
    events = [a.ms.next_event() for _ in range(6)]
    assert MappingChanged(a.public, rebound) in events


def test_pong_confirming_our_public_address_reports_nothing():
    a, _b, net = pair()
    net.run(0.0, 2.0)
    assert not any(isinstance(e, MappingChanged) for e in a.events)


def _birthday_hit(a: Node, b: Node, sock: int, ping_at: float) -> bytes:
    """b's spray reached a's probe socket `sock` at `ping_at`: a pings back from that socket.
    Returns the tx id of a's ping back (b's Pong to it proves the path)."""
    tx = disco.new_tx_id()
    ping = b.disco.seal(disco.Ping(tx, b.node_key), a.disco.public_key)
    a.ms.receive_disco(ping, Direct(b.public, sock), ping_at)
    for data, dest in a.ms.datagrams_to_send():
        message = b.disco.open(data)[1] if dest == Direct(b.public, sock) else None
        if isinstance(message, disco.Ping):
            return message.tx_id
    raise AssertionError(f"a did not ping back from probe socket {sock}")


def test_second_birthday_hit_never_moves_the_path_to_a_socket_being_closed():
    # Regression (issue 4 follow-up): two probe sockets hit. The first Pong made socket 3 the
    # path and asked the adapter to close every other probe socket; the second, faster Pong on
    # socket 2 then moved the path to socket 2, which that close removes: the path died at the
    # next heartbeat and fell back to the relay.
    a, b, _ = pair(birthday_sockets=4, birthday_spray=10)
    a.ms.set_local_endpoints(a.endpoints, True, 0.0)
    a.ms.probe_sockets_opened(b.node_key, [1, 2, 3, 4], 1.0)
    a.ms.datagrams_to_send()
    tx3 = _birthday_hit(a, b, 3, 1.0)
    tx2 = _birthday_hit(a, b, 2, 1.25)
    a.ms.receive_disco(b.disco.seal(disco.Pong(tx3, a.public), a.disco.public_key), Direct(b.public, 3), 1.3)
    a.ms.receive_disco(b.disco.seal(disco.Pong(tx2, a.public), a.disco.public_key), Direct(b.public, 2), 1.31)
    # The adapter applies every close in order: what is still open afterwards?
    still_open = {1, 2, 3, 4}
    while (event := a.ms.next_event()) is not None:
        if isinstance(event, CloseProbeSockets):
            still_open &= set(event.keep)
    dest = a.ms.route(b.node_key, 1.32)
    assert isinstance(dest, Direct) and dest.socket in still_open


def test_pong_on_a_probe_socket_being_closed_is_dropped_and_counted():
    a, b, _ = pair(birthday_sockets=4, birthday_spray=10)
    a.ms.set_local_endpoints(a.endpoints, True, 0.0)
    a.ms.probe_sockets_opened(b.node_key, [1, 2, 3, 4], 1.0)
    a.ms.datagrams_to_send()
    tx3 = _birthday_hit(a, b, 3, 1.0)
    tx2 = _birthday_hit(a, b, 2, 1.25)
    a.ms.receive_disco(b.disco.seal(disco.Pong(tx3, a.public), a.disco.public_key), Direct(b.public, 3), 1.3)
    a.ms.receive_disco(b.disco.seal(disco.Pong(tx2, a.public), a.disco.public_key), Direct(b.public, 2), 1.31)
    assert a.ms.drops["disco_pong_closed_probe_socket"] == 1


OFFICE = "198.18.1.6"
CARRIER = "198.18.1.8"
CLASH_PORT = 5000  # office2's random port towards cgnat: office1 holds 41641 there
PROBE_BASE = {"office1": 20000, "office2": 30000, "cgnat": 40000}  # probe socket n: base + n


class SharedNatNet(Net):
    """office1 and office2 behind one port-keeping NAT (EIM, address-dependent filtering, as the
    lab's: inbound from an address goes to whoever last sent to it from that port), both bound
    to 41641; cgnat behind an address-and-port-dependent one. office1 reached cgnat first, so
    towards cgnat's 41641 office1 holds public 41641 and office2 got CLASH_PORT, while towards
    everything else office2 holds 41641 and office1 got 1369 (what each publishes)."""

    def __init__(self, office1: Node, office2: Node, cgnat: Node):
        super().__init__(office1, office2, cgnat)
        self.office1, self.office2, self.cgnat = office1, office2, cgnat
        self.adf: dict[tuple[int, str], tuple[Node, int]] = {}  # (port, remote host) -> inside
        self.carrier_out: set[tuple[int, tuple[str, int]]] = set()
        self.probe_open: dict[str, set[int]] = {"office1": set(), "office2": set(), "cgnat": set()}

    def office_port(self, node: Node, dest: tuple[str, int], sock: int) -> int:
        if sock:
            return PROBE_BASE[node.name] + sock
        if node is self.office1:
            return 41641 if dest == self.cgnat.public else 1369
        return CLASH_PORT if dest == self.cgnat.public else 41641

    def pump(self, now: float, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for node in self.nodes:
                while (ev := node.ms.next_event()) is not None:
                    node.events.append(ev)
                    if isinstance(ev, OpenProbeSockets):
                        ids = list(range(1, ev.count + 1))
                        self.probe_open[node.name] = set(ids)
                        node.ms.probe_sockets_opened(ev.node_key, ids, now)
                    elif isinstance(ev, CloseProbeSockets):
                        self.probe_open[node.name] &= set(ev.keep)
                for data, dest in node.ms.datagrams_to_send():
                    moved = True
                    self._deliver(node, data, dest, now)
            if not moved:
                return

    def _deliver(self, src: Node, data: bytes, dest, now: float) -> None:
        if isinstance(dest, Relay):
            super()._deliver(src, data, dest, now)
            return
        addr, sock = dest.address, dest.socket
        if sock and sock not in self.probe_open[src.name]:
            return
        if src is self.cgnat:
            port = 41641 if sock == 0 else PROBE_BASE["cgnat"] + sock
            self.carrier_out.add((port, addr))
            seen = (CARRIER, port)
        else:
            other = self.office2 if src is self.office1 else self.office1
            if addr == other.lan:
                other.ms.receive_disco(data, Direct(src.lan), now)
                return
            port = self.office_port(src, addr, sock)
            self.adf[(port, addr[0])] = (src, sock)
            seen = (OFFICE, port)
        if addr[0] == OFFICE and (addr[1], seen[0]) in self.adf:
            host, host_sock = self.adf[(addr[1], seen[0])]
            if host_sock == 0 or host_sock in self.probe_open[host.name]:
                host.ms.receive_disco(data, Direct(seen, host_sock), now)
        elif addr[0] == CARRIER and (addr[1], seen) in self.carrier_out:
            cg_sock = 0 if addr[1] == 41641 else addr[1] - PROBE_BASE["cgnat"]
            if cg_sock == 0 or cg_sock in self.probe_open["cgnat"]:
                self.cgnat.ms.receive_disco(data, Direct(seen, cg_sock), now)


def shared_nat() -> SharedNatNet:
    kw = {"birthday_sockets": 192, "birthday_spray": 1400}
    office1 = Node("office1", (OFFICE, 1369), ("192.168.1.2", 41641), **kw)
    office2 = Node("office2", (OFFICE, 41641), ("192.168.1.3", 41641), **kw)
    cgnat = Node("cgnat", (CARRIER, 41641), **kw)
    for node in (office1, office2, cgnat):
        node.ms.set_peers([n.info() for n in (office1, office2, cgnat) if n is not node], 0.0)
    return SharedNatNet(office1, office2, cgnat)


def test_peer_whose_port_another_host_behind_its_nat_holds_still_goes_direct():
    # Regression (issue 4 follow-up, 1 in 5 `make demo` runs): office2 publishes 41641, but
    # towards cgnat office1 holds that port, so cgnat's pings to it reach office1, and office2's
    # pings come from a port cgnat's NAT never opened: the pair stayed on the relay for good.
    net = shared_nat()
    net.run(0.0, 30.0, step=0.1)
    office2, cgnat = net.office2, net.cgnat
    assert isinstance(cgnat.ms.route(office2.node_key, 30.0), Direct)
    assert isinstance(office2.ms.route(cgnat.node_key, 30.0), Direct)


def test_peer_alone_behind_its_nat_gets_no_birthday_round():
    a, b, net = pair()
    c = Node("c", ("198.18.3.2", 41641))
    for node in (a, b):
        node.ms.set_peers([n.info() for n in (a, b, c) if n is not node], 0.0)
    net.blocked |= {("a", "b"), ("b", "a")}
    net.run(0.0, 20.0, step=0.1)
    assert not any(isinstance(e, OpenProbeSockets) for e in a.events + b.events)


def test_netcheck_confirming_our_endpoints_does_not_rearm_the_mapping_report():
    # office1 is seen at 41641 by cgnat only (a port clash, not a rebinding): one report, not
    # one per heartbeat, each of which made the agent re-run netcheck.
    net = shared_nat()
    t = net.run(0.0, 10.0, step=0.1)
    office1 = net.office1
    assert sum(isinstance(e, MappingChanged) for e in office1.events) == 1
    office1.ms.set_local_endpoints(office1.endpoints, False, t)
    net.run(t, t + 10.0, step=0.1)
    assert sum(isinstance(e, MappingChanged) for e in office1.events) == 1


PUB = "198.18.1.4"
SYM = "198.18.1.7"
NEW_FLOW_PORT = 6000  # the office NAT's port for office2's new flows (its newest mapping's)


class EdmPeerNet(Net):
    """office2 publishes (OFFICE, 41641), what the STUN servers saw, but its NAT gives every new
    flow from its primary socket NEW_FLOW_PORT (another host behind the NAT took 41641 towards
    some destination first; Linux masquerade then reuses the host's newest mapping). pub is a
    public host. sym is behind a symmetric NAT: a random port per (socket, destination), and
    inbound only from the destination a port was opened towards. The office NAT filters by
    address (`adf`, as the lab's) or by address and port (`apdf`)."""

    def __init__(self, pub: Node, office2: Node, sym: Node, filtering: str):
        super().__init__(pub, office2, sym)
        self.pub, self.office2, self.sym = pub, office2, sym
        self.filtering = filtering
        self.office_out: set[tuple[int, tuple[str, int]]] = set()  # (office port, remote)
        self.sym_ports: dict[tuple[int, tuple[str, int]], int] = {}  # (socket, dest) -> port
        self.sym_owner: dict[int, tuple[int, tuple[str, int]]] = {}
        self.probe_open: dict[str, set[int]] = {"office2": set(), "sym": set()}
        self._ports = random.Random(7)

    def pump(self, now: float, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            for node in self.nodes:
                while (ev := node.ms.next_event()) is not None:
                    node.events.append(ev)
                    if isinstance(ev, OpenProbeSockets):
                        ids = list(range(1, ev.count + 1))
                        self.probe_open[node.name] = set(ids)
                        node.ms.probe_sockets_opened(ev.node_key, ids, now)
                    elif isinstance(ev, CloseProbeSockets):
                        self.probe_open[node.name] &= set(ev.keep)
                for data, dest in node.ms.datagrams_to_send():
                    moved = True
                    self._deliver(node, data, dest, now)
            if not moved:
                return

    def _seen_from(self, src: Node, sock: int, addr: tuple[str, int]) -> tuple[str, int] | None:
        if sock and sock not in self.probe_open.get(src.name, set()):
            return None
        if src is self.pub:
            return self.pub.public
        if src is self.office2:
            port = NEW_FLOW_PORT if sock == 0 else 30000 + sock
            self.office_out.add((port, addr))
            return (OFFICE, port)
        key = (sock, addr)
        if key not in self.sym_ports:
            port = self._ports.randrange(1024, 65536)
            while port in self.sym_owner:
                port = self._ports.randrange(1024, 65536)
            self.sym_ports[key], self.sym_owner[port] = port, key
        return (SYM, self.sym_ports[key])

    def _deliver(self, src: Node, data: bytes, dest, now: float) -> None:
        if isinstance(dest, Relay):
            super()._deliver(src, data, dest, now)
            return
        addr = dest.address
        seen = self._seen_from(src, dest.socket, addr)
        if seen is None:
            return
        if addr == self.pub.public:
            self.pub.ms.receive_disco(data, Direct(seen), now)
        elif addr[0] == OFFICE:
            opened = {(p, r) for p, r in self.office_out if p == addr[1]}
            if self.filtering == "adf":
                ok = any(r[0] == seen[0] for _, r in opened)
            else:
                ok = (addr[1], seen) in opened
            if ok:
                sock = 0 if addr[1] == NEW_FLOW_PORT else addr[1] - 30000
                if sock == 0 or sock in self.probe_open["office2"]:
                    self.office2.ms.receive_disco(data, Direct(seen, sock), now)
        elif addr[0] == SYM and addr[1] in self.sym_owner:
            sock, allowed = self.sym_owner[addr[1]]
            if allowed == seen and (sock == 0 or sock in self.probe_open["sym"]):
                self.sym.ms.receive_disco(data, Direct(seen, sock), now)


def edm_peer(filtering: str) -> EdmPeerNet:
    kw = {"birthday_sockets": 192, "birthday_spray": 1400}
    pub = Node("pub", (PUB, 41641), **kw)
    office2 = Node("office2", (OFFICE, 41641), ("192.168.1.3", 41641), **kw)
    sym = Node("sym", (SYM, 30001), **kw)
    sym.ms.set_local_endpoints(sym.endpoints, True, 0.0)
    for node in (pub, office2, sym):
        node.ms.set_peers([n.info() for n in (pub, office2, sym) if n is not node], 0.0)
    return EdmPeerNet(pub, office2, sym, filtering)


@pytest.mark.parametrize("filtering", ["adf", "apdf"])
def test_peer_whose_new_flows_leave_from_another_port_than_it_publishes_goes_direct_with_a_symmetric_nat_peer(
    filtering,
):
    # Regression (issue 4 follow-up, `make demo`: office1 <-> sym relayed in 1 of ~5 runs):
    # sym's pings and birthday probes all went to the published port, where nobody answers,
    # and office2's own pings left from a port sym's NAT never opened towards.
    net = edm_peer(filtering)
    net.run(0.0, 30.0, step=0.1)
    office2, sym = net.office2, net.sym
    assert isinstance(sym.ms.route(office2.node_key, 30.0), Direct)
    assert isinstance(office2.ms.route(sym.node_key, 30.0), Direct)


def _pong_from(a: Node, b: Node, observed: tuple[str, int], now: float, lan: bool = False) -> None:
    """a pings b's public (or LAN) address; b's Pong says it saw a at `observed`."""
    a.ms.ping(b.node_key, now)
    target = Direct(b.lan if lan else b.public)
    data = next(d for d, dest in a.ms.datagrams_to_send() if dest == target)
    _, ping = b.disco.open(data)
    a.ms.receive_disco(b.disco.seal(disco.Pong(ping.tx_id, observed), a.disco.public_key), target, now)


def _call_me_maybe_endpoints(a: Node, b: Node, now: float) -> tuple[Endpoint, ...]:
    a.ms.handle_timer(now)
    for data, dest in a.ms.datagrams_to_send():
        if isinstance(dest, Relay) and dest.node_key == b.node_key:
            message = b.disco.open(data)[1]
            if isinstance(message, disco.CallMeMaybe):
                return message.endpoints
    raise AssertionError("no CallMeMaybe to b")


def test_public_port_a_pong_showed_us_at_is_advertised_beside_the_published_one():
    a, b, _ = pair()
    c = Node("c", ("198.18.3.2", 41641))
    a.ms.set_peers([b.info(), c.info()], 0.0)
    seen = (a.public[0], NEW_FLOW_PORT)
    _pong_from(a, b, seen, 0.0)
    a.ms.route(c.node_key, 0.5)  # c is active and relayed: it hears where a is seen at once
    assert Endpoint(seen, EndpointKind.STUN) in _call_me_maybe_endpoints(a, c, 0.5)
    assert Endpoint(a.public, EndpointKind.STUN) in _call_me_maybe_endpoints(a, c, 2.0)


def test_pong_over_a_lan_path_teaches_no_public_address():
    a = Node("a", (OFFICE, 41641), ("192.168.1.2", 41641))
    b = Node("b", (OFFICE, 1369), ("192.168.1.3", 41641))
    a.ms.set_peers([b.info()], 0.0)
    _pong_from(a, b, ("192.168.1.2", 41641), 0.0, lan=True)
    assert not a.ms.observed


def test_symmetric_nat_side_advertises_no_observed_ports():
    a, b, _ = pair()
    a.ms.set_local_endpoints(a.endpoints, True, 0.0)
    _pong_from(a, b, (a.public[0], NEW_FLOW_PORT), 0.0)
    assert not a.ms.observed


def test_observed_public_ports_are_bounded():
    a, b, _ = pair()
    for i in range(mscore.MAX_OBSERVED + 5):
        _pong_from(a, b, (a.public[0], 2000 + i), 2.0 * i)
    assert len(a.ms.observed) == mscore.MAX_OBSERVED


def test_observed_port_we_now_publish_is_not_advertised_twice():
    a, b, _ = pair()
    seen = (a.public[0], NEW_FLOW_PORT)
    _pong_from(a, b, seen, 0.0)
    a.ms.set_local_endpoints((Endpoint(seen, EndpointKind.STUN),), False, 1.0)
    assert a.ms.advertised_endpoints(1.0) == (Endpoint(seen, EndpointKind.STUN),)


def test_observed_port_no_pong_showed_again_is_no_longer_advertised():
    a, b, _ = pair()
    seen = (a.public[0], NEW_FLOW_PORT)
    _pong_from(a, b, seen, 0.0)
    later = mscore.OBSERVED_TTL + 1.0
    assert Endpoint(seen, EndpointKind.STUN) not in a.ms.advertised_endpoints(later)
