"""The one exception family a user of sbsearch ever needs to catch."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

__all__ = ["SbsearchError", "SpecError", "TrialDiverged", "Problem", "did_you_mean"]


class SbsearchError(Exception):
    """Root of every error sbsearch raises on purpose (as opposed to bugs, which are asserts)."""


class Problem:
    """One user mistake: ``key.path: rule, but got value``."""

    __slots__ = ("path", "rule", "value", "hint")

    def __init__(self, path: str, rule: str, value: object, hint: str = "") -> None:
        self.path = path
        self.rule = rule
        self.value = value
        self.hint = hint

    def __str__(self) -> str:
        # A key is the user's text: control characters in it are shown escaped, so one problem stays one line.
        path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in self.path)
        text = f"{path or '<spec>'}: {self.rule}, but got {self.value!r}"
        return f"{text} ({self.hint})" if self.hint else text

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


class TrialDiverged(SbsearchError):
    """A trial's loss became NaN or infinite; the sweep records the trial and goes on."""
