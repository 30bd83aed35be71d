"""The sweep report: what a sweep found, as one HTML page with PNG plots beside it.

``write_report(out_dir)`` reads the sweep's folder (``spec.yaml``; the Optuna journal, else ``trials.csv``)
and, where it can reach it, the sweep's MLflow store (per-epoch histories such as ``sb_score``), then writes
``OUT/report/index.html`` with its plots and logs the folder to the sweep's MLflow parent run.

Sections: the best configuration and the top trials; for each searched knob the final metric by value with
a 95% interval, and beside the expansion the gain of each control (``upsample``, width-matched, bias
learning rate) with a flag where a control reproduces the gain; Optuna's parameter importance; learning
curves; ``sb_score`` against the final metric; trial counts and the compute spent and saved by pruning.
"""

from __future__ import annotations

import csv
import datetime
import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from sbsearch.data import DATASETS
from sbsearch.errors import SbsearchError, SpecError
from sbsearch.spec import ParamSpec, Spec, parse_spec
from sbsearch.sweep import HELD_OUT_TOP, sweep_key, tracking_info
from sbsearch.tracking import Tracker, TrackingTarget

__all__ = [
    "CONTROLS", "Control", "ControlCheck", "Interval", "SweepData", "TrialData", "check_controls",
    "difference_interval", "interval", "load_sweep", "write_report",
]

CONFIDENCE = 0.95
REPRODUCED_FRACTION = 0.5
"""A control 'reproduces' the gain when it recovers at least this share of it: then half or more of what
looked like symmetry breaking is explained by the confounder the control rebuilds."""
TOP_TRIALS = 10
CURVES = 5
MIN_TRIALS_FOR_IMPORTANCE = 5
SCORE = "sb_score"


