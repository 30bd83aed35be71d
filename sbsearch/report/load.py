"""What a sweep holds, as the report sees it: its trials from the sweep's study (the one store of them) and
their per-epoch ``sb_score`` from the sweep's MLflow store where it can be reached.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from sbsearch.data import DATASETS
from sbsearch.errors import SbsearchError, SpecError
from sbsearch.spec import ParamSpec, Spec, parse_spec
from sbsearch.study import Store
from sbsearch.sweep import HELD_OUT_TOP, repeated_networks, sweep_key, tracking_info
from sbsearch.tracking import Tracker, TrackingTarget
from sbsearch.trial import TrialRecord

MIN_TRIALS_FOR_IMPORTANCE = 5
SCORE = "sb_score"


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
    # The earlier completed trial that trained this one's network exactly: every trial of a sweep uses the
    # same seeds, so a configuration met again (a grid cell whose differing knobs do not apply, a repeat
    # that TPE suggests) gives the same numbers, and statistics must count it once, not as new evidence.
    same_as: int | None = None

    @property
    def network(self) -> int:
        """The number that stands for this trial's network: its own, or that of the trial it repeats."""
        return self.number if self.same_as is None else self.same_as


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

    def distinct(self) -> list[TrialData]:
        """Completed trials, each network once: the repeats of an earlier trial (``same_as``) left out."""
        return [t for t in self.completed() if t.same_as is None]

    def repeats(self) -> list[TrialData]:
        """Completed trials that trained an earlier trial's network again, with the same numbers."""
        return [t for t in self.completed() if t.same_as is not None]

    def ranked(self) -> list[TrialData]:
        """Completed trials by the validation metric, the best first (ties: the lower trial number), as
        ``sweep.chosen_on_validation`` ranks them, each network once; the test split takes no part."""
        return sorted(self.distinct(), key=lambda t: (-self.sign * t.final[self.metric], t.number))

    @property
    def test_metric(self) -> str:
        return "test_" + self.metric.removeprefix("val_")

    def chosen(self) -> list[TrialData]:
        """The configurations chosen on validation that the report shows with their test-split numbers."""
        return self.ranked()[:HELD_OUT_TOP]


@dataclass(frozen=True)
class _Stored:
    """What the report reads from the sweep's study."""

    records: list[TrialRecord]
    curves: dict[int, dict[int, float]]  # trial -> epoch -> the objective it reported
    importances: Callable[[], dict[str, float]]  # fANOVA: computed only when the report shows it


def _read_study(spec: Spec, out_dir: Path) -> _Stored | None:
    """The sweep's trials from its study, or None when there is none: the report's one read of the store."""
    store = Store.load(spec, out_dir)
    if store is None:
        return None
    return _Stored(store.records(), store.learning_curves(), store.param_importances)


def _read_spec(out_dir: Path) -> Spec:
    path = out_dir / "spec.yaml"
    if not path.exists():
        raise SbsearchError(f"out_dir: must be a sweep's output folder (with spec.yaml), but got {str(out_dir)!r}")
    try:
        return parse_spec(yaml.safe_load(path.read_text(encoding="utf-8")))
    except SpecError as exc:
        raise SbsearchError(f"{path}: the sweep's resolved spec no longer validates ({exc.problems[0]})") from None


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


@dataclass(frozen=True)
class _Tracked:
    """What the report finds of the sweep in MLflow."""

    uri: str | None
    parent_run_id: str | None
    scores: dict[str, dict[int, float]]  # run id -> epoch -> sb_score
    note: str  # why the report is not logged to MLflow, or "" when it is


def _read_mlflow(spec: Spec, out_dir: Path, tracking_uri: str | None, parent_run_id: str | None) -> _Tracked:
    uri = _tracking_uri(spec, out_dir, tracking_uri)
    if uri is None:
        return _Tracked(None, None, {}, "No MLflow store was found for this sweep (pass --tracking-uri); the "
                        "report is not logged to MLflow.")
    scores: dict[str, dict[int, float]] = {}
    try:
        artifacts = (out_dir / "mlartifacts").as_uri()
        tracker = Tracker(TrackingTarget(uri, spec.tracking.experiment or spec.name, artifacts))
        parent_run_id = parent_run_id or tracker.find_sweep(sweep_key(spec, out_dir))
        if parent_run_id is None:
            return _Tracked(uri, None, {}, f"The sweep's parent run was not found in {uri}; the report is not "
                            "logged to MLflow.")
        for run in tracker.trial_runs(parent_run_id):
            if SCORE in run.data.metrics:
                scores[run.info.run_id] = tracker.metric_history(run.info.run_id, SCORE)
    except Exception as exc:  # noqa: BLE001 - the report is still worth having without MLflow
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return _Tracked(uri, None, {}, f"MLflow at {uri} could not be read ({first[:160]}); histories from it "
                        "are missing.")
    return _Tracked(uri, parent_run_id, scores, "")


