"""The Optuna backend: ask/tell over a journal file storage, with trials in threads or processes.

The storage under ``--out`` is the sweep's source of truth: it holds every trial's parameters, the
metric after each epoch and the trial's full record (``sbsearch.record``), so the same command resumes
an interrupted sweep. Only this module imports Optuna.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from sbsearch.backends.base import STOP_SIGNALS, Backend, ProgressSink, StopSignals, SweepInterrupted, TrialView
from sbsearch.data import DATASETS
from sbsearch.errors import SbsearchError
from sbsearch.pruning import PeerTrial, rule_for
from sbsearch.space import config_from_params, grid_values, sample_config, trial_budget
from sbsearch.spec import Spec
from sbsearch.tracking import Tracker
from sbsearch.trial import Interrupted, SweepContext, TrialRecord, run_trial

__all__ = ["OptunaBackend", "open_study", "records_from_study", "load_study", "learning_curves", "param_importances"]

_STATES = {TrialState.COMPLETE: "COMPLETE", TrialState.PRUNED: "PRUNED", TrialState.FAIL: "FAIL",
           TrialState.RUNNING: "RUNNING", TrialState.WAITING: "WAITING"}
_INTERRUPTED = "sbsearch.interrupted"
_RECORD = "sbsearch.record"


class _OptunaSuggest:
    """Adapts an Optuna trial to the backend-neutral ``Suggest`` protocol."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def categorical(self, name: str, choices: tuple[Any, ...]) -> Any:
        return self.trial.suggest_categorical(name, list(choices))

    def float(self, name: str, low: float, high: float, log: bool, step: float | None) -> float:
        return self.trial.suggest_float(name, low, high, log=log, step=step)

    def int(self, name: str, low: int, high: int, log: bool, step: int) -> int:
        return self.trial.suggest_int(name, low, high, log=log, step=step)


def storage_path(out_dir: Path) -> Path:
    return out_dir / "optuna.journal"


