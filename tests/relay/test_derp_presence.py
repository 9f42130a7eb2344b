"""The relay replicas' presence table with leases, in memory: messages moved by hand, time explicit."""

from __future__ import annotations

import dataclasses
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wiremesh.core import bus
from wiremesh.derp import presence
from wiremesh.derp.presence import (
    KeyGone,
    LocalReplaced,
    PresenceDelta,
    PresenceFull,
    PresenceTable,
    ReplicaExpired,
    SyncNeeded,
)

LEASE = 6.0


def key() -> bytes:
    return os.urandom(32)


def table(name: str, **kw: object) -> PresenceTable:
    return PresenceTable("eu", name, lease=LEASE, **kw)  # type: ignore[arg-type]


def deliver(message: presence.Message, now: float, *tables: PresenceTable) -> list[presence.Event]:
    """Send one message through JSON, as the bus does, to each table; all their events."""
    cls = type(message)
    events: list[presence.Event] = []
    for t in tables:
        events += t.receive(bus.decode(cls, bus.encode(message)), now)
    return events


def gone(events: list[presence.Event]) -> list[tuple[bytes, str]]:
    return [(e.key, e.reason) for e in events if isinstance(e, KeyGone)]


def test_a_key_announced_by_another_replica_is_forwarded_there() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    assert deliver(r2.connect(b, 100.0), 0.0, r1) == []
    assert r1.lookup(b) == "r2"
    assert r1.alive() == ["r2"]


def test_a_silent_replica_keeps_its_keys_until_the_lease_runs_out() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    assert r1.expire(LEASE - 0.01) == []
    assert r1.lookup(b) == "r2"


def test_a_silent_replica_loses_every_key_it_held_when_its_lease_expires() -> None:
    r1, r2 = table("r1"), table("r2")
    b, c = key(), key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    deliver(r2.connect(c, 100.0), 0.0, r1)
    events = r1.expire(LEASE)
    assert ReplicaExpired("r2", 2) in events
    assert sorted(gone(events)) == sorted([(b, "lease_expired"), (c, "lease_expired")])
    assert r1.lookup(b) is None and r1.alive() == []
    assert r1.replicas_expired == 1 and r1.keys_expired == 2


def test_beats_renew_the_lease() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    for now in (2.0, 4.0, 6.0, 8.0):
        deliver(r2.beat(), now, r1)
        assert r1.expire(now + 1.0) == []
    assert r1.lookup(b) == "r2"
    assert r1.next_deadline() == 8.0 + LEASE


def test_keys_lost_to_an_expired_lease_are_remembered_until_they_come_back() -> None:
    r1, r2, r3 = table("r1"), table("r2"), table("r3")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    r1.expire(LEASE)
    assert b in r1.lapsed
    deliver(r3.connect(b, 200.0), LEASE + 1, r1)
    assert b not in r1.lapsed and r1.lookup(b) == "r3"


def test_a_clean_departure_reports_the_key_gone() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    assert gone(deliver(r2.disconnect(b, 101.0), 1.0, r1)) == [(b, "left")]
    assert r1.lookup(b) is None


def test_a_client_that_moved_to_another_replica_survives_the_old_replicas_lease_expiry() -> None:
    r1, r2, r3 = table("r1"), table("r2"), table("r3")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1, r3)
    # r2 dies silently; b reconnects to r3 before the lease runs out.
    deliver(r3.connect(b, 103.0), 3.0, r1)
    deliver(r3.beat(), 5.0, r1)
    events = r1.expire(LEASE)
    assert ReplicaExpired("r2", 1) in events
    assert gone(events) == []
    assert r1.lookup(b) == "r3"


def test_a_client_that_moved_here_survives_the_old_replicas_lease_expiry() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    r1.connect(b, 103.0)
    assert r1.lookup(b) is None  # delivered locally from now on
    assert gone(r1.expire(LEASE)) == []
    assert b not in r1.lapsed


def test_the_older_connection_is_told_a_newer_one_exists_elsewhere() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    old = r2.connect(b, 100.0)
    new = r1.connect(b, 105.0)
    assert deliver(new, 5.0, r2) == [LocalReplaced(b, "r1")]
    assert deliver(old, 5.0, r1) == []  # the newer side keeps its client
    assert r2.lookup(b) == "r1"


def test_simultaneous_connections_are_settled_by_replica_id() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    from_r1, from_r2 = r1.connect(b, 100.0), r2.connect(b, 100.0)
    assert deliver(from_r2, 0.0, r1) == [LocalReplaced(b, "r2")]
    assert deliver(from_r1, 0.0, r2) == []


