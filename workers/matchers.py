"""Alertmanager-style label matchers: `name="v"`, `name!="v"`, `name=~"re"`, `name!~"re"`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Op = Literal["=", "!=", "=~", "!~"]

_MATCHER = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Matcher:
    """One condition on one label; a missing label matches as the empty string."""

    name: str
    op: Op
    value: str
    pattern: re.Pattern[str] | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.pattern is not None
        found = self.pattern.fullmatch(actual) is not None
        return found if self.op == "=~" else not found


def parse_matcher(text: str) -> Matcher:
    """Parse one matcher; raise ValueError naming the bad text."""
    found = _MATCHER.match(text)
    if found is None:
        raise ValueError(f'not a label matcher: {text!r} (expected name="value")')
    name, op, raw = found.group(1), found.group(2), found.group(3)
    value = _unquote(raw, text)
    if op in ("=", "!="):
        return Matcher(name, op, value)  # type: ignore[arg-type]
    try:
        pattern = re.compile(value)
    except re.error as exc:
        raise ValueError(f"bad regular expression in {text!r}: {exc}") from exc
    return Matcher(name, op, value, pattern)  # type: ignore[arg-type]


def _unquote(raw: str, text: str) -> str:
    if not (len(raw) >= 2 and raw[0] == raw[-1] == '"'):
        if '"' in raw:
            raise ValueError(f"unbalanced quotes in {text!r}")
        return raw
    # Alertmanager's unescaping: \" and \\ and \n are read, any other escape is kept as
    # written, so a regex such as "web\.example" reaches the regex engine intact.
    value = []
    inner = iter(raw[1:-1])
    for char in inner:
        if char == '"':
            raise ValueError(f"bad quoted value in {text!r}: unescaped quote")
        if char != "\\":
            value.append(char)
            continue
        escaped = next(inner, None)
        if escaped is None:
            raise ValueError(f"bad quoted value in {text!r}: dangling backslash")
        value.append(_ESCAPES.get(escaped, "\\" + escaped))
    return "".join(value)


_ESCAPES = {'"': '"', "\\": "\\", "n": "\n"}


def matches_all(matchers: list[Matcher], labels: dict[str, str]) -> bool:
    """True when every matcher accepts the labels."""
    return all(matcher.matches(labels) for matcher in matchers)