def _sampler(spec: Spec, first: int) -> optuna.samplers.BaseSampler:
    """The spec's sampler, seeded by the spec's seed and ``first``, the trial it samples first.

    The Optuna backend makes a fresh one for every trial, so trial n's values depend on
    (seed, n) and the trials it sees, never on which worker asked or when.
    """
    if spec.search.sampler == "grid":
        # The grid sampler shuffles the grid with its seed and gives trial n the n-th cell: every
        # trial of the sweep must see the same order, or cell n would differ from trial to trial.
        grid_seed = int(np.random.SeedSequence([spec.seed]).generate_state(1)[0])
        return optuna.samplers.GridSampler(grid_values(spec) or {"_": [0]}, seed=grid_seed)
    seed = int(np.random.SeedSequence([spec.seed, first]).generate_state(1)[0])
    if spec.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = min(10, max(4, spec.search.trials // 4))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)


class _Chosen(optuna.samplers.BaseSampler):
    """Gives the sweep's trial the values drawn for it on the replay study (none at all while the trial
    is being claimed), so the storage records exactly what was sampled."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = dict(values)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, Any]) -> dict[str, Any]:
        return {}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: Any) -> Any:
        assert param_name in self.values, f"{param_name} was not sampled on the replay study"
        return self.values[param_name]


def open_study(spec: Spec, out_dir: Path, direction: str) -> optuna.Study:
    """Create or load the sweep's study in the journal file under ``out_dir``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(storage_path(out_dir))))
    study = optuna.create_study(storage=storage, study_name=spec.name, direction=direction,  # type: ignore[arg-type]
                                load_if_exists=True)
    study.sampler = _sampler(spec, len(study.get_trials(deepcopy=False)))
    if study.direction.name.lower() != direction:
        raise SbsearchError(f"--out: the study {spec.name!r} in {out_dir} must {direction} its metric, but it was "
                            f"created to {study.direction.name.lower()}; use another --out or name")
    return study


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if not t.user_attrs.get(_INTERRUPTED) and t.state != TrialState.WAITING]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _metric_name(ctx: SweepContext) -> str:
    return DATASETS[ctx.spec.data.dataset].objective[0]


def _direction(ctx: SweepContext) -> str:
    return DATASETS[ctx.spec.data.dataset].objective[1]


def _tell(study: optuna.Study, trial: optuna.Trial | int, value: float | None = None,
          state: TrialState | None = None) -> None:
    try:
        study.tell(trial, value, state=state)
    except RuntimeError as exc:
        # The grid sampler calls study.stop() when the grid is used up, which only works inside
        # study.optimize; the trial's state is stored before that, and the budget ends the sweep.
        if "Study.stop" not in str(exc):
            raise


_HISTORY = "sbsearch.history"  # a running trial's metrics after each epoch, so that rules can see them


def _as_peer(t: FrozenTrial, metric: str, number: int | None = None) -> PeerTrial:
    """A trial as the pruning rule sees it, under ``number`` when given (its slot in the fixed schedule)."""
    stored = t.user_attrs.get(_RECORD)
    history = stored["history"] if stored and stored.get("history") else t.user_attrs.get(_HISTORY, [])
    curve = {epoch + 1: dict(metrics) for epoch, metrics in enumerate(history)}
    for epoch, value in t.intermediate_values.items():  # a trial recorded without its history
        curve.setdefault(epoch, {metric: value})
    final = t.value if t.state == TrialState.COMPLETE else None
    return PeerTrial(t.number if number is None else number, _STATES.get(t.state, t.state.name), curve, final)


def _peers(study: optuna.Study, exclude: int, metric: str) -> list[PeerTrial]:
    """Every other counted trial with its metrics after each epoch, for the pruning rule."""
    return [_as_peer(t, metric) for t in _counted(study.get_trials(deepcopy=False)) if t.number != exclude]


# --- the fixed schedule -----------------------------------------------------------------------------------
# Every trial holds a slot: 0, 1, 2, ... in the order trials are claimed (a trial requeued after an
# interruption keeps its original's). In the fixed schedule the trial in slot n is claimed only once
# slots 0..n-lag are finished and slots n-lag+1..n-1 have their values; it samples on a replay study that
# holds exactly those trials (the later ones as running, whatever they have done since) with a sampler
# seeded by (seed, n), and its pruning rule sees slots 0..n-lag. So what it tries and how it is judged
# follow from the spec alone, not from timing or from which worker runs it.

_SLOT = "sbsearch.slot"
_TURN_POLL_SECONDS = 0.1


def _slot(t: FrozenTrial) -> int:
    return int(t.user_attrs.get(_SLOT, t.number))


def _slots(trials: list[FrozenTrial]) -> dict[int, FrozenTrial]:
    """The trial holding each slot; an interrupted trial has given its slot to its requeued copy."""
    return {_slot(t): t for t in trials if not t.user_attrs.get(_INTERRUPTED)}


def _free_slot(held: Mapping[int, FrozenTrial]) -> int:
    """The lowest slot that no trial holds: one an interruption freed before the trial had values, else the next."""
    return next(n for n in range(len(held) + 1) if n not in held)


def _turn_has_come(held: Mapping[int, FrozenTrial], slot: int, lag: int, names: set[str]) -> bool:
    """Whether the trial in ``slot`` may sample: slots up to ``slot - lag`` finished, the later ones
    holding every searched value (``names``)."""
    for n in range(slot):
        t = held.get(n)
        if t is None:
            return False
        if not t.state.is_finished() and (n <= slot - lag or not names <= t.params.keys()):
            return False
    return True


def _wait_for_turn(study: optuna.Study, slot: int, lag: int, names: set[str],
                   ended: Callable[[], bool]) -> dict[int, FrozenTrial] | None:
    """The trials in the slots before ``slot`` once its turn has come, or None if ``ended()`` first."""
    while True:
        held = _slots(study.get_trials(deepcopy=False))
        if _turn_has_come(held, slot, lag, names):
            return {n: held[n] for n in range(slot)}
        if ended():
            return None
        time.sleep(_TURN_POLL_SECONDS)


def replay_study(direction: str, held: Mapping[int, FrozenTrial], slot: int, lag: int) -> optuna.Study:
    """An in-memory study of what the trial in ``slot`` may see, in slot order: slots up to
    ``slot - lag`` as they finished (values, per-epoch values), the later ones as running, with their
    parameters only. Its trial numbers are the slots, so the next trial it asks for is ``slot``."""
    replay = optuna.create_study(direction=direction)  # type: ignore[arg-type]
    for n in range(slot):
        t = held[n]
        if n <= slot - lag:
            assert t.state.is_finished(), f"slot {n} must be finished before slot {slot} samples"
            replay.add_trial(optuna.trial.create_trial(
                state=t.state, value=t.value if t.state == TrialState.COMPLETE else None, params=t.params,
                distributions=t.distributions, intermediate_values=t.intermediate_values))
        else:
            replay.add_trial(optuna.trial.create_trial(state=TrialState.RUNNING, params=t.params,
                                                       distributions=t.distributions))
    return replay


def sample_on_replay(spec: Spec, direction: str, held: Mapping[int, FrozenTrial], slot: int, lag: int) -> dict[str, Any]:
    """The searched values of the trial in ``slot``, drawn by a sampler seeded by (seed, slot) from
    exactly the trials the schedule lets it see (``replay_study``)."""
    replay = replay_study(direction, held, slot, lag)
    replay.sampler = _sampler(spec, slot)
    trial = replay.ask()
    assert trial.number == slot
    sample_config(spec, _OptunaSuggest(trial))
    return dict(trial.params)


_STOPPED = "sbsearch.stopped"


def failures_in_a_row(study: optuna.Study, since: float) -> list[FrozenTrial]:
    """The failed trials at the end of the list of trials finished after ``since`` (a timestamp)."""
    finished = [t for t in _counted(study.get_trials(deepcopy=False))
                if t.datetime_complete is not None and t.datetime_complete.timestamp() >= since]
    finished.sort(key=lambda t: t.datetime_complete)  # type: ignore[arg-type,return-value]
    run: list[FrozenTrial] = []
    for t in reversed(finished):
        if t.state != TrialState.FAIL:
            break
        run.append(t)
    return run


def stop_reason(study: optuna.Study, since: float) -> str | None:
    """Why this run of the sweep stopped itself (too many failures in a row), if it did."""
    value = study.user_attrs.get(_STOPPED)
    return str(value["reason"]) if value and value.get("since") == since else None


def _worker_loop(ctx: SweepContext, deadline: float | None, stop: threading.Event | None, since: float = 0.0) -> None:
    """Ask for trials and run them until the budget, the deadline, a stop request or too many
    failures in a row end the sweep."""
    spec = ctx.spec
    direction = _direction(ctx)
    study = open_study(spec, ctx.out_dir, direction)
    rule = rule_for(spec, _metric_name(ctx), direction)
    budget = trial_budget(spec)
    fixed, lag = spec.search.fixed_schedule, spec.search.schedule_lag
    names = {p.name for p in spec.searched}

    def ended() -> bool:
        return ((stop is not None and stop.is_set()) or (deadline is not None and time.time() > deadline)
                or study.user_attrs.get(_STOPPED, {}).get("since") == since)

    while True:
        if stop is not None and stop.is_set():
            return
        with _file_lock(ctx.out_dir / ".claim.lock"):
            trials = study.get_trials(deepcopy=False)
            if len(_counted(trials)) >= budget:
                return
            if deadline is not None and time.time() > deadline:
                return
            if study.user_attrs.get(_STOPPED, {}).get("since") == since:
                return
            held = _slots(trials)
            slot = _free_slot(held)
            # A requeued trial (WAITING) goes first and has its values; a new one waits for its turn
            # unclaimed, so that an interruption never finds a claimed trial without values.
            requeued = any(t.state == TrialState.WAITING for t in trials)
            ready = requeued or not fixed or _turn_has_come(held, slot, lag, names)
            if ready:
                # The fixed schedule gives the trial its values below, from the replay study.
                study.sampler = _Chosen({}) if fixed else _sampler(spec, slot)
                trial = study.ask()
                slot = int(trial.user_attrs.get(_SLOT, slot))
                trial.set_user_attr(_SLOT, slot)
                trial.set_user_attr("sbsearch.pid", os.getpid())
        if not ready:
            time.sleep(_TURN_POLL_SECONDS)
            continue
        peers: list[PeerTrial] | None = None  # the fixed schedule's peers; free: whatever the study holds now
        try:
            if fixed:
                before = _wait_for_turn(study, slot, lag, names, ended)  # at once but for a requeued trial
                if before is None:
                    _mark_interrupted(ctx, study, trial.number, "the sweep ended before this trial's turn came")
                    return
                peers = [_as_peer(before[n], rule.metric, n) for n in range(slot - lag + 1)]
                if "sbsearch.requeued_from" not in trial.user_attrs:
                    study.sampler = _Chosen(sample_on_replay(spec, direction, before, slot, lag))
            config = sample_config(spec, _OptunaSuggest(trial))
        except KeyboardInterrupt:
            _mark_interrupted(ctx, study, trial.number, "the sweep was stopped before this trial started")
            return
        except Exception as exc:  # the sampler itself failed: record it, do not spin
            trial.set_user_attr(_RECORD, asdict(TrialRecord(trial.number, "FAIL", {}, reason=f"sampling: {exc}")))
            _tell(study, trial, state=TrialState.FAIL)
            continue

        history: list[dict[str, float]] = []

        def should_prune(epoch: int, metrics: Mapping[str, float], trial: optuna.Trial = trial,
                         history: list[dict[str, float]] = history, peers: list[PeerTrial] | None = peers,
                         slot: int = slot) -> str | None:
            value = metrics.get(rule.metric)
            if value is not None and math.isfinite(value):
                trial.report(value, epoch)
            # Per-layer scores stay out: peers' rules need the trial-level metrics only.
            history.append({k: v for k, v in metrics.items() if not k.startswith("sb_score.")})
            trial.set_user_attr(_HISTORY, history)
            if peers is not None:
                return rule.decide(epoch, metrics, peers, slot)
            return rule.decide(epoch, metrics, _peers(study, trial.number, rule.metric), trial.number)

        try:
            record = run_trial(ctx, trial.number, config, should_prune,
                               stop_requested=(stop.is_set if stop is not None else lambda: False))
        except (Interrupted, KeyboardInterrupt):
            _mark_interrupted(ctx, study, trial.number, "the sweep was stopped while this trial ran")
            return
        trial.set_user_attr(_RECORD, asdict(record))
        if record.state == "COMPLETE":
            _tell(study, trial, record.final[rule.metric])
        else:
            _tell(study, trial, state=TrialState.PRUNED if record.state == "PRUNED" else TrialState.FAIL)
        limit = spec.search.max_consecutive_failures
        if record.state == "FAIL" and limit:
            failed = failures_in_a_row(study, since)
            if len(failed) >= limit:
                study.set_user_attr(_STOPPED, {"since": since, "reason": (
                    f"search.max_consecutive_failures: the sweep stopped after {len(failed)} failed trials in a row "
                    f"(last: trial {record.number}, {record.reason[:200]}); fix the cause and run the same command to go on")})
                return


def _mark_interrupted(ctx: SweepContext, study: optuna.Study, number: int, why: str) -> None:
    """Record an unfinished trial as failed-and-interrupted and queue its configuration again in its
    slot, so the resumed sweep re-runs it; its MLflow run is deleted, since the re-run logs a fresh one.
    A trial interrupted before it had all its values gives its slot back instead."""
    frozen = study.get_trials(deepcopy=False)[number]
    storage = study._storage
    # Under the claim lock: no worker may take the slot between the interruption and the requeue.
    with _file_lock(ctx.out_dir / ".claim.lock"):
        storage.set_trial_user_attr(frozen._trial_id, _INTERRUPTED, why)
        with contextlib.suppress(Exception):  # already finished by a racing writer
            _tell(study, number, state=TrialState.FAIL)
        if frozen.params and {p.name for p in ctx.spec.searched} <= frozen.params.keys():
            study.enqueue_trial(dict(frozen.params), user_attrs={"sbsearch.requeued_from": number, _SLOT: _slot(frozen)})
    if ctx.tracking is not None and ctx.parent_run_id is not None:
        Tracker(ctx.tracking).delete_trial_runs(ctx.parent_run_id, number)


def _stop_on_signals(stop: threading.Event) -> None:
    """In a worker process: SIGINT and SIGTERM set ``stop``, which the running trial honours at its next
    epoch end, as in the thread; the controller kills the workers on a second signal. Installed whatever
    the worker inherited, since a sweep that a script started with ``&`` ignores SIGINT."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for s in STOP_SIGNALS:
        signal.signal(s, on_signal)


def _requeue_running_trials_of(ctx: SweepContext, study: optuna.Study, pids: set[int | None]) -> None:
    """The trials that killed worker processes left running (a second signal, or no stop within the grace
    time) are queued again, so the resumed sweep runs them."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("sbsearch.pid") in pids:
            _mark_interrupted(ctx, study, t.number, "its worker process was killed when the sweep was stopped")


# What writes the study's journal and MLflow: an exception raised inside them can leave the journal's
# lock broken and fail the trial, so a trial is interrupted only outside them.
_WRITERS = ("optuna", "mlflow", "sqlalchemy", "sbsearch.tracking")


def _interrupt_outside_writes(thread: threading.Thread, patience: float = 5.0) -> None:
    """Raise KeyboardInterrupt in ``thread`` (signals reach only the main thread) while it is not inside
    ``_WRITERS``; after ``patience`` seconds of writing, leave it to stop at its epoch end."""
    end = time.monotonic() + patience
    while thread.ident is not None and time.monotonic() < end:
        frame = sys._current_frames().get(thread.ident)
        if frame is None:  # it has ended
            return
        writing = False
        while frame is not None and not writing:
            writing = str(frame.f_globals.get("__name__", "")).startswith(_WRITERS)
            frame = frame.f_back
        if not writing:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                       ctypes.py_object(KeyboardInterrupt))
            return
        time.sleep(0.005)