def test_the_replaced_sides_departure_does_not_remove_the_newer_connection() -> None:
    r1, r2, r3 = table("r1"), table("r2"), table("r3")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r3)
    deliver(r1.connect(b, 105.0), 1.0, r3)
    assert deliver(r2.disconnect(b, 106.0), 2.0, r3) == []
    assert r3.lookup(b) == "r1"


def test_a_key_held_by_two_replicas_moves_to_the_other_when_one_lets_go() -> None:
    r1, r2, r3 = table("r1"), table("r2"), table("r3")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    deliver(r3.connect(b, 101.0), 0.0, r1)
    assert gone(deliver(r3.disconnect(b, 102.0), 1.0, r1)) == []
    assert r1.lookup(b) == "r2"


def test_a_replica_first_heard_at_generation_zero_needs_no_full_set() -> None:
    r1, r2 = table("r1"), table("r2")
    assert deliver(r2.beat(), 0.0, r1) == []
    assert r1.alive() == ["r2"]


def test_a_replica_first_heard_mid_life_is_asked_for_its_full_set() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    r2.connect(b, 100.0)  # r1 never heard it
    assert deliver(r2.beat(), 0.0, r1) == [SyncNeeded("r2")]
    assert deliver(r2.beat(), 2.0, r1) == [SyncNeeded("r2")]  # asked again each beat until answered
    for full in r2.full_set():
        assert deliver(full, 2.5, r1) == []
    assert r1.lookup(b) == "r2"
    assert deliver(r2.beat(), 4.0, r1) == []


def test_a_lost_delta_is_noticed_at_the_next_beat_and_repaired_by_the_full_set() -> None:
    r1, r2 = table("r1"), table("r2")
    b, c = key(), key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    r2.disconnect(b, 101.0)  # lost on the way
    deliver(r2.connect(c, 102.0), 1.0, r1)
    assert deliver(r2.beat(), 2.0, r1) == [SyncNeeded("r2")]
    events: list[presence.Event] = []
    for full in r2.full_set():
        events += deliver(full, 2.5, r1)
    assert gone(events) == [(b, "resynced")]
    assert r1.lookup(b) is None and r1.lookup(c) == "r2"


def test_a_delta_out_of_sequence_asks_for_the_full_set_once() -> None:
    r1, r2 = table("r1"), table("r2")
    deliver(r2.connect(key(), 100.0), 0.0, r1)
    r2.connect(key(), 100.0)  # lost
    c = key()
    assert deliver(r2.connect(c, 101.0), 1.0, r1) == [SyncNeeded("r2")]
    assert r1.lookup(c) == "r2"  # applied anyway: still the newest word on that key
    assert deliver(r2.connect(key(), 102.0), 1.5, r1) == []


def test_a_restarted_replica_loses_what_its_previous_process_held() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    r2_again = table("r2")
    assert gone(deliver(r2_again.beat(), 3.0, r1)) == [(b, "restarted")]
    assert r1.alive() == ["r2"]


def test_a_full_set_arrives_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presence, "FULL_SET_CHUNK", 3)
    r1, r2 = table("r1"), table("r2")
    keys = [key() for _ in range(7)]
    for k in keys:
        r2.connect(k, 100.0)
    chunks = r2.full_set()
    assert [(c.part, c.last) for c in chunks] == [(0, False), (1, False), (2, True)]
    deliver(r2.beat(), 0.0, r1)
    for chunk in chunks:
        deliver(chunk, 0.5, r1)
    assert all(r1.lookup(k) == "r2" for k in keys)


def test_a_full_set_with_a_missing_chunk_is_not_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presence, "FULL_SET_CHUNK", 3)
    r1, r2 = table("r1"), table("r2")
    keys = [key() for _ in range(7)]
    for k in keys:
        r2.connect(k, 100.0)
    first, _lost, last = r2.full_set()
    deliver(r2.beat(), 0.0, r1)
    deliver(first, 0.5, r1)
    deliver(last, 0.5, r1)
    assert r1.remote == {}
    assert deliver(r2.beat(), 2.0, r1) == [SyncNeeded("r2")]


def test_a_malformed_key_is_refused_and_changes_nothing() -> None:
    r1, r2 = table("r1"), table("r2")
    delta = dataclasses.replace(r2.connect(key(), 100.0), node_key="not a key")
    with pytest.raises(ValueError, match="base64"):
        r1.receive(delta, 0.0)
    assert r1.remote == {} and r1.alive() == []


