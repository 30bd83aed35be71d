"""The one exception family a user of sbsearch ever needs to catch, and the rules a user's spec values
must meet (``spec_field``), declared next to the fields of the spec's sections."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import field
from typing import Any

__all__ = ["SbsearchError", "SpecError", "TrialDiverged", "Problem", "did_you_mean", "excerpt", "spec_field"]

# An error line echoes at most this much of a value the user wrote (a key path, a hint: a little less),
# so that a 10 MB string or an expanded YAML alias bomb still gives one short line.
EXCERPT_CHARS = 200
_PATH_CHARS = 120
_HINT_CHARS = 300


class SbsearchError(Exception):
    """Root of every error sbsearch raises on purpose (as opposed to bugs, which are asserts)."""


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)``, or its first ``limit`` characters and how long the whole is.

    Only about as much as is shown is computed, so a huge string, a deeply nested list or a list that
    holds itself costs no more than a short one.

    Example:
        >>> excerpt("a" * 10_000_000, limit=8)
        "'aaaaaaa…' (10000000 characters)"
    """
    pieces: list[str] = []
    size = 0
    for piece in _repr_pieces(value, limit):
        pieces.append(piece)
        size += len(piece)
        if size > limit:
            break
    else:
        return "".join(pieces)
    head = "".join(pieces)[:limit]
    if isinstance(value, (str, bytes)):
        quote = pieces[0][1 if isinstance(value, bytes) else 0]
        return f"{head}…{quote} ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, (list, tuple, dict)):
        noun = "key" if isinstance(value, dict) else "item"
        return f"{head}… ({len(value)} {noun}{'' if len(value) == 1 else 's'})"
    return f"{head}… ({size} characters)"


def _repr_pieces(value: object, limit: int) -> Iterator[str]:
    """``repr(value)`` in pieces, lazily; a string is cut after ``limit`` characters."""
    if isinstance(value, (str, bytes)):
        yield repr(value[: limit + 1])
    elif isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        brackets = "[]" if isinstance(value, list) else "()"
        yield brackets[0]
        for i, item in enumerate(value):
            yield ", " if i else ""
            yield from _repr_pieces(item, limit)
        yield "," if isinstance(value, tuple) and len(value) == 1 else ""
        yield brackets[1]
    elif isinstance(value, dict) and type(value) is dict:
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ", " if i else ""
            yield from _repr_pieces(key, limit)
            yield ": "
            yield from _repr_pieces(item, limit)
        yield "}"
    else:
        try:
            yield repr(value)
        except ValueError:  # an integer with more digits than Python writes out
            assert isinstance(value, int), value
            yield f"<an integer of about {int(value.bit_length() * 0.30103) + 1} digits>"


def _one_line(text: str, limit: int) -> str:
    """``text`` with control characters escaped (one problem stays one line), cut after ``limit``."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}… ({len(text)} characters)"


class Problem:
    """One user mistake: ``key.path: rule, but got value``."""

    __slots__ = ("path", "rule", "value", "hint")

    def __init__(self, path: str, rule: str, value: object, hint: str = "") -> None:
        self.path = path
        self.rule = rule
        self.value = value
        self.hint = hint

    def __str__(self) -> str:
        # The key, the value and the hint may be the user's text of any size: each is cut short, and escaped
        # (the value by its repr) so that one problem stays one line.
        text = f"{_one_line(self.path, _PATH_CHARS) or '<spec>'}: {self.rule}, but got {excerpt(self.value)}"
        return f"{text} ({_one_line(self.hint, _HINT_CHARS)})" if self.hint else text

    def __repr__(self) -> str:
        return f"Problem({str(self)!r})"


class SpecError(SbsearchError):
    """A spec (or a command-line override) broke one or more rules; holds every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        assert problems, "a SpecError needs at least one problem"
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A "did you mean ...?" hint for a mistyped name, or a list of what is allowed."""
    options = sorted(candidates)
    close = difflib.get_close_matches(str(name), options, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "allowed: " + ", ".join(options)


Rule = Callable[[Any], bool]


def spec_field(default: Any, doc: str, rule: tuple[str, Rule] | None = None,
               choices: Callable[[], Any] | None = None) -> Any:
    """A field of a spec section with what validation, the resolved spec and the README's reference read.

    Args:
        default: the value when the spec leaves the key out.
        doc: what the key means (the README's reference).
        rule: (the rule in words, a check of a value of the right type): a value that fails the check is
            the problem ``key.path: <words>, but got value``.
        choices: the registered names the value must be one of (read when checked, so a registry may grow).
    """
    return field(default=default, metadata={"doc": doc, "rule": rule, "choices": choices})


class TrialDiverged(SbsearchError):
    """A trial's loss became NaN or infinite; the sweep records the trial and goes on."""