def _process_worker(ctx: SweepContext, deadline: float | None, since: float) -> None:
    from sbsearch.logs import log_to_file

    with contextlib.suppress(OSError):  # a spawned process starts with the frameworks logging to the terminal
        log_to_file(ctx.out_dir)
    with contextlib.suppress(Exception):  # Linux: die with the controller, so a killed sweep leaves no orphans
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    if os.getppid() == 1:
        return
    stop = threading.Event()
    _stop_on_signals(stop)
    _worker_loop(ctx, deadline, stop, since)
    if stop.is_set():
        # Its trial is queued again. Not a clean exit: a controller that was not stopped itself (the signal
        # was for this worker alone) starts another worker in its place.
        raise SystemExit(1)


def records_from_study(study: optuna.Study) -> list[TrialRecord]:
    """Every counted trial's record, rebuilt from the storage (the source of truth for trials.csv)."""
    records = []
    for t in _counted(study.get_trials(deepcopy=False)):
        if t.state == TrialState.RUNNING:
            continue
        stored = t.user_attrs.get(_RECORD)
        if stored:
            records.append(TrialRecord(**stored))
        else:
            records.append(TrialRecord(t.number, _STATES[t.state], dict(t.params),
                                       reason=str(t.user_attrs.get("sbsearch.reason", ""))))
    return records


