"""Cryptokey routing: longest-prefix match for IPv4 and IPv6."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wiremesh.core.allowedips import AllowedIPs


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def test_longest_prefix_wins_ipv4() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/8", "wide")
    t.insert("10.1.0.0/16", "narrow")
    t.insert("10.1.2.3/32", "host")
    assert t.lookup(ip("10.1.2.3")) == "host"
    assert t.lookup(ip("10.1.2.4")) == "narrow"
    assert t.lookup(ip("10.2.0.1")) == "wide"
    assert t.lookup(ip("11.0.0.1")) is None


def test_longest_prefix_wins_ipv6() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("fd00::/8", "wide")
    t.insert("fd7a:115c:a1e0::/48", "mesh")
    t.insert("fd7a:115c:a1e0::1/128", "host")
    assert t.lookup(ip("fd7a:115c:a1e0::1")) == "host"
    assert t.lookup(ip("fd7a:115c:a1e0::2")) == "mesh"
    assert t.lookup(ip("fd01::1")) == "wide"
    assert t.lookup(ip("2001:db8::1")) is None


def test_default_routes_are_per_family() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "v4")
    assert t.lookup(ip("1.2.3.4")) == "v4"
    assert t.lookup(ip("::1")) is None
    t.insert("::/0", "v6")
    assert t.lookup(ip("::1")) == "v6"


def test_inserting_an_owned_prefix_moves_it() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/24", "a")
    t.insert("10.0.0.0/24", "b")
    assert t.lookup(ip("10.0.0.9")) == "b"
    assert t.prefixes("a") == []
    assert t.prefixes("b") == ["10.0.0.0/24"]


def test_host_bits_are_masked() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.77/24", "a")
    assert t.prefixes("a") == ["10.0.0.0/24"]


def test_remove_value_forgets_all_its_prefixes_only() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/24", "a")
    t.insert("fd00::/64", "a")
    t.insert("10.0.1.0/24", "b")
    t.remove_value("a")
    assert t.lookup(ip("10.0.0.1")) is None
    assert t.lookup(ip("fd00::1")) is None
    assert t.lookup(ip("10.0.1.1")) == "b"


def test_bad_prefix_text_is_a_value_error() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    with pytest.raises(ValueError):
        t.insert("10.0.0.0/33", "a")
    with pytest.raises(ValueError):
        t.insert("not an address", "a")


def test_lookup_of_odd_sized_address_is_none() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "a")
    assert t.lookup(b"\x01\x02\x03") is None


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 5)), max_size=20),
    st.integers(0, 2**32 - 1),
)
def test_matches_brute_force_longest_prefix(routes: list[tuple[int, int, int]], probe: int) -> None:
    t: AllowedIPs[int] = AllowedIPs()
    owners: dict[ipaddress.IPv4Network, int] = {}
    for addr, length, owner in routes:
        net = ipaddress.IPv4Network((addr, length), strict=False)
        t.insert(str(net), owner)
        owners[net] = owner
    address = ipaddress.IPv4Address(probe)
    matching = [net for net in owners if address in net]
    expected = owners[max(matching, key=lambda n: n.prefixlen)] if matching else None
    assert t.lookup(address.packed) == expected


@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("insert"), st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 3)),
            st.tuples(st.just("remove"), st.just(0), st.just(0), st.integers(0, 3)),
        ),
        max_size=30,
    ),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=5),
)
def test_inserts_and_removals_match_a_model(ops: list[tuple[str, int, int, int]], probes: list[int]) -> None:
    t: AllowedIPs[int] = AllowedIPs()
    model: dict[ipaddress.IPv4Network, int] = {}
    for op, addr, length, owner in ops:
        if op == "insert":
            net = ipaddress.IPv4Network((addr, length), strict=False)
            t.insert(str(net), owner)
            model[net] = owner
        else:
            t.remove_value(owner)
            model = {n: o for n, o in model.items() if o != owner}
    for owner in range(4):
        assert sorted(t.prefixes(owner)) == sorted(str(n) for n, o in model.items() if o == owner)
    for probe in probes:
        address = ipaddress.IPv4Address(probe)
        matching = [n for n in model if address in n]
        expected = model[max(matching, key=lambda n: n.prefixlen)] if matching else None
        assert t.lookup(address.packed) == expected
