"""Bad input gets a clear error or a counted drop, never a crash: random bytes into the packet
filter, random JSON into the filter-rule decoder, random text into the policy parser."""

from __future__ import annotations

import contextlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from wiremesh.core.packetfilter import DROP_REASONS, Filter
from wiremesh.core.policy import FilterRule, check_policy
from wiremesh.core.policy.hujson import HujsonError, parse

RULE = FilterRule(("0.0.0.0/0", "::/0"), ("100.64.0.2/32",), (6, 17), ((22, 22),))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=120), version=st.sampled_from([0x45, 0x46, 0x60, 0x00, 0xFF]))
def test_random_packets_are_judged_or_counted_never_raised(data: bytes, version: int) -> None:
    f = Filter([RULE])
    packet = bytes([version]) + data
    verdict = f.check_inbound(packet, 1.0)
    assert f.note_outbound(packet, 1.0) is True
    assert verdict or sum(f.drops[r] for r in DROP_REASONS) == 1


@settings(max_examples=300, deadline=None)
@given(raw=json_values)
def test_random_filter_rule_json_decodes_or_raises_value_error(raw: object) -> None:
    try:
        rule = FilterRule.from_dict(raw)
    except ValueError:
        return
    Filter([rule])  # whatever decodes also builds


@settings(max_examples=300, deadline=None)
@given(
    raw=st.fixed_dictionaries(
        {"src": json_values, "dst": json_values, "proto": json_values, "ports": json_values}
    )
)
def test_rule_shaped_garbage_decodes_or_raises_value_error(raw: dict[str, object]) -> None:
    with contextlib.suppress(ValueError):
        FilterRule.from_dict(raw)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet='{}[]",:/*\n tag@acls0123456789.-', max_size=200))
def test_random_policy_text_is_accepted_or_reported(text: str) -> None:
    try:
        parse(text)
    except HujsonError as exc:
        assert exc.pos.line >= 1 and exc.pos.col >= 1
    policy, diagnostics = check_policy(text)
    assert policy is not None or any(d.severity == "error" for d in diagnostics)


@settings(max_examples=200, deadline=None)
@given(value=json_values)
def test_random_structures_in_policy_sections_are_reported(value: object) -> None:
    for section in ("groups", "hosts", "tagOwners", "ipsets", "acls", "grants", "tests"):
        policy, diagnostics = check_policy(json.dumps({section: value}))
        assert policy is not None or any(d.severity == "error" for d in diagnostics)