def load_study(spec: Spec, out_dir: Path) -> optuna.Study | None:
    """The sweep's study when ``out_dir`` holds one, for reading: unlike ``open_study`` it creates nothing."""
    path = storage_path(out_dir)
    if not path.exists():
        return None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=spec.name, storage=JournalStorage(JournalFileBackend(str(path))))
    except KeyError:
        return None


def learning_curves(study: optuna.Study) -> dict[int, dict[int, float]]:
    """The objective after each epoch (what the trial reported to the pruner), by trial number."""
    return {t.number: dict(t.intermediate_values) for t in _counted(study.get_trials(deepcopy=False))}


def param_importances(study: optuna.Study, seed: int = 0) -> dict[str, float]:
    """Optuna's fANOVA importance of each searched parameter for the objective (they sum to 1)."""
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def _views(study: optuna.Study, spec: Spec) -> list[TrialView]:
    views = []
    for t in _counted(study.get_trials(deepcopy=False)):
        record = t.user_attrs.get(_RECORD)
        value = t.value if t.state == TrialState.COMPLETE else (
            t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None)
        epoch = record["epochs_run"] if record else (max(t.intermediate_values) if t.intermediate_values else 0)
        label = config_from_params(spec, {**{p.name: None for p in spec.space}, **t.params}).label() if t.params else ""
        views.append(TrialView(t.number, _STATES.get(t.state, str(t.state)), value, epoch, label))
    return views


