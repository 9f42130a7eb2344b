"""HuJSON: JSON with `//` and `/* */` comments and trailing commas (the policy file format).

`parse(text)` returns a `Document`: the plain Python value (dicts, lists, str, int, float,
bool, None) and the line/column where every value and every object key starts, keyed by
its path from the root (`("acls", 0, "dst", 1)`). The policy validator uses those
positions so that each error points at the place in the original text.

Duplicate object keys are an error: in an access policy a silently shadowed key is a
silently dropped rule.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
import re
from typing import Any

MAX_TEXT = 4 * 1024 * 1024  # a policy file is text written by people; bound what we accept
MAX_DEPTH = 64

Path = tuple[str | int, ...]
KEY = "\x00key"  # path suffix marking the position of an object key rather than its value


@dataclasses.dataclass(frozen=True, slots=True)
class Pos:
    line: int  # 1-based
    col: int  # 1-based, in characters

    def __str__(self) -> str:
        return f"{self.line}:{self.col}"


class HujsonError(ValueError):
    """Syntax error at a position of the original text."""

    def __init__(self, message: str, pos: Pos) -> None:
        super().__init__(f"{pos}: {message}")
        self.message = message
        self.pos = pos


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    value: Any
    positions: dict[Path, Pos]

    def pos(self, path: Path) -> Pos | None:
        return self.positions.get(path)

    def key_pos(self, path: Path) -> Pos | None:
        return self.positions.get((*path, KEY))


MAX_NUMBER_CHARS = 64
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_STRING_BODY = re.compile(r'(?:[^"\\\x00-\x1f]|\\.)*', re.DOTALL)
_LITERALS = {"true": True, "false": False, "null": None}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.positions: dict[Path, Pos] = {}
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def pos_at(self, index: int) -> Pos:
        line = bisect.bisect_right(self._line_starts, index) - 1
        return Pos(line + 1, index - self._line_starts[line] + 1)

    def error(self, message: str, index: int | None = None) -> HujsonError:
        return HujsonError(message, self.pos_at(self.i if index is None else index))

    def skip_space(self) -> None:
        text = self.text
        n = len(text)
        while self.i < n:
            c = text[self.i]
            if c in " \t\r\n\ufeff":
                self.i += 1
            elif text.startswith("//", self.i):
                end = text.find("\n", self.i)
                self.i = n if end < 0 else end + 1
            elif text.startswith("/*", self.i):
                end = text.find("*/", self.i + 2)
                if end < 0:
                    raise self.error("unterminated /* comment")
                self.i = end + 2
            else:
                return

    def value(self, path: Path, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.error(f"nesting deeper than {MAX_DEPTH}")
        self.skip_space()
        if self.i >= len(self.text):
            raise self.error("unexpected end of input, expected a value")
        self.positions[path] = self.pos_at(self.i)
        c = self.text[self.i]
        if c == "{":
            return self.obj(path, depth)
        if c == "[":
            return self.arr(path, depth)
        if c == '"':
            return self.string()
        m = _NUMBER.match(self.text, self.i)
        if m and m.end() > self.i:
            s = m.group()
            # No number in a policy needs more: and int() of thousands of digits costs quadratic
            # time (Python refuses past 4300), a float past 1e308 becomes inf.
            if len(s) > MAX_NUMBER_CHARS:
                raise self.error(f"number longer than {MAX_NUMBER_CHARS} characters")
            self.i = m.end()
            value = float(s) if any(ch in s for ch in ".eE") else int(s)
            if isinstance(value, float) and not math.isfinite(value):
                raise self.error("number out of range")
            return value
        for word, val in _LITERALS.items():
            if self.text.startswith(word, self.i):
                self.i += len(word)
                return val
        raise self.error(f"unexpected character {c!r}, expected a value")

    def string(self) -> str:
        start = self.i
        m = _STRING_BODY.match(self.text, start + 1)
        end = m.end() if m else start + 1
        if end >= len(self.text) or self.text[end] != '"':
            if end < len(self.text) and self.text[end] != '"':
                raise self.error("invalid character in string (control characters must be escaped)", end)
            raise self.error("unterminated string", start)
        self.i = end + 1
        try:
            result: str = json.loads(self.text[start : end + 1])
        except json.JSONDecodeError as exc:
            raise self.error(f"invalid string escape: {exc.msg}", start + exc.pos) from None
        return result

    def obj(self, path: Path, depth: int) -> dict[str, Any]:
        self.i += 1
        out: dict[str, Any] = {}
        while True:
            self.skip_space()
            if self.i >= len(self.text):
                raise self.error("unexpected end of input inside object")
            if self.text[self.i] == "}":
                self.i += 1
                return out
            if self.text[self.i] != '"':
                raise self.error("expected a string key or '}'")
            key_index = self.i
            key = self.string()
            if key in out:
                raise self.error(f"duplicate key {key!r}", key_index)
            self.positions[(*path, key, KEY)] = self.pos_at(key_index)
            self.skip_space()
            if self.i >= len(self.text) or self.text[self.i] != ":":
                raise self.error("expected ':' after object key")
            self.i += 1
            out[key] = self.value((*path, key), depth + 1)
            self.skip_space()
            if self.i < len(self.text) and self.text[self.i] == ",":
                self.i += 1
            elif self.i < len(self.text) and self.text[self.i] == "}":
                continue
            else:
                raise self.error("expected ',' or '}' after object value")

    def arr(self, path: Path, depth: int) -> list[Any]:
        self.i += 1
        out: list[Any] = []
        while True:
            self.skip_space()
            if self.i >= len(self.text):
                raise self.error("unexpected end of input inside array")
            if self.text[self.i] == "]":
                self.i += 1
                return out
            out.append(self.value((*path, len(out)), depth + 1))
            self.skip_space()
            if self.i < len(self.text) and self.text[self.i] == ",":
                self.i += 1
            elif self.i < len(self.text) and self.text[self.i] == "]":
                continue
            else:
                raise self.error("expected ',' or ']' after array element")


def parse(text: str | bytes) -> Document:
    """Parse HuJSON text; raises HujsonError (with line and column) on malformed input."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HujsonError(f"not UTF-8 text (byte {exc.start})", Pos(1, 1)) from None
    if len(text) > MAX_TEXT:
        raise HujsonError(f"policy text larger than {MAX_TEXT} characters", Pos(1, 1))
    p = _Parser(text)
    value = p.value((), 0)
    p.skip_space()
    if p.i != len(text):
        raise p.error("unexpected text after the top-level value")
    return Document(value, p.positions)
