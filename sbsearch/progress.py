"""The live progress display of a sweep, and the summary tables printed at its end."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sbsearch.backends.base import TrialView
from sbsearch.logs import metric_text

__all__ = ["SweepDisplay", "top_table", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class SweepDisplay:
    """Receives the trials' states every half second and shows counts, best so far, elapsed and ETA.

    On a terminal it is a live table; elsewhere (CI, a log file) it prints one line per finished trial.
    """

    def __init__(self, console: Console, budget: int, metric: str, direction: str) -> None:
        self.console, self.budget, self.metric, self.direction = console, budget, metric, direction
        self.start = time.monotonic()
        self.live: Live | None = None
        self.seen_finished: set[int] = set()
        self.initially_finished: int | None = None

    def __enter__(self) -> SweepDisplay:
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def __call__(self, views: list[TrialView]) -> None:
        finished = [v for v in views if v.state in ("COMPLETE", "PRUNED", "FAIL")]
        if self.initially_finished is None:
            self.initially_finished = len(finished)
            self.seen_finished = {v.number for v in finished}
        if self.live is not None:
            self.live.update(self._render(views, finished))
            return
        new = [v for v in finished if v.number not in self.seen_finished]
        for v in sorted(new, key=lambda v: v.number):
            self.seen_finished.add(v.number)
            value = "-" if v.value is None else metric_text(v.value)
            self.console.print(f"trial {v.number:>3} {v.state:<8} {self.metric}={value} epochs={v.epoch}  {v.label}",
                               highlight=False, soft_wrap=True)
        if new:
            self.console.print("  " + self._status_line(views, finished), highlight=False, soft_wrap=True)

    def _status_line(self, views: list[TrialView], finished: list[TrialView]) -> str:
        counts = {s: sum(v.state == s for v in finished) for s in ("COMPLETE", "PRUNED", "FAIL")}
        running = sum(v.state == "RUNNING" for v in views)
        elapsed = time.monotonic() - self.start
        done_now = len(finished) - (self.initially_finished or 0)
        remaining = max(self.budget - len(finished), 0)
        eta = format_duration(elapsed / done_now * remaining) if done_now else "?"
        best = _best(views, self.direction)
        best_text = f"best {self.metric} {metric_text(best.value)} (trial {best.number})" if best and best.value is not None else "best -"
        return (f"{len(finished)}/{self.budget} finished · {counts['COMPLETE']} complete · {counts['PRUNED']} pruned · "
                f"{counts['FAIL']} failed · {running} running · {best_text} · elapsed {format_duration(elapsed)} · ETA {eta}")

    def _render(self, views: list[TrialView], finished: list[TrialView]) -> Group:
        table = Table(box=None, header_style="bold", pad_edge=False)
        for col in ("trial", "state", self.metric, "epoch", "configuration"):
            table.add_column(col)
        recent = [v for v in views if v.state == "RUNNING"] + sorted(finished, key=lambda v: -v.number)[:8]
        for v in recent:
            style = {"RUNNING": "cyan", "PRUNED": "yellow", "FAIL": "red"}.get(v.state, "")
            table.add_row(str(v.number), Text(v.state, style=style), "-" if v.value is None else metric_text(v.value),
                          str(v.epoch), v.label)
        return Group(Text(self._status_line(views, finished), style="bold"), table)


def _best(views: Sequence[TrialView], direction: str) -> TrialView | None:
    done = [v for v in views if v.state == "COMPLETE" and v.value is not None]
    if not done:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    return max(done, key=lambda v: sign * (v.value or 0.0))


def top_table(rows: Sequence[dict[str, Any]], metric: str, columns: Sequence[str], limit: int = 5,
              test_metric: str | None = None) -> Table:
    """The best trials as a table: number, metric, epochs, seconds, searched values.

    With ``test_metric`` (``test_accuracy``), a column shows each row's held-out value and its spread over
    replicas (``row[test_metric]``, ``row[test_metric + "_std"]``; blank where a row has none).
    """
    title = f"Top {min(limit, len(rows))} trials by {metric}"
    if test_metric is not None:
        title = f"Top {min(limit, len(rows))} trials, chosen on validation ({metric}), measured on test"
    table = Table(title=title, header_style="bold")
    heads = ("trial", metric, *((test_metric,) if test_metric else ()), "epochs", "seconds")
    for col in (*heads, *columns):
        table.add_column(col, justify="right" if col in heads else "left")
    for row in rows[:limit]:
        test = []
        if test_metric is not None:
            value, spread = row.get(test_metric), row.get(test_metric + "_std")
            test = ["" if value is None else metric_text(value) + ("" if spread is None else f" ± {metric_text(spread)}")]
        table.add_row(str(row["number"]), metric_text(row[metric]), *test, str(row["epochs_run"]), f"{row['seconds']:.1f}",
                      *[_cell(row.get(c)) for c in columns])
    return table


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