class OptunaBackend(Backend):
    """Runs a sweep in this process (``search.parallel: 1``) or in worker processes."""

    poll_seconds = 0.5

    def run(self, ctx: SweepContext, progress: ProgressSink) -> list[TrialRecord]:
        in_thread = ctx.spec.search.parallel == 1
        with StopSignals("stopping after the running trial's current epoch" if in_thread
                         else "stopping after the running trials' current epochs") as signals:
            try:
                study = open_study(ctx.spec, ctx.out_dir, _direction(ctx))
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    # The controller holds the sweep lock, so a RUNNING trial is one an earlier, killed run left.
                    _mark_interrupted(ctx, study, t.number, "the previous controller died while this trial ran")
                deadline = time.time() + ctx.spec.search.timeout if ctx.spec.search.timeout else None
                since = time.time()
                if in_thread:
                    self._run_in_thread(ctx, study, deadline, progress, since, signals)
                else:
                    self._run_in_processes(ctx, study, deadline, progress, since, signals)
                progress(_views(study, ctx.spec))
            except KeyboardInterrupt:  # a second signal before or after the trials ran: stop now
                raise SweepInterrupted(signals.signum) from None
        self.stopped_because = stop_reason(study, since)
        return records_from_study(study)

    def _run_in_thread(self, ctx: SweepContext, study: optuna.Study, deadline: float | None, progress: ProgressSink,
                       since: float, signals: StopSignals) -> None:
        stop = signals.requested  # the trial honours it at its next epoch end
        errors: list[BaseException] = []
        finished = threading.Event()  # Thread.join cannot tell once a KeyboardInterrupt has interrupted it

        def target() -> None:
            try:
                _worker_loop(ctx, deadline, stop, since)
            except BaseException as exc:  # surfaced in the controller's thread below
                errors.append(exc)
            finally:
                finished.set()

        worker = threading.Thread(target=target, name="sbsearch-trials", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                progress(_views(study, ctx.spec))
                worker.join(self.poll_seconds)
        except KeyboardInterrupt:  # a second signal: the trial stops within its current batch, not epoch
            _interrupt_outside_writes(worker)
            # Then it queues itself again; a process that exited while it trained would abort.
            finished.wait(30)
            raise SweepInterrupted(signals.signum) from None
        if errors:
            raise errors[0]
        if stop.is_set():
            raise SweepInterrupted(signals.signum)

    def _run_in_processes(self, ctx: SweepContext, study: optuna.Study, deadline: float | None, progress: ProgressSink,
                          since: float, signals: StopSignals) -> None:
        spawn = mp.get_context("spawn")
        procs: list[Any] = []

        def start_one() -> None:
            p = spawn.Process(target=_process_worker, args=(ctx, deadline, since), name="sbsearch-worker", daemon=True)
            p.start()
            procs.append(p)

        try:
            for _ in range(ctx.spec.search.parallel):
                start_one()
            while any(p.is_alive() for p in procs):
                progress(_views(study, ctx.spec))
                time.sleep(self.poll_seconds)
                if signals.requested.is_set():  # a worker the same signal ended is stopped, not dead
                    break
                for p in [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]:
                    procs.remove(p)
                    self._bury(ctx, study, p.pid, p.exitcode)
                    if len(_counted(study.get_trials(deepcopy=False))) < trial_budget(ctx.spec) and not stop_reason(study, since):
                        start_one()
            if not signals.requested.is_set():
                return
            # The first signal: each worker stops its trial at the epoch's end and queues it again, as the
            # thread does. SIGTERM, because a worker still starting up may have inherited SIGINT ignored.
            for p in procs:
                if p.is_alive() and p.pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGTERM)
            grace = time.monotonic() + 60
            for p in procs:
                p.join(max(0.0, grace - time.monotonic()))
        except KeyboardInterrupt:  # a second signal: stop now
            pass
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        _requeue_running_trials_of(ctx, study, {p.pid for p in procs})
        raise SweepInterrupted(signals.signum)

    def _bury(self, ctx: SweepContext, study: optuna.Study, pid: int | None, exitcode: int | None) -> None:
        """A worker process died (killed, out of memory): its running trial fails, and the sweep goes on."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("sbsearch.pid") == pid:
                reason = f"worker process died (exit code {exitcode})"
                runs = []
                if ctx.tracking is not None and ctx.parent_run_id is not None:
                    tracker = Tracker(ctx.tracking)
                    runs = tracker.runs_of_trial(ctx.parent_run_id, t.number)
                    # A worker killed between logging an epoch to MLflow and reporting it to the study
                    # leaves MLflow one epoch ahead: the study takes the epochs MLflow has, so the two agree.
                    for run in runs[:1]:
                        logged = tracker.metric_history(run.info.run_id, _metric_name(ctx))
                        for epoch, value in logged.items():
                            if epoch not in t.intermediate_values and math.isfinite(value):
                                study._storage.set_trial_intermediate_value(t._trial_id, epoch, value)
                        t = study.get_trials(deepcopy=False)[t.number]
                # The epochs it reported are in the study (and in its MLflow run); keep the count honest.
                record = TrialRecord(t.number, "FAIL", dict(t.params), reason=reason, epochs_run=len(t.intermediate_values))
                study._storage.set_trial_user_attr(t._trial_id, _RECORD, asdict(record))
                _tell(study, t.number, state=TrialState.FAIL)
                for run in runs:
                    tracker.end_trial(run.info.run_id, "FAIL", {}, {"sbsearch.reason": reason})
