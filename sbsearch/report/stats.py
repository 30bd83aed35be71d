"""The report's statistics, from scipy: intervals of a mean and of a difference of means, a rank correlation,
and the per-value groups, stop counts and compute summary that the report's tables and plots show.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from sbsearch.report.load import SweepData, TrialData, one_per_network
from sbsearch.spec import ParamSpec

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval; the bounds are NaN when n is too small for one."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def known(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def __str__(self) -> str:
        if self.n == 0:
            return "no trials"
        if not self.known:
            return f"{self.mean:.4g} (n={self.n})"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


def _finite(values: Sequence[float]) -> np.ndarray[Any, np.dtype[np.float64]]:
    return np.asarray([v for v in values if math.isfinite(v)], dtype=float)


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean of ``values`` (each a trial's final metric).

    Example:
        >>> interval([1.0, 2.0, 3.0])
        Interval(mean=2.0, low=-0.484..., high=4.484..., n=3)
    """
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    sem = float(stats.sem(x))
    if sem == 0.0:  # scipy's t has no scale 0; every value is the mean
        return Interval(mean, mean, mean, n)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def difference_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Welch interval of ``mean(a) - mean(b)``; ``n`` is the smaller group's size."""
    x, y = _finite(a), _finite(b)
    n = min(len(x), len(y))
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    diff = float(x.mean() - y.mean())
    if n < 2:
        return Interval(diff, math.nan, math.nan, n)
    if float(x.var()) == 0.0 and float(y.var()) == 0.0:  # no spread: scipy would warn of precision loss
        return Interval(diff, diff, diff, n)
    low, high = stats.ttest_ind(x, y, equal_var=False).confidence_interval(confidence)
    return Interval(diff, float(low), float(high), n)


@dataclass(frozen=True)
class Correlation:
    """Spearman's rank correlation with its two-sided p-value over ``n`` pairs."""

    rho: float
    pvalue: float
    n: int


def spearman(xs: Sequence[float], ys: Sequence[float]) -> Correlation | None:
    """Spearman's ρ of paired values, or None with fewer than 3 pairs or no spread on either side."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    result = stats.spearmanr(xs, ys)
    return Correlation(float(result.statistic), float(result.pvalue), len(xs))


# --- what the report's tables and plots summarise -----------------------------------------------------
def fmt(value: Any) -> str:
    """A value as the report's tables and tick labels write it: floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class Group:
    """The completed trials with one value (or, for a continuous knob, one quantile bin) of a knob."""

    label: str
    x: float  # where the group sits on the plot's x axis
    values: list[float]  # the trials' final metric
    interval: Interval


def _group(label: str, x: float, values: list[float]) -> Group:
    return Group(label, x, values, interval(values))


def _metrics(trials: Sequence[TrialData], metric: str) -> list[float]:
    """A group's final metrics, each network once: a repeat of a network in the same group (a grid cell whose
    other knobs do not apply to it) is the same number again, not another sample."""
    return [t.final[metric] for t in one_per_network(trials)]


def knob_groups(data: SweepData, p: ParamSpec) -> list[Group]:
    """A group per value of a knob; a continuous range is cut into quantile bins.

    Every completed trial takes part, repeats too, so each value's group holds the networks met with that
    value; within a group each network counts once.
    """
    done = data.completed()
    values = [t.params.get(p.name) for t in done]
    if p.kind == "choice" or p.integer:
        order = list(p.values) if p.kind == "choice" else sorted({int(v) for v in values if v is not None})
        return [_group(fmt(v), float(i), _metrics([t for t in done if t.params.get(p.name) == v], data.metric))
                for i, v in enumerate(order)]
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return []
    bins = min(4, max(1, len(x) // 3))
    edges = np.quantile(np.log(x) if p.log else x, np.linspace(0, 1, bins + 1))
    if p.log:
        edges = np.exp(edges)
    out = []
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        inside = [t for t in done if lo <= float(t.params[p.name]) <= hi and (i == bins - 1 or float(t.params[p.name]) < hi)]
        centre = float(np.median([float(t.params[p.name]) for t in inside])) if inside else (lo + hi) / 2
        out.append(_group(f"{lo:.3g}–{hi:.3g}", centre, _metrics(inside, data.metric)))
    return out


def stopped_by_value(data: SweepData, p: ParamSpec) -> dict[str, str]:
    """'2 pruned, 1 failed' per value label of a discrete knob: why a value may have few completed trials."""
    out: dict[str, str] = {}
    if p.kind == "range" and not p.integer:
        return out
    for t in data.trials:
        if t.state in ("PRUNED", "FAIL") and p.name in t.params:
            out.setdefault(fmt(t.params[p.name]), "")
            out[fmt(t.params[p.name])] += t.state[0]
    return {k: ", ".join(f"{v.count(s[0].upper())} {s}" for s in ("pruned", "failed") if v.count(s[0].upper()))
            for k, v in out.items()}


def score_points(data: SweepData, score: str) -> tuple[str, list[tuple[int, float, float]]]:
    """(what the x axis is, [(trial, score, final metric)]) over completed trials that logged ``score``, at the
    epoch where the pruner first judges a trial (where an early signal has to be good), else at the last."""
    warmup = int(getattr(data.spec.search, "warmup_epochs", 1) or 1)
    epoch = max(1, min(warmup, data.spec.train.epochs))
    points = [(t.number, t.score[epoch], t.final[data.metric]) for t in data.distinct() if epoch in t.score]
    if points:
        what = f"{score} after epoch {epoch}"
    else:
        what = f"{score} at the last epoch"
        points = [(t.number, t.final[score], t.final[data.metric]) for t in data.distinct() if score in t.final]
    return what, [pt for pt in points if math.isfinite(pt[1]) and math.isfinite(pt[2])]


@dataclass(frozen=True)
class Compute:
    counts: Mapping[str, int]  # COMPLETE | PRUNED | FAIL -> trials
    epochs_run: int
    epochs_full: int  # what running every trial to the last epoch would have taken
    epochs_saved: int  # by pruning
    seconds_run: float
    seconds_saved: float  # estimated at each pruned trial's own pace


def compute_spent(data: SweepData) -> Compute:
    epochs = data.spec.train.epochs
    counts = {s: sum(t.state == s for t in data.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    pruned: list[TrialData] = [t for t in data.trials if t.state == "PRUNED"]
    saved_s = sum((epochs - t.epochs_run) * t.seconds / t.epochs_run for t in pruned if t.epochs_run > 0)
    return Compute(counts, sum(t.epochs_run for t in data.trials), epochs * len(data.trials),
                   sum(max(0, epochs - t.epochs_run) for t in pruned), sum(t.seconds for t in data.trials), saved_s)