def _trial_data(record: TrialRecord, metric: str, fixed: Mapping[str, Any], reported: Mapping[int, float],
           scores: Mapping[int, float]) -> TrialData:
    # Per-epoch metrics: the trial's own record, else what it reported to the study, else MLflow's history.
    curve = {i + 1: h[metric] for i, h in enumerate(record.history) if metric in h} or dict(reported)
    score = {i + 1: h[SCORE] for i, h in enumerate(record.history) if SCORE in h} or dict(scores)
    final = record.final
    if record.state == "COMPLETE" and metric in final and record.epochs_run and record.epochs_run not in curve:
        curve[record.epochs_run] = final[metric]  # the last epoch, when the trial stopped reporting before it
    return TrialData(record.number, record.state, {**fixed, **record.params}, final, record.epochs_run,
                     record.seconds, record.reason or "", record.run_id or "", curve, score, dict(record.test or {}))


def mark_repeats(trials: Iterable[TrialData]) -> tuple[TrialData, ...]:
    """The trials by number, each completed repeat of an earlier trial's network marked (``same_as``)."""
    ordered = sorted(trials, key=lambda t: t.number)
    repeats = repeated_networks(ordered)
    return tuple(replace(t, same_as=repeats[t.number]) if t.number in repeats else t for t in ordered)


def one_per_network(trials: Iterable[TrialData]) -> list[TrialData]:
    """The trials with each network once (the first met), for statistics over a group of trials."""
    seen: set[int] = set()
    out = []
    for t in trials:
        if t.network not in seen:
            seen.add(t.network)
            out.append(t)
    return out


def _importances(spec: Spec, stored: _Stored, trials: tuple[TrialData, ...]) -> tuple[dict[str, float] | None, str]:
    """Optuna's parameter importance, or None with the sentence that says why there is none."""
    n_done = sum(t.state == "COMPLETE" for t in trials)
    if len(spec.searched) < 2:
        return None, "Parameter importance needs at least two searched knobs."
    if n_done < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"Parameter importance needs at least {MIN_TRIALS_FOR_IMPORTANCE} completed trials; this sweep "
                      f"has {n_done}.")
    try:
        return stored.importances(), ""
    except Exception as exc:  # noqa: BLE001 - e.g. every completed trial shares one value of a knob
        return None, f"Optuna could not compute parameter importance: {str(exc)[:200]}"


def load_sweep(out_dir: Path, tracking_uri: str | None = None, parent_run_id: str | None = None) -> SweepData:
    """Gather a sweep's trials from its study, and per-epoch histories from MLflow where it can be reached.

    Args:
        out_dir: the sweep's ``--out`` folder.
        tracking_uri: the MLflow store (default: the spec's, else ``mlflow.db`` under ``out_dir`` or here).
        parent_run_id: the sweep's parent run (default: found by the sweep's key).

    Raises:
        SbsearchError: when ``out_dir`` holds no sweep, or its study no finished trial.
    """
    out_dir = out_dir.resolve()
    spec = _read_spec(out_dir)
    metric, direction = DATASETS[spec.data.dataset].objective
    stored = _read_study(spec, out_dir)
    if stored is None:
        raise SbsearchError(f"out_dir: {out_dir} holds the spec of the sweep {spec.name!r}, but its study (where "
                            "the sweep keeps its trials) was not found")
    if not stored.records:
        raise SbsearchError(f"out_dir: {out_dir} holds no finished trials yet")
    tracked = _read_mlflow(spec, out_dir, tracking_uri, parent_run_id)
    fixed = {p.name: p.values[0] for p in spec.space if not p.searched}
    trials = mark_repeats(_trial_data(r, metric, fixed, stored.curves.get(r.number) or {},
                                      tracked.scores.get(r.run_id, {})) for r in stored.records)
    importances, importance_note = _importances(spec, stored, trials)
    return SweepData(spec, out_dir, metric, direction, trials, importances, importance_note, tracked.uri,
                     tracked.parent_run_id, tracked.note)
