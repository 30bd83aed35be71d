"""The report's figures, one PNG each: drawn on matplotlib's object-oriented ``Figure`` (Agg), which leaves
pyplot's global state and backend alone. Each function writes its file into ``folder`` and returns its name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sbsearch.report.controls import ControlCheck
from sbsearch.report.load import SweepData
from sbsearch.report.stats import CONFIDENCE, Group, Interval
from sbsearch.spec import ParamSpec

CURVES = 5
"""Learning curves drawn in colour: the best trials'."""


def _figure(width: float = 5.6, height: float = 3.6) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, folder: Path, name: str) -> str:
    fig.savefig(folder / name)
    return name


def _error(iv: Interval) -> list[list[float]] | None:
    """An error bar from the mean to the interval's bounds; none where the interval is unknown."""
    return None if not iv.known else [[iv.mean - iv.low], [iv.high - iv.mean]]


def effect_plot(data: SweepData, p: ParamSpec, groups: Sequence[Group], folder: Path) -> str:
    """Each completed trial's final metric by the value of knob ``p``, with each group's mean and interval
    (each network once: see ``TrialData.same_as``)."""
    done = data.distinct()
    continuous = p.kind == "range" and not p.integer
    rng = np.random.default_rng(0)
    fig = _figure()
    ax = fig.add_subplot()
    if continuous:  # every trial at its own value; the bins' means on top
        ax.scatter([float(t.params[p.name]) for t in done], [t.final[data.metric] for t in done], s=14, color="0.6",
                   zorder=1)
        if p.log:
            ax.set_xscale("log")
    for g in groups:
        if g.values and not continuous:
            ax.scatter(g.x + rng.uniform(-0.12, 0.12, len(g.values)), g.values, s=14, color="0.6", zorder=1)
        if g.interval.n:
            ax.errorbar([g.x], [g.interval.mean], yerr=_error(g.interval), fmt="o", color="C0", capsize=5,
                        markersize=7, zorder=2)
    if not continuous:
        ax.set_xticks([g.x for g in groups], [f"{g.label}\nn={len(g.values)}" for g in groups])
        ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xlabel(p.name + (f" (means over {len(groups)} bin{'s' if len(groups) > 1 else ''} of trials)" if continuous else ""))
    ax.set_ylabel(f"final {data.metric}")
    ax.set_title(f"{p.name}: mean and {CONFIDENCE:.0%} interval over completed trials", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, f"effect-{p.name}.png")


def controls_plot(checks: Sequence[ControlCheck], treatment: str, metric: str, folder: Path) -> str:
    """The treatment's gain and each control's, with their intervals; red where a control reproduces it."""
    from matplotlib.ticker import MaxNLocator

    labels = [treatment] + [c.name + " control" for c in checks]
    ivs = [checks[0].gain] + [c.control_gain for c in checks]
    colors = ["C0"] + ["C3" if c.reproduces else "C2" if c.reproduces is False else "0.5" for c in checks]
    fig = _figure(5.6, 1.2 + 0.5 * len(labels))
    ax = fig.add_subplot()
    for i, (iv, color) in enumerate(zip(ivs, colors)):
        y = len(labels) - 1 - i
        if iv.n == 0:
            ax.text(0, y, "no trials", va="center", ha="center", fontsize=8, color="0.4")
            continue
        ax.errorbar([iv.mean], [y], xerr=_error(iv), fmt="o", color=color, capsize=5, markersize=7)
    ax.axvline(0, color="0.3", lw=0.8)
    known = [v for iv in ivs if iv.n for v in (iv.mean, iv.low, iv.high) if math.isfinite(v)] + [0.0]
    span = max(known) - min(known) or 1.0
    ax.set_xlim(min(known) - 0.15 * span, max(known) + 0.15 * span)
    ax.set_yticks(range(len(labels)), labels[::-1])
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(f"gain in {metric} over factor 1 (+ = better)", fontsize=9)
    ax.set_title("Gain of the expansion and of its controls\n(red: the control reproduces the gain)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, folder, "controls.png")


def importance_plot(importances: Mapping[str, float], folder: Path) -> str:
    names = sorted(importances, key=lambda k: importances[k])
    fig = _figure(5.0, 0.9 + 0.45 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [importances[k] for k in names], color="C0")
    ax.set_xlabel("importance (Optuna fANOVA; sums to 1)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, folder, "importance.png")


def curves_plot(data: SweepData, folder: Path) -> str:
    """The objective after each epoch: the best ``CURVES`` trials in colour, the others thin, pruned ones dashed."""
    from matplotlib.ticker import MaxNLocator

    top = {t.number for t in data.ranked()[:CURVES]}
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    for t in data.trials:
        if t.number in top or not t.curve:
            continue
        epochs = sorted(t.curve)
        style = {"PRUNED": ("--", "C3"), "FAIL": (":", "0.3")}.get(t.state, ("-", "0.7"))
        ax.plot(epochs, [t.curve[e] for e in epochs], ls=style[0], color=style[1], lw=0.8, alpha=0.6)
    for i, t in enumerate(data.ranked()[:CURVES]):
        epochs = sorted(t.curve)
        ax.plot(epochs, [t.curve[e] for e in epochs], color=f"C{i}", lw=2, marker="o", markersize=3,
                label=f"trial {t.number}: {t.final[data.metric]:.4g}")
    others = {t.state for t in data.trials if t.number not in top and t.curve}
    if "PRUNED" in others:
        ax.plot([], [], ls="--", color="C3", lw=0.8, label="pruned trials")
    if "COMPLETE" in others:
        ax.plot([], [], color="0.7", lw=0.8, label="other completed trials")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(data.metric)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, folder, "curves.png")


def score_plot(points: Sequence[tuple[int, float, float]], what: str, metric: str, title: str, folder: Path) -> str:
    """The score (x) against the final metric (y) of each (trial, score, final) point, labelled by trial."""
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    ax.scatter([pt[1] for pt in points], [pt[2] for pt in points], color="C0", s=18)
    for n, x, y in points:
        ax.annotate(str(n), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points", color="0.4")
    ax.set_xlabel(what)
    ax.set_ylabel(f"final {metric}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, folder, "sb_score.png")