def test_a_full_set_with_a_malformed_key_is_refused_whole() -> None:
    r1 = table("r1")
    full = PresenceFull("eu", "r2", "i", 3, 0, True, (presence.encode_key(key()), "AAAA"))
    with pytest.raises(ValueError):
        r1.receive(full, 0.0)
    assert r1.remote == {} and r1.alive() == []


def test_a_peer_cannot_claim_more_than_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(presence, "MAX_KEYS_PER_REPLICA", 4)
    r1, r2 = table("r1"), table("r2")
    for _ in range(6):
        deliver(r2.connect(key(), 100.0), 0.0, r1)
    assert len(r1.remote) == 4 and r1.truncated == 2


def test_messages_from_another_region_or_itself_are_ignored() -> None:
    r1 = table("r1")
    other_region = PresenceTable("us", "r2", lease=LEASE)
    assert r1.receive(other_region.connect(key(), 1.0), 0.0) == []
    assert r1.receive(r1.connect(key(), 1.0), 0.0) == []
    assert r1.alive() == []


def test_an_oversized_replica_id_is_refused() -> None:
    r1 = table("r1")
    delta = PresenceDelta("eu", "x" * 500, "i", 1, presence.encode_key(key()), True, 1.0)
    with pytest.raises(ValueError, match="too long"):
        r1.receive(delta, 0.0)


def test_the_lease_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PresenceTable("eu", "r1", lease=0)


# --- a property: whatever is lost, beats plus full sets bring every view back to the truth ---

_ops = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 5), st.booleans(), st.booleans()), min_size=1, max_size=40
)


@settings(max_examples=60, deadline=None)
@given(_ops)
def test_every_replica_converges_on_who_holds_which_key_despite_lost_messages(
    ops: list[tuple[int, int, bool, bool]],
) -> None:
    names = ["r0", "r1", "r2"]
    tables = [table(n) for n in names]
    keys = [bytes([i]) * 32 for i in range(6)]
    holder: dict[bytes, int] = {}  # the truth: each key on at most one replica
    now, at = 0.0, 1000.0
    for where, k, connect, lost in ops:
        now += 0.1
        at += 1.0
        key_ = keys[k]
        t = tables[where]
        if connect:
            if key_ in holder and holder[key_] != where:
                tables[holder[key_]].disconnect(key_, at)  # it moved: the old side drops it (lost)
            holder[key_] = where
            message: presence.Message = t.connect(key_, at)
        else:
            if holder.get(key_) != where:
                continue
            del holder[key_]
            message = t.disconnect(key_, at)
        if not lost:
            deliver(message, now, *(o for o in tables if o is not t))
    # One round of beats; whoever is out of step asks, and every replica answers with its full set.
    for _round in range(2):
        now += 1.0
        wanted = False
        for t in tables:
            events = deliver(t.beat(), now, *(o for o in tables if o is not t))
            wanted = wanted or any(isinstance(e, SyncNeeded) for e in events)
        if wanted:
            for t in tables:
                for full in t.full_set():
                    deliver(full, now, *(o for o in tables if o is not t))
    for i, t in enumerate(tables):
        expected = {k: names[w] for k, w in holder.items() if w != i}
        assert t.remote == expected


def test_a_replica_expired_while_alive_is_restored_from_its_full_set_at_its_next_beat() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    r1.expire(LEASE)  # cut off, not dead
    assert deliver(r2.beat(), LEASE + 1, r1) == [SyncNeeded("r2")]
    for full in r2.full_set():
        deliver(full, LEASE + 1.5, r1)
    assert r1.lookup(b) == "r2" and b not in r1.lapsed


def test_a_clean_goodbye_forgets_the_replica_at_once_without_counting_an_expiry() -> None:
    r1, r2 = table("r1"), table("r2")
    b = key()
    deliver(r2.connect(b, 100.0), 0.0, r1)
    assert gone(deliver(r2.goodbye(), 1.0, r1)) == [(b, "left")]
    assert r1.alive() == [] and r1.expire(100.0) == [] and r1.replicas_expired == 0


def test_an_older_processs_goodbye_does_not_forget_the_current_one() -> None:
    r1, r2_old = table("r1"), table("r2")
    r2_new = table("r2")
    b = key()
    deliver(r2_new.connect(b, 100.0), 0.0, r1)
    assert deliver(r2_old.goodbye(), 1.0, r1) == []
    assert r1.alive() == ["r2"] and r1.lookup(b) == "r2"
