"""HuJSON: comments, trailing commas, and errors that name the line and column."""

from __future__ import annotations

import pytest

from wiremesh.core.policy.hujson import MAX_DEPTH, HujsonError, Pos, parse


def test_comments_and_trailing_commas_are_accepted() -> None:
    doc = parse('// lead\n{ /* a */ "a": [1, 2,], // tail\n "b": {"c": true,}, }\n')
    assert doc.value == {"a": [1, 2], "b": {"c": True}}


def test_plain_json_parses_identically() -> None:
    text = '{"x": [1, -2.5e3, "s\\u00e9", null, false], "y": {}}'
    import json

    assert parse(text).value == json.loads(text)


def test_value_positions_are_recorded_by_path() -> None:
    doc = parse('{\n  "acls": [\n    {"src": ["a", "b"]},\n  ],\n}')
    assert doc.pos(("acls", 0, "src", 1)) == Pos(3, 19)
    assert doc.key_pos(("acls",)) == Pos(2, 3)


def test_comment_slashes_inside_strings_are_text() -> None:
    assert parse('{"url": "http://x/*y*/"}').value == {"url": "http://x/*y*/"}


@pytest.mark.parametrize(
    ("text", "line", "col", "fragment"),
    [
        ('{\n  "a": 1\n  "b": 2\n}', 3, 3, "expected ',' or '}'"),
        ('{\n  "a": [1, 2\n}', 3, 1, "expected ',' or ']'"),
        ('{\n  "a": 1,\n  /* never closed\n}', 3, 3, "unterminated /* comment"),
        ('{"a": "unterminated}', 1, 7, "unterminated string"),
        ('{\n "a": 1,\n "a": 2}', 3, 2, "duplicate key 'a'"),
        ("{\n  a: 1}", 2, 3, "expected a string key"),
        ('{"a": tru}', 1, 7, "unexpected character"),
        ('{"a": 1} x', 1, 10, "unexpected text after"),
        ('{"a": "\\q"}', 1, 8, "invalid string escape"),
    ],
)
def test_syntax_errors_name_line_and_column(text: str, line: int, col: int, fragment: str) -> None:
    with pytest.raises(HujsonError) as info:
        parse(text)
    assert (info.value.pos.line, info.value.pos.col) == (line, col)
    assert fragment in info.value.message


def test_nesting_depth_is_bounded() -> None:
    with pytest.raises(HujsonError, match="nesting deeper"):
        parse("[" * (MAX_DEPTH + 2) + "]" * (MAX_DEPTH + 2))


def test_invalid_utf8_is_an_error_not_a_crash() -> None:
    with pytest.raises(HujsonError, match="UTF-8"):
        parse(b'{"a": "\xff"}')