# --- statistics -----------------------------------------------------------------------------------
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


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Student-t interval of the mean of ``values`` (each a trial's final metric).

    Example:
        >>> interval([1.0, 2.0, 3.0])
        Interval(mean=2.0, low=-0.484..., high=4.484..., n=3)
    """
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n)


def difference_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Welch interval of ``mean(a) - mean(b)``; ``n`` is the smaller group's size."""
    x = np.asarray([v for v in a if math.isfinite(v)], dtype=float)
    y = np.asarray([v for v in b if math.isfinite(v)], dtype=float)
    n = min(len(x), len(y))
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    diff = float(x.mean() - y.mean())
    if n < 2:
        return Interval(diff, math.nan, math.nan, n)
    vx, vy = float(x.var(ddof=1)) / len(x), float(y.var(ddof=1)) / len(y)
    se = math.sqrt(vx + vy)
    if se == 0.0:
        return Interval(diff, diff, diff, n)
    df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return Interval(diff, diff - half, diff + half, n)


# --- what a sweep holds ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialData:
    """One trial as the report sees it; ``params`` holds every knob, the fixed ones too."""

    number: int
    state: str  # COMPLETE | PRUNED | FAIL
    params: Mapping[str, Any]
    final: Mapping[str, float]
    epochs_run: int = 0
    seconds: float = 0.0
    reason: str = ""
    run_id: str = ""
    curve: Mapping[int, float] = field(default_factory=dict)  # epoch -> objective metric
    score: Mapping[int, float] = field(default_factory=dict)  # epoch -> sb_score (from MLflow)
    test: Mapping[str, float] = field(default_factory=dict)  # the held-out test split (shown for the chosen only)


@dataclass(frozen=True)
class SweepData:
    spec: Spec
    out_dir: Path
    metric: str
    direction: str
    trials: tuple[TrialData, ...]
    importances: Mapping[str, float] | None = None
    importance_note: str = ""
    tracking_uri: str | None = None
    parent_run_id: str | None = None
    tracking_note: str = ""

    @property
    def sign(self) -> float:
        """+1 when a larger metric is better, -1 when a smaller one is."""
        return 1.0 if self.direction == "maximize" else -1.0

    @property
    def searched(self) -> list[ParamSpec]:
        return list(self.spec.searched)

    def completed(self) -> list[TrialData]:
        return [t for t in self.trials if t.state == "COMPLETE" and math.isfinite(t.final.get(self.metric, math.nan))]

    def ranked(self) -> list[TrialData]:
        """Completed trials by the validation metric, the best first (ties: the lower trial number), as
        ``sweep.chosen_on_validation`` ranks them; the test split takes no part."""
        return sorted(self.completed(), key=lambda t: (-self.sign * t.final[self.metric], t.number))

    @property
    def test_metric(self) -> str:
        return "test_" + self.metric.removeprefix("val_")

    def chosen(self) -> list[TrialData]:
        """The configurations chosen on validation that the report shows with their test-split numbers."""
        return self.ranked()[:HELD_OUT_TOP]


def _fixed_values(spec: Spec) -> dict[str, Any]:
    return {p.name: p.values[0] for p in spec.space if not p.searched}


def _read_spec(out_dir: Path) -> Spec:
    path = out_dir / "spec.yaml"
    if not path.exists():
        raise SbsearchError(f"out_dir: must be a sweep's output folder (with spec.yaml), but got {str(out_dir)!r}")
    try:
        return parse_spec(yaml.safe_load(path.read_text(encoding="utf-8")))
    except SpecError as exc:
        raise SbsearchError(f"{path}: the sweep's resolved spec no longer validates ({exc.problems[0]})") from None


def _coerce(p: ParamSpec, text: str) -> Any:
    """A parameter as trials.csv wrote it (str(value)) back to its value."""
    if p.kind == "range":
        return int(float(text)) if p.integer else float(text)
    return next((v for v in p.values if str(v) == text), text)


def _records_from_csv(path: Path, spec: Spec) -> list[dict[str, Any]]:
    by_name = {p.name: p for p in spec.space}
    rows = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            params = {k: _coerce(by_name[k], v) for k, v in row.items() if k in by_name and v != ""}
            fixed = {"number", "state", "epochs_run", "seconds", "startup_seconds", "reason", "mlflow_run_id",
                     "heldout_rank", *by_name}
            values = {k: float(v) for k, v in row.items() if k not in fixed and v not in ("", None)}
            final = {k: v for k, v in values.items() if not k.startswith("test_")}
            test = {k: v for k, v in values.items() if k.startswith("test_")}
            rows.append({"number": int(row["number"]), "state": row["state"], "params": params, "final": final,
                         "test": test,
                         "epochs_run": int(row.get("epochs_run") or 0), "seconds": float(row.get("seconds") or 0),
                         "reason": row.get("reason", ""), "run_id": row.get("mlflow_run_id", "")})
    return rows


def _tracking_uri(spec: Spec, out_dir: Path, given: str | None) -> str | None:
    """Where the sweep logged: the given URI, the spec's, else an existing ``mlflow.db`` in the folder or here."""
    if given or spec.tracking.uri:
        return given or spec.tracking.uri
    used = tracking_info(out_dir).get("uri")  # what the sweep itself used
    if used:
        return used
    for base in (out_dir, Path.cwd()):
        if (base / "mlflow.db").exists():
            return f"sqlite:///{(base / 'mlflow.db').resolve()}"
    return None


def load_sweep(out_dir: Path, tracking_uri: str | None = None, parent_run_id: str | None = None) -> SweepData:
    """Gather a sweep's trials from its folder, and per-epoch histories from MLflow where it can be reached.

    Args:
        out_dir: the sweep's ``--out`` folder.
        tracking_uri: the MLflow store (default: the spec's, else ``mlflow.db`` under ``out_dir`` or here).
        parent_run_id: the sweep's parent run (default: found by the sweep's key).

    Raises:
        SbsearchError: when ``out_dir`` holds no sweep.
    """
    from sbsearch.backends.optuna import learning_curves, load_study, param_importances, records_from_study

    out_dir = out_dir.resolve()
    spec = _read_spec(out_dir)
    metric, direction = DATASETS[spec.data.dataset].objective
    study = load_study(spec, out_dir)
    rows: list[dict[str, Any]] = []
    curves: dict[int, dict[int, float]] = {}
    if study is not None:
        rows = [vars(r) for r in records_from_study(study)]
        curves = learning_curves(study)
    if not rows and (out_dir / "trials.csv").exists():
        rows = _records_from_csv(out_dir / "trials.csv", spec)
    if not rows:
        raise SbsearchError(f"out_dir: {out_dir} holds no finished trials yet")

    uri = _tracking_uri(spec, out_dir, tracking_uri)
    histories: dict[str, dict[int, float]] = {}  # run id -> epoch -> sb_score
    objective_histories: dict[str, dict[int, float]] = {}
    note = ""
    if uri is None:
        note = "No MLflow store was found for this sweep (pass --tracking-uri); the report is not logged to MLflow."
    else:
        try:
            tracker = Tracker(TrackingTarget(uri, spec.tracking.experiment or spec.name, (out_dir / "mlartifacts").as_uri()))
            parent_run_id = parent_run_id or tracker.find_sweep(sweep_key(spec, out_dir))
            if parent_run_id is None:
                note = f"The sweep's parent run was not found in {uri}; the report is not logged to MLflow."
            else:
                for run in tracker.trial_runs(parent_run_id):
                    rid = run.info.run_id
                    if SCORE in run.data.metrics:
                        histories[rid] = tracker.metric_history(rid, SCORE)
                    if not curves and metric in run.data.metrics:
                        objective_histories[rid] = tracker.metric_history(rid, metric)
        except Exception as exc:  # noqa: BLE001 - the report is still worth having without MLflow
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            note = f"MLflow at {uri} could not be read ({first[:160]}); histories from it are missing."
            parent_run_id = None

    fixed = _fixed_values(spec)
    trials = []
    for row in rows:
        # Per-epoch metrics: the trial's own record, else what it reported to Optuna, else MLflow's history.
        history = row.get("history") or []
        curve = {i + 1: h[metric] for i, h in enumerate(history) if metric in h}
        curve = curve or dict(curves.get(row["number"]) or objective_histories.get(row["run_id"]) or {})
        score = {i + 1: h[SCORE] for i, h in enumerate(history) if SCORE in h} or histories.get(row["run_id"], {})
        final = row["final"]
        if row["state"] == "COMPLETE" and metric in final and row["epochs_run"] and row["epochs_run"] not in curve:
            curve[row["epochs_run"]] = final[metric]  # the last epoch, when the trial stopped reporting before it
        trials.append(TrialData(row["number"], row["state"], {**fixed, **row["params"]}, final, row["epochs_run"],
                                row["seconds"], row["reason"] or "", row["run_id"] or "", curve, score,
                                dict(row.get("test") or {})))
    trials.sort(key=lambda t: t.number)

    importances, importance_note = None, ""
    n_done = sum(t.state == "COMPLETE" for t in trials)
    if len(spec.searched) < 2:
        importance_note = "Parameter importance needs at least two searched knobs."
    elif study is None:
        importance_note = "Parameter importance needs the sweep's Optuna study, which this folder does not hold."
    elif n_done < MIN_TRIALS_FOR_IMPORTANCE:
        importance_note = f"Parameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; this sweep has {n_done}."
    else:
        try:
            importances = param_importances(study)
        except Exception as exc:  # noqa: BLE001 - e.g. every completed trial shares one value of a knob
            importance_note = f"Optuna could not compute parameter importance: {str(exc)[:200]}"
    return SweepData(spec, out_dir, metric, direction, tuple(trials), importances, importance_note, uri,
                     parent_run_id, note)


# --- controls -------------------------------------------------------------------------------------
def _factor(p: Mapping[str, Any]) -> int:
    try:
        return int(p.get("expansion.factor", 1))
    except (TypeError, ValueError):
        return 1


def _bias_multiplier(p: Mapping[str, Any]) -> str | float:
    value = p.get("controls.bias_lr_multiplier", 1.0)
    return value if isinstance(value, str) else float(value)


def _bias_scale(p: Mapping[str, Any]) -> str | float:
    value = p.get("controls.bias_scale", 1.0)
    return value if isinstance(value, str) else float(value)


def _no_control(p: Mapping[str, Any]) -> bool:
    return _bias_multiplier(p) == 1.0 and _bias_scale(p) == 1.0 and not p.get("controls.width_matched", False)


def _bias_control(value: str | float, p: Mapping[str, Any]) -> bool:
    """A bias control standing in for the expansion: ``auto`` (which leaves the input unexpanded) for an
    expanded configuration, or a number on the unexpanded input."""
    return (value == "auto" and _factor(p) > 1) or (isinstance(value, float) and value != 1.0 and _factor(p) == 1)


def _baseline(p: Mapping[str, Any]) -> bool:
    """The unexpanded model with no control switched on."""
    return _factor(p) == 1 and _no_control(p)


def _expanded(p: Mapping[str, Any]) -> bool:
    """Constants in the input: the treatment whose gain the controls try to explain."""
    return _factor(p) > 1 and p.get("expansion.layout", "grid") != "upsample" and _no_control(p)


@dataclass(frozen=True)
class Control:
    """A baseline that rebuilds one confounder of the expansion without constants in the input."""

    label: str
    knob: str  # the knob that switches it on; the control is offered only where the spec has that knob
    rebuilds: str
    member: Callable[[Mapping[str, Any]], bool]
    how: str  # how to add it to a sweep


CONTROLS: dict[str, Control] = {
    "upsample": Control(
        "same-size input without constants (expansion.layout: upsample)", "expansion.layout",
        "the larger input and the extra compute",
        lambda p: _factor(p) > 1 and p.get("expansion.layout") == "upsample" and _no_control(p),
        "add upsample to space.expansion.layout"),
    "width_matched": Control(
        "width-matched model without expansion (controls.width_matched)", "controls.width_matched",
        "the extra parameters of the expanded model",
        lambda p: _factor(p) > 1 and bool(p.get("controls.width_matched", False)),
        "search space.controls.width_matched: [false, true]"),
    "bias_lr": Control(
        "bias learning-rate control without expansion (controls.bias_lr_multiplier)", "controls.bias_lr_multiplier",
        "the larger effective bias step that constant inputs give the first layer",
        lambda p: not p.get("controls.width_matched", False) and _bias_scale(p) == 1.0
        and _bias_control(_bias_multiplier(p), p),
        "search space.controls.bias_lr_multiplier: [1.0, auto]"),
    "bias_scale": Control(
        "bias-scale control without expansion (controls.bias_scale)", "controls.bias_scale",
        "the larger effective bias step that constant inputs give the first layer",
        lambda p: not p.get("controls.width_matched", False) and _bias_multiplier(p) == 1.0
        and _bias_control(_bias_scale(p), p),
        "search space.controls.bias_scale: [1.0, auto]"),
}


@dataclass(frozen=True)
class ControlCheck:
    """The expansion's gain over the unexpanded baseline next to one control's gain (both signed so that
    positive is better, whatever the metric's direction)."""

    name: str
    label: str
    gain: Interval
    control_gain: Interval
    verdict: str
    reproduces: bool | None  # None: nothing to decide (no gain, or no trials of the control)


def check_controls(trials: Iterable[TrialData], metric: str, direction: str, knobs: Iterable[str]) -> list[ControlCheck]:
    """Compare the expansion's gain with each control's, for the controls whose knob ``knobs`` has.

    Example:
        >>> checks = check_controls(data.completed(), "val_accuracy", "maximize", [p.name for p in spec.space])
        >>> [c.verdict for c in checks if c.reproduces]
    """
    sign = 1.0 if direction == "maximize" else -1.0
    done = [t for t in trials if t.state == "COMPLETE" and math.isfinite(t.final.get(metric, math.nan))]
    if not any(_factor(t.params) > 1 for t in done):
        return []  # no expansion was tried: there is no gain for a control to explain
    value = {t.number: sign * t.final[metric] for t in done}
    base = [value[t.number] for t in done if _baseline(t.params)]
    treated = [value[t.number] for t in done if _expanded(t.params)]
    gain = difference_interval(treated, base)
    knobs = set(knobs)
    checks = []
    for name, control in CONTROLS.items():
        if control.knob not in knobs:
            continue
        ctl = [value[t.number] for t in done if control.member(t.params)]
        control_gain = difference_interval(ctl, base)
        reproduces: bool | None = None
        if not ctl:
            verdict = f"not in this sweep ({control.how})"
        elif not base or not treated:
            verdict = "needs completed trials of both the unexpanded baseline (factor 1) and the expansion"
        elif gain.mean <= 0:
            verdict = f"the expansion did not help here (gain {gain.mean:+.4g}); nothing for the control to explain"
        else:
            share = control_gain.mean / gain.mean
            reproduces = share >= REPRODUCED_FRACTION
            if reproduces:
                verdict = (f"CONTROL REPRODUCES THE GAIN: it recovers {share:.0%} of it, so the gain is likely "
                           f"{control.rebuilds}, not symmetry breaking")
            else:
                verdict = f"the control does not reproduce the gain (it recovers {share:.0%} of it)"
        checks.append(ControlCheck(name, control.label, gain, control_gain, verdict, reproduces))
    return checks


# --- plots ----------------------------------------------------------------------------------------
def _figure(width: float = 5.6, height: float = 3.6) -> Any:
    # The object-oriented Figure renders with Agg and leaves pyplot's global state (and backend) alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, folder: Path, name: str) -> str:
    fig.savefig(folder / name)
    return name


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass(frozen=True)
class _Done:
    """A completed trial with its final metric, for plotting."""

    number: int
    params: Mapping[str, Any]
    final_value: float


def _groups(p: ParamSpec, done: list[_Done]) -> list[tuple[str, float, list[float]]]:
    """(label, x position, trial values) per value of a knob; a continuous range is cut into quantile bins."""
    values = [t.params.get(p.name) for t in done]
    if p.kind == "choice" or p.integer:
        order = list(p.values) if p.kind == "choice" else sorted({int(v) for v in values if v is not None})
        return [(_fmt(v), float(i), [t.final_value for t in done if t.params.get(p.name) == v])
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
        out.append((f"{lo:.3g}–{hi:.3g}", centre, [t.final_value for t in inside]))
    return out


def _effect_plot(data: SweepData, p: ParamSpec, folder: Path) -> tuple[str, list[tuple[str, Interval]]]:
    done = [_Done(t.number, t.params, t.final[data.metric]) for t in data.completed()]
    groups = _groups(p, done)
    continuous = p.kind == "range" and not p.integer
    rng = np.random.default_rng(0)
    fig = _figure()
    ax = fig.add_subplot()
    rows = []
    if continuous:  # every trial at its own value; the bins' means on top
        ax.scatter([float(t.params[p.name]) for t in done], [t.final_value for t in done], s=14, color="0.6", zorder=1)
        if p.log:
            ax.set_xscale("log")
    for label, x, values in groups:
        iv = interval(values)
        rows.append((label, iv))
        if values and not continuous:
            ax.scatter(x + rng.uniform(-0.12, 0.12, len(values)), values, s=14, color="0.6", zorder=1)
        if iv.n:
            err = None if not iv.known else [[iv.mean - iv.low], [iv.high - iv.mean]]
            ax.errorbar([x], [iv.mean], yerr=err, fmt="o", color="C0", capsize=5, markersize=7, zorder=2)
    if not continuous:
        ax.set_xticks([g[1] for g in groups], [f"{g[0]}\nn={len(g[2])}" for g in groups])
        ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xlabel(p.name + (f" (means over {len(groups)} bin{'s' if len(groups) > 1 else ''} of trials)" if continuous else ""))
    ax.set_ylabel(f"final {data.metric}")
    ax.set_title(f"{p.name}: mean and {CONFIDENCE:.0%} interval over completed trials", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, folder, f"effect-{p.name}.png"), rows


def _stopped_by_value(data: SweepData, p: ParamSpec) -> dict[str, str]:
    """'2 pruned, 1 failed' per value label of a discrete knob: why a value may have few completed trials."""
    out: dict[str, str] = {}
    if p.kind == "range" and not p.integer:
        return out
    for t in data.trials:
        if t.state in ("PRUNED", "FAIL") and p.name in t.params:
            out.setdefault(_fmt(t.params[p.name]), "")
            out[_fmt(t.params[p.name])] += t.state[0]
    return {k: ", ".join(f"{v.count(s[0].upper())} {s}" for s in ("pruned", "failed") if v.count(s[0].upper()))
            for k, v in out.items()}


def _controls_plot(checks: list[ControlCheck], metric: str, folder: Path) -> str:
    labels = ["expansion (constants)"] + [c.name + " control" for c in checks]
    ivs = [checks[0].gain] + [c.control_gain for c in checks]
    colors = ["C0"] + ["C3" if c.reproduces else "C2" if c.reproduces is False else "0.5" for c in checks]
    fig = _figure(5.6, 1.2 + 0.5 * len(labels))
    ax = fig.add_subplot()
    for i, (iv, color) in enumerate(zip(ivs, colors)):
        y = len(labels) - 1 - i
        if iv.n == 0:
            ax.text(0, y, "no trials", va="center", ha="center", fontsize=8, color="0.4")
            continue
        err = None if not iv.known else [[iv.mean - iv.low], [iv.high - iv.mean]]
        ax.errorbar([iv.mean], [y], xerr=err, fmt="o", color=color, capsize=5, markersize=7)
    ax.axvline(0, color="0.3", lw=0.8)
    known = [v for iv in ivs if iv.n for v in (iv.mean, iv.low, iv.high) if math.isfinite(v)] + [0.0]
    span = max(known) - min(known) or 1.0
    ax.set_xlim(min(known) - 0.15 * span, max(known) + 0.15 * span)
    ax.set_yticks(range(len(labels)), labels[::-1])
    ax.set_ylim(-0.7, len(labels) - 0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(f"gain in {metric} over factor 1 (+ = better)", fontsize=9)
    ax.set_title("Gain of the expansion and of its controls\n(red: the control reproduces the gain)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, folder, "controls.png")


def _importance_plot(importances: Mapping[str, float], folder: Path) -> str:
    names = sorted(importances, key=lambda k: importances[k])
    fig = _figure(5.0, 0.9 + 0.45 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [importances[k] for k in names], color="C0")
    ax.set_xlabel("importance (Optuna fANOVA; sums to 1)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, folder, "importance.png")


def _curves_plot(data: SweepData, folder: Path) -> str:
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
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(data.metric)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return _save(fig, folder, "curves.png")


def _score_epoch(data: SweepData) -> int:
    """The epoch at which the pruner first judges a trial: where an early signal has to be good."""
    warmup = int(getattr(data.spec.search, "warmup_epochs", 1) or 1)
    return max(1, min(warmup, data.spec.train.epochs))


def _score_points(data: SweepData) -> tuple[str, list[tuple[int, float, float]]]:
    """(what the x axis is, [(trial, score, final metric)]) over completed trials that logged sb_score."""
    epoch = _score_epoch(data)
    points = [(t.number, t.score[epoch], t.final[data.metric]) for t in data.completed() if epoch in t.score]
    if points:
        return f"{SCORE} after epoch {epoch}", points
    points = [(t.number, t.final[SCORE], t.final[data.metric]) for t in data.completed() if SCORE in t.final]
    return f"{SCORE} at the last epoch", points


def _score_plot(data: SweepData, folder: Path) -> tuple[str | None, str]:
    what, points = _score_points(data)
    points = [pt for pt in points if math.isfinite(pt[1]) and math.isfinite(pt[2])]
    if not points:
        return None, (f"No completed trial logged {SCORE} (the replica Wasserstein score), so there is nothing "
                      "to compare with the final metric.")
    xs, ys = [pt[1] for pt in points], [pt[2] for pt in points]
    if len(points) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
        rho, pvalue = stats.spearmanr(xs, ys)
        sentence = (f"Spearman correlation between {what} and the final {data.metric}: ρ = {rho:+.2f} "
                    f"(p = {pvalue:.2g}, n = {len(points)} completed trials).")
        title = f"Spearman ρ = {rho:+.2f} (n = {len(points)})"
    else:
        sentence = f"Too few distinct completed trials ({len(points)}) for a Spearman correlation."
        title = sentence
    fig = _figure(5.2, 3.6)
    ax = fig.add_subplot()
    ax.scatter(xs, ys, color="C0", s=18)
    for n, x, y in points:
        ax.annotate(str(n), (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points", color="0.4")
    ax.set_xlabel(what)
    ax.set_ylabel(f"final {data.metric}")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, folder, "sb_score.png"), sentence


# --- compute --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Compute:
    counts: dict[str, int]
    epochs_run: int
    epochs_full: int  # what running every trial to the last epoch would have taken
    epochs_saved: int  # by pruning
    seconds_run: float
    seconds_saved: float  # estimated at each pruned trial's own pace


def compute_spent(data: SweepData) -> Compute:
    epochs = data.spec.train.epochs
    counts = {s: sum(t.state == s for t in data.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
    pruned = [t for t in data.trials if t.state == "PRUNED"]
    saved_s = sum((epochs - t.epochs_run) * t.seconds / t.epochs_run for t in pruned if t.epochs_run > 0)
    return Compute(counts, sum(t.epochs_run for t in data.trials), epochs * len(data.trials),
                   sum(max(0, epochs - t.epochs_run) for t in pruned), sum(t.seconds for t in data.trials), saved_s)


# --- the page -------------------------------------------------------------------------------------
_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1180px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.row { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; margin-bottom: 1em; }
.row > div { flex: 1 1 440px; min-width: 440px; }
.row img { max-width: 100%; border: 1px solid #eee; }
.flag { color: #b00020; font-weight: bold; } .ok { color: #1b5e20; } .muted { color: #666; }
code { background: #f4f4f4; padding: 0 3px; }
"""


def _e(value: Any) -> str:
    return html.escape(_fmt(value))


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{_e(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool) else f"<td>{_e(c)}</td>"
        for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(name: str, alt: str) -> str:
    return f'<img src="{html.escape(name)}" alt="{html.escape(alt)}">'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _best_section(data: SweepData) -> str:
    ranked = data.ranked()
    if not ranked:
        return _section("best", "Best configuration", "<p>No trial completed, so there is no best configuration yet.</p>")
    best = ranked[0]
    searched = [p.name for p in data.searched]
    rows = [(k, best.params.get(k)) for k in searched]
    test = data.test_metric
    held_out = (f" Measured on the held-out test split, which took no part in choosing it: <b>{test} = "
                f"{_with_spread(best.test, test)}</b>." if test in best.test else
                " This sweep has no test split (data.test_fraction: 0), so its best number carries the winner's "
                "curse of being chosen on the data it is reported on.")
    body = (f"<p>Trial {best.number}, chosen on validation: <b>{data.metric} = {best.final[data.metric]:.4f}</b> "
            f"({'higher' if data.sign > 0 else 'lower'} is better) after {best.epochs_run} epochs"
            f"{f', MLflow run <code>{_e(best.run_id)}</code>' if best.run_id else ''}.{held_out}</p>"
            + _table(["searched knob", "value"], rows))
    fixed = [(p.name, p.values[0]) for p in data.spec.space if not p.searched]
    body += "<details><summary>fixed knobs</summary>" + _table(["knob", "value"], fixed) + "</details>"
    return _section("best", "Best configuration", body)


def _with_spread(values: Mapping[str, float], key: str) -> str:
    spread = values.get(key + "_std")
    return f"{values[key]:.4f}" + ("" if spread is None else f" ± {spread:.4f}")


def _top_section(data: SweepData) -> str:
    searched = [p.name for p in data.searched]
    extra = [k for k in (SCORE, f"{data.metric}_std") if any(k in t.final for t in data.completed())]
    test = data.test_metric
    chosen = {t.number for t in data.chosen()}
    has_test = any(test in t.test for t in data.chosen())
    rows = [(t.number, t.final[data.metric], *[t.final.get(k, "") for k in extra],
             *([_with_spread(t.test, test) if t.number in chosen and test in t.test else ""] if has_test else []),
             t.epochs_run, round(t.seconds, 1), *[t.params.get(k) for k in searched]) for t in data.ranked()[:TOP_TRIALS]]
    header = ["trial", data.metric, *extra, *([f"{test} (held out)"] if has_test else []), "epochs", "seconds", *searched]
    body = _table(header, rows) if rows else "<p>No completed trials.</p>"
    if has_test:
        body = (f"<p>Chosen on validation ({_e(data.metric)}), measured on test: the test split never took part in "
                f"choosing; it is shown for the top {HELD_OUT_TOP} only, so that it cannot be used to choose.</p>" + body)
    return _section("top-trials", f"Top {min(TOP_TRIALS, len(rows))} trials", body)


def _effects_section(data: SweepData, folder: Path) -> str:
    knobs = [p.name for p in data.spec.space]
    checks = check_controls(data.trials, data.metric, data.direction, knobs)
    n_done = len(data.completed())
    body = (f"<p>Each point is one completed trial's final {html.escape(data.metric)} (the mean over its "
            f"{data.spec.train.replicas} replica{'s' if data.spec.train.replicas > 1 else ''}); the error bar is the "
            f"{CONFIDENCE:.0%} Student-t interval of the mean over the trials with that value ({n_done} completed "
            "trials; pruned and failed ones are left out). Other knobs vary too, so an effect is averaged over them.</p>")
    if not data.searched:
        body += "<p>The sweep searched no knob.</p>"
    expansion_row = next((p.name for p in data.searched if p.name == "expansion.factor"),
                         next((p.name for p in data.searched if p.strategy in ("expansion", "controls")), None))
    for p in data.searched:
        image, rows = _effect_plot(data, p, folder)
        body += f'<h3>{html.escape(p.name)}</h3><div class="row"><div>{_img(image, f"effect of {p.name}")}'
        stopped = _stopped_by_value(data, p)
        header = ["value", f"mean {data.metric} [{CONFIDENCE:.0%} interval] (n)"] + (["not completed"] if stopped else [])
        body += _table(header, [(label, str(iv), *([stopped.get(label, "")] if stopped else [])) for label, iv in rows])
        body += "</div>"
        if p.name == expansion_row and checks:
            body += "<div>" + _controls_html(checks, data, folder) + "</div>"
        body += "</div>"
    if checks and expansion_row is None:
        body += "<h3>controls</h3>" + _controls_html(checks, data, folder)
    if not checks:
        body += "<p class=\"muted\">No completed trial expanded its input, so there is no gain for a control to explain.</p>"
    return _section("effects", "Effect of each knob, with its controls", body)


def _controls_html(checks: list[ControlCheck], data: SweepData, folder: Path) -> str:
    image = _controls_plot(checks, data.metric, folder)
    out = _img(image, "gain of the expansion and of its controls")
    out += (f"<p>Gain = mean {html.escape(data.metric)} of the trials minus that of the unexpanded baseline (factor 1, "
            f"no control), with a {CONFIDENCE:.0%} Welch interval; + is better. Expansion: "
            f"{html.escape(str(checks[0].gain))}.</p><ul>")
    for c in checks:
        cls = "flag" if c.reproduces else "ok" if c.reproduces is False else "muted"
        gain = str(c.control_gain) if c.control_gain.n else "no trials"
        out += (f'<li><b>{html.escape(c.label)}</b>: gain {html.escape(gain)} — '
                f'<span class="{cls}">{html.escape(c.verdict)}</span></li>')
    return out + "</ul>"


def _importance_section(data: SweepData, folder: Path) -> str:
    if data.importances:
        rows = sorted(data.importances.items(), key=lambda kv: -kv[1])
        body = f'<div class="row">{_img(_importance_plot(data.importances, folder), "parameter importance")}'
        body += _table(["knob", "importance"], rows) + "</div>"
        body += "<p class=\"muted\">How much of the variation of the final metric each knob explains (Optuna's fANOVA over completed trials).</p>"
    else:
        body = f"<p>{html.escape(data.importance_note)}</p>"
    return _section("importance", "Parameter importance", body)


def _curves_section(data: SweepData, folder: Path) -> str:
    if not any(t.curve for t in data.trials):
        return _section("curves", "Learning curves", "<p>No per-epoch values were recorded.</p>")
    body = (f"<p>{html.escape(data.metric)} after each epoch: the top {min(CURVES, len(data.ranked()))} trials in colour, "
            "pruned trials dashed.</p>" + _img(_curves_plot(data, folder), "learning curves"))
    return _section("curves", "Learning curves", body)


def _score_section(data: SweepData, folder: Path) -> str:
    image, sentence = _score_plot(data, folder)
    body = f"<p>{html.escape(sentence)}</p>"
    if image:
        body += _img(image, f"{SCORE} against the final metric")
    return _section("score", f"{SCORE} against the final {data.metric}", body)


def _compute_section(data: SweepData) -> str:
    c = compute_spent(data)
    share = c.epochs_run / c.epochs_full if c.epochs_full else 0.0
    body = _table(["completed", "pruned", "failed", "total"],
                  [(c.counts["COMPLETE"], c.counts["PRUNED"], c.counts["FAIL"], len(data.trials))])
    body += (f"<p>Epochs run: <b>{c.epochs_run}</b> of the {c.epochs_full} that running every trial for all "
             f"{data.spec.train.epochs} epochs would take ({share:.0%}); the trials ran {c.seconds_run:.0f} s in all. ")
    if c.counts["PRUNED"]:
        body += (f"Pruning saved <b>{c.epochs_saved} epochs</b> (about {c.seconds_saved:.0f} s at the pruned trials' "
                 "own pace).</p>")
    else:
        body += f"No trial was pruned (pruner: {html.escape(data.spec.search.pruner)}), so pruning saved nothing.</p>"
    failed = [t for t in data.trials if t.state == "FAIL"]
    if failed:
        body += "<p>Failed trials:</p>" + _table(["trial", "reason"], [(t.number, t.reason[:200]) for t in failed])
    return _section("compute", "Trials and compute", body)


def _mlflow_section(data: SweepData) -> str:
    if data.tracking_note:
        return _section("mlflow", "MLflow", f"<p>{html.escape(data.tracking_note)}</p>")
    body = (f"<p>Parent run <code>{_e(data.parent_run_id)}</code> in <code>{_e(data.tracking_uri)}</code>; this report is "
            "attached to it as artifacts under <code>report/</code>. Open the UI with</p>"
            f"<pre>mlflow ui --backend-store-uri {html.escape(str(data.tracking_uri))}</pre>"
            "<p>select the trial runs and press <i>Compare</i> for parallel-coordinates, scatter and contour charts "
            f"over the <code>&lt;strategy&gt;.&lt;knob&gt;</code> parameters and <code>final.{html.escape(data.metric)}</code>.</p>")
    return _section("mlflow", "MLflow", body)


def render(data: SweepData, folder: Path) -> str:
    """Write the plots into ``folder`` and return the page that shows them."""
    spec = data.spec
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = (f"<h1>sbsearch report: {html.escape(spec.name)}</h1><p class=\"muted\">{len(data.trials)} trials on "
            f"{html.escape(spec.data.dataset)} with {html.escape(spec.model.name)}, {spec.train.epochs} epochs each, "
            f"{html.escape(spec.search.sampler)} sampler, pruner {html.escape(spec.search.pruner)}; objective: "
            f"{html.escape(data.direction)} {html.escape(data.metric)}. Folder <code>{html.escape(str(data.out_dir))}</code>; "
            f"written {when}.</p>")
    parts = [head, _best_section(data), _top_section(data), _effects_section(data, folder),
             _importance_section(data, folder), _curves_section(data, folder), _score_section(data, folder),
             _compute_section(data), _mlflow_section(data)]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>sbsearch report: {html.escape(spec.name)}</title><style>{_CSS}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")


def write_report(out_dir: Path, tracking_uri: str | None = None, parent_run_id: str | None = None) -> Path:
    """Write ``out_dir/report/index.html`` with its PNG plots, and log them to the sweep's MLflow parent run.

    Args:
        out_dir: the sweep's ``--out`` folder.
        tracking_uri: the MLflow store (default: the spec's, else ``mlflow.db`` under ``out_dir`` or here).
        parent_run_id: the sweep's parent run (default: found by the sweep's key).

    Returns:
        The path of ``index.html``.

    Example:
        >>> page = write_report(Path("out"))
        >>> page.name
        'index.html'
    """
    data = load_sweep(Path(out_dir), tracking_uri, parent_run_id)
    folder = data.out_dir / "report"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("*.png"):  # a knob no longer searched leaves no stale plot behind
        old.unlink()
    page = folder / "index.html"
    tmp = folder / "index.html.tmp"
    tmp.write_text(render(data, folder), encoding="utf-8")
    tmp.replace(page)
    if data.parent_run_id is not None and data.tracking_uri is not None:
        tracker = Tracker(TrackingTarget(data.tracking_uri, data.spec.tracking.experiment or data.spec.name,
                                         (data.out_dir / "mlartifacts").as_uri()))
        tracker.log_artifacts(data.parent_run_id, folder, "report")
    return page
