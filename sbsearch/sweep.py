"""A whole sweep: lock the output folder, open the records, run the backend, write the results.

Results of a sweep in ``out_dir``: ``spec.yaml`` (the resolved spec), ``optuna.journal`` (the study),
``trials.csv`` (one row per trial) and, by default, ``mlflow.db`` with ``mlartifacts/``.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import json
import math
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml
from rich.console import Console

from sbsearch.backends import SweepInterrupted, get_backend
from sbsearch.data import DATASETS
from sbsearch.errors import Problem, SbsearchError, SpecError
from sbsearch.logs import log_to_file, metric_text
from sbsearch.progress import SweepDisplay, top_table
from sbsearch.space import trial_budget
from sbsearch.spec import Spec, parse_spec, spec_to_dict
from sbsearch.study import JOURNAL, Store, new_owner, redact, same_sweep_changes, storage_url
from sbsearch.tracking import Tracker, TrackingTarget, default_tracking_uri
from sbsearch.trial import SweepContext, TrialRecord, final_metrics

__all__ = ["HELD_OUT_TOP", "SweepResult", "chosen_on_validation", "repeated_networks", "run_sweep", "relog_sweep", "sweep_key", "tracking_info",
           "default_out_dir", "prepare_out_dir", "write_trials_csv"]

HELD_OUT_TOP = 5
"""How many configurations, chosen on validation, a finished sweep shows with their test-split numbers."""

# Files that only sbsearch writes into an output folder: one of them marks the folder as one.
_OUTPUT_MARKERS = ("tracking.json", JOURNAL, "trials.csv")


@dataclass
class SweepResult:
    """What a finished sweep reports: every counted trial, the best one and where things went."""

    spec: Spec
    out_dir: Path
    records: list[TrialRecord]
    metric: str
    direction: str
    tracking_uri: str | None
    parent_run_id: str | None
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    stopped_because: str | None = None  # the sweep stopped itself before its budget
    unlogged: list[int] = field(default_factory=list)  # trials the tracking store did not take
    tracking_error: str = ""  # the store failed while the sweep's parent run was closed

    @property
    def best(self) -> TrialRecord | None:
        chosen = self.chosen
        return chosen[0] if chosen else None

    @property
    def chosen(self) -> list[TrialRecord]:
        """The top ``HELD_OUT_TOP`` completed trials on validation, the best first."""
        return chosen_on_validation(self.records, self.metric, self.direction)


def chosen_on_validation(records: list[TrialRecord], metric: str, direction: str,
                         top: int = HELD_OUT_TOP) -> list[TrialRecord]:
    """The ``top`` completed trials by their final validation ``metric``, the best first (ties: the lower
    trial number). These, and only these, are shown with their test-split numbers: the test split
    never takes part in choosing them.
    """
    sign = 1 if direction == "maximize" else -1
    done = [r for r in records if r.state == "COMPLETE" and metric in r.final and math.isfinite(r.final[metric])]
    repeats = repeated_networks(done)  # a repeat of an earlier trial's network is shown once
    distinct = [r for r in done if r.number not in repeats]
    return sorted(distinct, key=lambda r: (-sign * r.final[metric], r.number))[:top]


class _Finished(Protocol):
    """A trial as the store's record (``TrialRecord``) and the report (``TrialData``) both hold it."""

    @property
    def number(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def final(self) -> Mapping[str, float]: ...
    @property
    def epochs_run(self) -> int: ...


def repeated_networks(trials: Iterable[_Finished]) -> dict[int, int]:
    """Trial number -> the earlier completed trial whose network it trained again, for each such repeat.

    Every trial of a sweep uses the same seeds, so a configuration met again (a grid cell whose differing
    knobs do not apply, a configuration the sampler suggests twice) trains the same network and gives the
    same numbers to the last bit: every final metric, after as many epochs. Rankings and statistics count
    it once. A trial with fewer than two final metrics is never taken for a repeat: two networks can tie
    on an accuracy, never on a loss, a spread and a score at once.
    """
    first: dict[tuple[Any, ...], int] = {}
    repeats = {}
    for t in sorted(trials, key=lambda t: t.number):
        if t.state != "COMPLETE" or len(t.final) < 2:
            continue
        key = (tuple(sorted(t.final.items())), t.epochs_run)
        if key in first:
            repeats[t.number] = first[key]
        else:
            first[key] = t.number
    return repeats


def _heldout(result: SweepResult) -> dict[int, tuple[int, dict[str, float]]]:
    """Trial number -> (rank on validation, test-split numbers) of the chosen trials that have them."""
    return {r.number: (rank, r.test) for rank, r in enumerate(result.chosen, start=1) if r.test}


def public_spec(spec: Spec) -> dict[str, Any]:
    """The resolved spec as written to ``OUT/spec.yaml`` and MLflow: the storage URL without its password."""
    resolved = spec_to_dict(spec)
    if resolved["search"].get("storage"):
        resolved["search"]["storage"] = redact(resolved["search"]["storage"])
    return resolved


def default_out_dir(spec: Spec) -> Path:
    return Path("sbsearch-runs") / spec.name


def prepare_out_dir(out_dir: Path, flag: str = "--out") -> Path:
    """Create the output folder (and its parents) and check that it can be written, before any work.

    Raises:
        SpecError: one line naming ``flag``, when the path is a file, lies under one, or cannot be
            created or written (a read-only or missing mount, no permission).
    """
    rule = "must be a folder that sbsearch can create and write"
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError([Problem(flag, rule, str(out_dir), "it is an existing file; choose a folder")])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as exc:
        raise SpecError([Problem(flag, rule, str(out_dir), f"{type(exc).__name__}: {exc.strerror or exc}")]) from None
    return out_dir.resolve()


@contextlib.contextmanager
def _sweep_lock(out_dir: Path) -> Iterator[None]:
    handle = open(out_dir / ".sweep.lock", "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SbsearchError(f"--out: another sbsearch run is using {out_dir}; wait for it or choose another --out") from None
        yield
    finally:
        handle.close()


def _check_same_sweep(out_dir: Path, resolved: dict[str, Any]) -> None:
    path = out_dir / "spec.yaml"
    if not path.exists():
        return
    if not any((out_dir / marker).exists() for marker in _OUTPUT_MARKERS):
        # The user's own spec.yaml (or someone else's folder): sbsearch would overwrite it.
        raise SbsearchError(f"--out: {out_dir} is not an sbsearch output folder (it holds a spec.yaml that sbsearch "
                            "did not write); choose a new or empty folder for --out, for example "
                            f"{out_dir / 'runs'}")
    old = yaml.safe_load(path.read_text(encoding="utf-8"))
    # A key that a newer sbsearch added is absent from an older sweep's spec: at its default it changes
    # nothing, if it is one that leaves what a trial trains on and how alone (not data.test_fraction).
    changed = same_sweep_changes(old, resolved)
    if changed:
        raise SbsearchError(f"--out: {out_dir} holds a different sweep (its spec differs at {', '.join(changed[:5])}); "
                            "resume it with its own spec or choose another --out")


def write_trials_csv(path: Path, records: list[TrialRecord], searched: list[str],
                     heldout: dict[int, tuple[int, dict[str, float]]] | None = None) -> None:
    """One row per trial: number, state, parameters, final metrics, epochs run, seconds, start-up seconds, reason.

    ``seconds`` is the trial's own time; ``startup_seconds`` what its worker process spent on its
    one-time set-up during it (nonzero only for a worker's first trial, see ``TrialRecord``).

    ``heldout`` (trial number -> (rank on validation, test-split numbers)) fills the ``heldout_rank``
    and ``test_*`` columns of the configurations the finished sweep chose; every other row leaves them
    empty.
    """
    heldout = heldout or {}
    metric_keys = sorted({k for r in records for k in r.final})
    test_keys = sorted({k for _, test in heldout.values() for k in test})
    columns = ["number", "state", *searched, *metric_keys, "heldout_rank", *test_keys, "epochs_run", "seconds",
               "startup_seconds", "reason", "mlflow_run_id"]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in sorted(records, key=lambda r: r.number):
            rank, test = heldout.get(r.number, (None, {}))
            writer.writerow([r.number, r.state, *[r.params.get(k, "") for k in searched],
                             *[_num(r.final.get(k)) for k in metric_keys], "" if rank is None else rank,
                             *[_num(test.get(k)) for k in test_keys], r.epochs_run, f"{r.seconds:.3f}",
                             f"{r.startup_seconds:.3f}", r.reason, r.run_id])
    tmp.replace(path)  # a reader never sees half a file


def _num(x: float | None) -> str:
    return "" if x is None else repr(float(x))


def run_sweep(spec: Spec, out_dir: Path | None = None, tracking_uri: str | None = None,
              console: Console | None = None, track: bool = True) -> SweepResult:
    """Run (or resume) a sweep and write its results.

    Args:
        spec: the validated spec (command-line overrides already applied).
        out_dir: where the study, ``trials.csv`` and the resolved spec go (default ``sbsearch-runs/<name>``).
        tracking_uri: MLflow URI; default ``spec.tracking.uri``, else ``sqlite:///mlflow.db`` in the
            working directory, or under ``out_dir`` when it was given.
        console: where the progress display and the summary go.
        track: log to MLflow (turned off only by tests of other parts).

    Raises:
        SbsearchError: when the records cannot be opened (before any training).
        SweepInterrupted: on Ctrl-C or SIGTERM, after saving state.

    Example:
        >>> result = run_sweep(load_spec("search_spaces/quickstart.yaml"), Path("out"))
        >>> result.best.params
        {'expansion.factor': 1, ...}
    """
    console = console or Console()
    start = time.perf_counter()
    explicit_out = out_dir is not None
    out = (out_dir if out_dir is not None else default_out_dir(spec)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_to_file(out)  # the frameworks' log lines and warnings go there, not into the live table
    metric, direction = DATASETS[spec.data.dataset].objective
    resolved = public_spec(spec)
    with _sweep_lock(out):
        _check_same_sweep(out, resolved)
        # Opened (created, or joined from another machine) before anything is logged: a storage that
        # cannot be reached, or a sweep there with another spec, stops the run here.
        owner = new_owner()
        store = Store.open(spec, out, direction, owner=owner, resolved=resolved)
        spec_yaml = yaml.safe_dump(resolved, sort_keys=False)
        (out / "spec.yaml").write_text(spec_yaml, encoding="utf-8")
        target, parent = None, None
        uri = tracking_uri or spec.tracking.uri or default_tracking_uri(out if explicit_out else None)
        tracker: Tracker | None = None
        saved = tracking_info(out)
        # A new id each time a folder starts a sweep: a sweep begun again in a deleted and recreated
        # folder gets a new MLflow parent run instead of reusing the old sweep's runs.
        sweep_id = saved.get("sweep_id") if saved.get("storage") or (out / JOURNAL).exists() else None
        info = {"uri": uri, "experiment": spec.tracking.experiment or spec.name, "sweep_id": sweep_id or uuid.uuid4().hex[:12],
                "storage": redact(store.url)}
        (out / "tracking.json").write_text(json.dumps(info), encoding="utf-8")
        if track:
            target = TrackingTarget(uri, spec.tracking.experiment or spec.name, (out / "mlartifacts").as_uri())
            tracker = Tracker(target)
            tracker.check_reachable()
            parent = tracker.start_sweep(spec.name, resolved, sweep_key=sweep_key(spec, out), spec_yaml=spec_yaml,
                                         study_id=store.study_id)
        threads = spec.train.threads or max(1, (os.cpu_count() or 1) // spec.search.parallel)
        ctx = SweepContext(spec, out, target, parent, threads, owner=owner, study_id=store.study_id)
        budget = trial_budget(spec)
        searched = [p.name for p in spec.searched]
        try:
            backend = get_backend(spec.search.backend)
            with store.heartbeats(spec.search.stale_after), SweepDisplay(console, budget, metric, direction) as display:
                records = backend.run(ctx, display)
        except BaseException as exc:
            if isinstance(exc, SweepInterrupted) and tracker is not None and parent is not None:
                tracker.client.set_terminated(parent, status="KILLED")
            # Whatever stopped the sweep, what finished is on disk in a form people can open
            # (a sweep that ends normally writes trials.csv from its records below).
            with contextlib.suppress(Exception):
                write_trials_csv(out / "trials.csv", store.records(), searched)
            raise
        result = SweepResult(spec, out, records, metric, direction, uri if track else None, parent,
                             time.perf_counter() - start)
        result.counts = {s: sum(r.state == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL")}
        result.stopped_because = backend.stopped_because
        result.unlogged = [r.number for r in records if track and not r.logged]
        write_trials_csv(out / "trials.csv", records, searched, _heldout(result))
        try:
            _close_parent(tracker, parent, result)
        except Exception as exc:  # the store went away: the results are safe in the study and trials.csv
            result.tracking_error = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
    return result


def _close_parent(tracker: Tracker | None, parent: str | None, result: SweepResult) -> None:
    """The sweep's summary metrics and files on its MLflow parent run."""
    if tracker is None or parent is None:
        return
    records, metric = result.records, result.metric
    best = result.best
    summary: dict[str, float] = {f"trials_{s.lower()}": float(n) for s, n in result.counts.items()}
    summary["trials_total"] = float(len(records))
    summary["epochs_total"] = float(sum(r.epochs_run for r in records))
    summary["sweep_seconds"] = result.seconds
    tags = {"sbsearch.state": "STOPPED" if result.stopped_because else "FINISHED"}
    if best is not None:
        summary[f"best_{metric}"] = best.final[metric]
        summary["best_trial"] = float(best.number)
        summary.update({f"best_{k}": v for k, v in best.test.items()})
        tags["sbsearch.best_params"] = str(best.params)
    for number, (rank, test) in _heldout(result).items():
        # Looked up rather than taken from the record: relog gives a trial a new run.
        for run in tracker.runs_of_trial(parent, number)[:1]:
            tracker.log_heldout(run.info.run_id, rank, test)
    tracker.log_artifact(parent, result.out_dir / "trials.csv")
    tracker.end_sweep(parent, summary, tags, status="FAILED" if result.stopped_because else "FINISHED")


def tracking_info(out_dir: Path) -> dict[str, str]:
    """What ``out_dir/tracking.json`` says of the sweep's MLflow store: uri, experiment, sweep_id."""
    path = out_dir / "tracking.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def sweep_key(spec: Spec, out_dir: Path) -> str:
    """The tag that finds a sweep's MLflow parent run: its name, its folder and the folder's sweep id."""
    sweep_id = tracking_info(out_dir.resolve()).get("sweep_id")
    base = f"{spec.name}@{out_dir.resolve()}"
    return f"{base}#{sweep_id}" if sweep_id else base


def relog_sweep(out_dir: Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Write to MLflow what a sweep's study holds and the store does not (after the store was down).

    Trials whose child run already carries their final state are left alone, so relogging twice
    changes nothing. Returns (trials written, trials already there).
    """
    from sbsearch.spec import load_spec

    out = out_dir.resolve()
    if not (out / "spec.yaml").exists():
        raise SbsearchError(f"OUT_DIR: must be a sweep's output folder (with spec.yaml), but got {str(out_dir)!r}")
    spec = load_spec(out / "spec.yaml")
    saved = tracking_info(out)
    uri = tracking_uri or saved.get("uri") or default_tracking_uri(out)
    store = Store.load(spec, out)
    records = store.records() if store is not None else []
    with _sweep_lock(out):
        target = TrackingTarget(uri, saved.get("experiment") or spec.tracking.experiment or spec.name,
                                (out / "mlartifacts").as_uri())
        tracker = Tracker(target)
        tracker.check_reachable()
        resolved = public_spec(spec)
        parent = tracker.start_sweep(spec.name, resolved, sweep_key=sweep_key(spec, out),
                                     spec_yaml=yaml.safe_dump(resolved, sort_keys=False),
                                     study_id=store.study_id if store is not None else "")
        done = {run.data.tags.get("sbsearch.trial_number"): run.data.tags.get("sbsearch.state")
                for run in tracker.trial_runs(parent)}
        written = 0
        for r in records:
            if done.get(str(r.number)) == r.state:
                continue
            from sbsearch.space import config_from_params
            from sbsearch.trial import trial_run_name

            config = config_from_params(spec, {**{p.name: None for p in spec.space}, **r.params})
            run_id = tracker.start_trial(parent, r.number, config.params, trial_run_name(r.number, config))
            now = int(time.time() * 1000)
            tracker.end_trial(run_id, r.state, final_metrics(r), {"sbsearch.reason": r.reason} if r.reason else {},
                              epochs=[(epoch, now, metrics) for epoch, metrics in enumerate(r.history, start=1)])
            written += 1
        metric, direction = DATASETS[spec.data.dataset].objective
        result = SweepResult(spec, out, records, metric, direction, uri, parent, 0.0)
        result.counts = {s: sum(r.state == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL")}
        write_trials_csv(out / "trials.csv", records, [p.name for p in spec.searched], _heldout(result))
        _close_parent(tracker, parent, result)
    return written, len(records) - written


def print_summary(result: SweepResult, console: Console) -> None:
    """The top trials (chosen on validation, measured on test), the best configuration, and where to look next."""
    rows = [{"number": r.number, result.metric: r.final[result.metric], "epochs_run": r.epochs_run,
             "seconds": r.seconds, **r.test, **r.params} for r in result.chosen]
    test_metric = "test_" + result.metric.removeprefix("val_")
    has_test = any(test_metric in r.test for r in result.chosen)
    searched = [p.name for p in result.spec.searched]
    c = result.counts
    console.print(f"\n[bold]{result.spec.name}[/bold]: {len(result.records)} trials in {result.seconds:.0f} s — "
                  f"{c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed")
    if rows:
        console.print(top_table(rows, result.metric, searched, limit=HELD_OUT_TOP,
                                test_metric=test_metric if has_test else None))
    best = result.best
    if best is not None:
        held_out = (f", held-out {test_metric} = {metric_text(best.test[test_metric])}" if test_metric in best.test else
                    ", no test split" if not has_test else "")
        console.print(f"[bold]Best configuration[/bold] (trial {best.number}, {result.metric} = "
                      f"{metric_text(best.final[result.metric])}{held_out}):")
        for k in searched:
            console.print(f"  {k}: {best.params.get(k)}", highlight=False)
    console.print(f"Results: {result.out_dir}/trials.csv, study {redact(storage_url(result.spec, result.out_dir))}",
                  highlight=False)
    if result.unlogged or result.tracking_error:
        which = f"trials {', '.join(map(str, result.unlogged))}" if result.unlogged else "the sweep's summary"
        console.print(f"[bold red]The MLflow store failed[/bold red] ({result.tracking_error or 'during the sweep'}): "
                      f"{which} are safe in trials.csv and the study but not in MLflow. When the store is back, run:\n"
                      f"  sbsearch relog {result.out_dir}" + (f" --tracking-uri {result.tracking_uri}" if result.tracking_uri else ""),
                      highlight=False)
    if result.tracking_uri:
        console.print(f"MLflow:  mlflow ui --backend-store-uri {result.tracking_uri}   (then open http://127.0.0.1:5000)",
                      highlight=False)
