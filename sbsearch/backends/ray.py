"""The Ray Tune backend: the same spec, search space, pruning rules and records, on a Ray cluster.

How the pieces map onto Ray Tune:

- **Search**: ``OptunaSearch`` with a define-by-run space that calls ``sample_config``, over the sweep's
  store (``sbsearch.study``: ``OUT/optuna.journal`` or ``search.storage``), so a trial's number,
  parameters, per-epoch metric and final record live where ``trials.csv`` is built from. The searcher
  asks for a trial under the store's claim lock and only while the sweep's budget is not met, so
  several drivers (and Optuna-backend processes) can share one storage.
- **Pruning**: the spec's rule (``sbsearch.pruning``) decides inside the trial after each epoch, seeing
  the other trials (their states and metrics after each epoch) through a small actor on the driver's
  node; ``asha`` and ``ray_hyperband`` are Ray's own schedulers instead. A trial that Ray stops is
  recorded PRUNED (Ray's ``OptunaSearch`` alone would record it COMPLETE), one whose retries ran out FAIL.
- **MLflow**: each trial logs its own child run under the sweep's parent from inside the trial; the
  driver only closes the run of a trial that could not (stopped by a scheduler, node lost).
- **Resume**: the experiment lives in ``OUT/ray/experiment``; the same command restores it with
  ``Tuner.restore`` and re-runs what was running. A trial always logs to one MLflow run: an attempt
  deletes whatever an earlier, unfinished attempt of the same trial left.
- **Faults**: ``FailureConfig(max_failures=ray.max_failures)`` re-runs a trial whose worker or node died
  on the nodes that remain.

Only this module imports Ray.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState as OptunaState
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from sbsearch.backends import optuna as optuna_backend
from sbsearch.study import Store, failure_message, record_from, trial_level
from sbsearch.backends.base import Backend, ProgressSink, StopSignals, SweepInterrupted
from sbsearch.data import DATASETS
from sbsearch.errors import SbsearchError
from sbsearch.pruning import PeerTrial, PruningRule, rule_for
from sbsearch.space import config_from_params, sample_config, trial_budget
from sbsearch.spec import RAY_SCHEDULERS, Spec
from sbsearch.tracking import Tracker
from sbsearch.trial import SweepContext, TrialRecord, TrialState, final_metrics, run_trial, trial_run_name

__all__ = ["RayBackend", "experiment_path"]

_NUMBER = "sbsearch.number"  # the Optuna trial number, carried in each Ray trial's config
_STATE = "sbsearch_state"  # the state a trial reports in its last Ray result
_NAMESPACE = "sbsearch"
_MODES = {"maximize": "max", "minimize": "min"}
# Ray's own bookkeeping in a result; everything else a trial reports is one of its metrics.
_RAY_KEYS = {"epoch", _STATE, "done", "trial_id", "experiment_tag", "training_iteration", "time_total_s",
             "time_this_iter_s", "time_since_restore", "iterations_since_restore", "timestamp", "date", "pid",
             "hostname", "node_ip", "checkpoint_dir_name", "timesteps_total", "episodes_total",
             "timesteps_since_restore", "should_checkpoint"}


def experiment_path(out_dir: Path) -> Path:
    """Where Ray Tune keeps the sweep's current experiment state (what ``Tuner.restore`` reads):
    ``OUT/ray/experiment``, or ``experiment-N`` once a resume with more trials has added more."""
    return _experiment_paths(out_dir)[-1]


def _experiment_paths(out_dir: Path) -> list[Path]:
    """Every experiment of the sweep, first to last (at least the first, which may not exist yet)."""
    root = out_dir / "ray"
    later = [p for p in root.glob("experiment-*") if p.name.rpartition("-")[2].isdigit()] if root.is_dir() else []
    return [root / "experiment", *sorted(later, key=lambda p: int(p.name.rpartition("-")[2]))]


# --- the board: what the trials know of each other, shared by the trials and the driver -------------------


class _Board:
    """Every trial of the sweep as the pruning rules see it (``PeerTrial``: state and metrics after each
    epoch), plus the records of finished trials. Lives in one small actor on the driver's node, so
    trials on any node share it and losing a worker loses nothing of it.

    Ray runs a trial again when its process or node died, and a dying process may still reach the
    board for a moment: each run of a trial is an attempt (``begin``), and only the latest attempt of
    a trial may report or finish it. A FAIL that an attempt recorded in this sweep run before its
    process died is not trusted (the dying may have caused it): the next attempt trains again.
    """

    def __init__(self, peers: list[PeerTrial], records: dict[int, dict[str, Any]]) -> None:
        self.trials = {p.number: p for p in peers}
        self.records = dict(records)  # the records of earlier sweep runs stand as they are
        self.attempts: dict[int, int] = {}
        self.recorded_here: set[int] = set()

    def begin(self, number: int) -> tuple[int, dict[str, Any] | None]:
        """Start an attempt of trial ``number``: (its attempt number, None), or (0, the record it has)
        when the trial finished already and this attempt only has to report that."""
        record = self.records.get(number)
        if record is not None and not (number in self.recorded_here and record["state"] == "FAIL"):
            return 0, record
        self.records.pop(number, None)
        self.recorded_here.discard(number)
        self.attempts[number] = self.attempts.get(number, 0) + 1
        return self.attempts[number], None

    def report(self, number: int, epoch: int, metrics: dict[str, float], attempt: int = 0) -> list[PeerTrial] | None:
        """Note a running trial's metrics after ``epoch`` and return the other trials; None (and nothing
        noted) when a later attempt of the trial has begun."""
        if attempt and attempt != self.attempts.get(number):
            return None
        old = self.trials.get(number)
        # A re-run (after a lost node) starts again at epoch 1: what its earlier attempt said is dropped.
        history = {e: m for e, m in old.history.items() if e < epoch} if old is not None else {}
        self.trials[number] = PeerTrial(number, "RUNNING", {**history, epoch: metrics})
        return [p for n, p in self.trials.items() if n != number]

    def finish(self, record: dict[str, Any], final: float | None, attempt: int = 0) -> bool:
        """Keep a finished trial's record; ``attempt`` 0 is the driver's word, which always stands.
        Returns False (and keeps nothing) when a later attempt of the trial has begun."""
        number = record["number"]
        if attempt and attempt != self.attempts.get(number):
            return False
        self.records[number] = record
        if attempt:
            self.recorded_here.add(number)
        old = self.trials.get(number)
        history = {i + 1: trial_level(m) for i, m in enumerate(record.get("history") or [])}
        self.trials[number] = PeerTrial(number, record["state"], history or (old.history if old else {}),
                                        final if record["state"] == "COMPLETE" else None)
        return True

    def record(self, number: int) -> dict[str, Any] | None:
        return self.records.get(number)


@dataclass
class _Session:
    """What the driver's searcher needs from this run; the searcher itself is pickled into Ray's
    experiment state and restored from there, so it finds the live objects here rather than in itself."""

    ctx: SweepContext
    store: Store
    board: str
    deadline: float | None
    budget: int
    since: float = 0.0  # when this run started: failures in a row count from here
    stopped_because: str | None = None
    next_check: float = 0.0  # when to look for trials of silent processes next (time.monotonic)


_SESSION: _Session | None = None


def _board(name: str) -> Any:
    return ray.get_actor(name, namespace=_NAMESPACE)


# --- inside a trial -------------------------------------------------------------------------------------


def _delete_runs_of(ctx: SweepContext, number: int) -> None:
    """An earlier attempt of this trial (on a lost node, or before an interruption) left a run behind:
    the attempt starting now is the trial's record, so it starts from a clean run."""
    if ctx.tracking is None or ctx.parent_run_id is None:
        return
    with contextlib.suppress(Exception):  # a store that is down: run_trial records that, and relog catches up
        Tracker(ctx.tracking).delete_trial_runs(ctx.parent_run_id, number)


def _trainable(config: dict[str, Any], ctx: SweepContext, board: str, rule: PruningRule | None) -> None:
    """One Ray trial: ``run_trial``, telling Ray and the board about every epoch."""
    from sbsearch.logs import log_to_file

    with contextlib.suppress(OSError):  # a node that cannot write the output folder keeps Ray's worker logs
        log_to_file(ctx.out_dir)
    number = int(config[_NUMBER])
    trial_config = config_from_params(ctx.spec, {k: v for k, v in config.items() if k != _NUMBER})
    handle = _board(board)
    metric = DATASETS[ctx.spec.data.dataset].objective[0]
    attempt, done = ray.get(handle.begin.remote(number))
    if done is not None:
        # It finished after Ray last saved its state (before the driver died), or its process died
        # after it finished: Ray restarts it, but its record stands. Report that instead of training.
        _report_outcome(record_from(done), {})
        return
    _delete_runs_of(ctx, number)
    last: dict[str, float] = {}

    def should_prune(epoch: int, metrics: Mapping[str, float]) -> str | None:
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        last.clear()
        last.update(numbers)
        # Ray's scheduler (asha, ray_hyperband) decides here: a stop ends this thread inside the report.
        # The last epoch goes to Ray with the trial's record (below), so a trial that ran every epoch
        # is never cut short before it recorded itself COMPLETE.
        if epoch < ctx.spec.train.epochs:
            tune.report({**numbers, "epoch": epoch})
        peers = ray.get(handle.report.remote(number, epoch, trial_level(numbers), attempt))
        if peers is None:
            raise _Superseded()
        return None if rule is None else rule.decide(epoch, metrics, peers, number)

    try:
        # Ray's scheduler may end this thread inside should_prune (tune.report): each epoch is in MLflow first.
        record = run_trial(ctx, number, trial_config, should_prune, log_every_epoch=True)
    except _Superseded:
        return
    if ray.get(handle.finish.remote(asdict(record), record.final.get(metric), attempt)):
        _report_outcome(record, last)


class _Superseded(BaseException):
    """A later attempt of this trial runs: this one (in a process Ray gave up on) stops, and says nothing.

    A BaseException, so that ``run_trial`` does not record it as the trial's failure."""


def _report_outcome(record: TrialRecord, last: Mapping[str, float]) -> None:
    """The trial's last result states its outcome, so Ray's records agree with Optuna's, MLflow's and
    trials.csv; ``last`` (the last epoch's metrics) stands in for a record without final metrics."""
    metrics = {} if record.state == "FAIL" else ({k: v for k, v in record.final.items() if math.isfinite(v)} or last)
    tune.report({**metrics, "epoch": record.epochs_run, _STATE: record.state})


# --- the driver's searcher ------------------------------------------------------------------------------


def _define_space(spec: Spec, trial: Any) -> dict[str, Any]:
    """Ray's define-by-run space: the backend-neutral sampler, plus the trial's number."""
    sample_config(spec, optuna_backend.OptunaSuggest(trial))
    return {_NUMBER: trial.number}


def _metrics_of(result: Mapping[str, Any] | None) -> dict[str, float]:
    if not result:
        return {}
    return {k: float(v) for k, v in result.items() if k not in _RAY_KEYS and not k.startswith("config/")
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _close_run(ctx: SweepContext, record: TrialRecord, params: Mapping[str, Any]) -> str:
    """Finish the MLflow run of a trial that could not finish it itself; create it if it never started."""
    if ctx.tracking is None or ctx.parent_run_id is None:
        return ""
    tracker = Tracker(ctx.tracking)
    config = config_from_params(ctx.spec, params)
    # start_trial reuses the run the trial left, or creates it when the trial never logged one.
    run_id = tracker.start_trial(ctx.parent_run_id, record.number, config.params, trial_run_name(record.number, config))
    # The epochs the trial had not written to MLflow yet (it writes every few seconds) come from its record.
    missing = tracker.missing_epochs(run_id, record.history, DATASETS[ctx.spec.data.dataset].objective[0])
    tracker.end_trial(run_id, record.state, final_metrics(record), {"sbsearch.reason": record.reason}, epochs=missing)
    return str(run_id)


class _SweepSearch(OptunaSearch):
    """Ray's ``OptunaSearch`` over the sweep's journal study, recording each trial as sbsearch does.

    Differences from the parent: the Optuna step is the epoch (Ray's iteration counts the final
    report too); a trial that Ray stopped is PRUNED and one that errored is FAIL, each with the
    trial's full record; no new trials after ``search.timeout``.
    """

    def suggest(self, trial_id: str) -> dict[Any, Any] | None:
        session = _SESSION
        if session is not None and session.deadline is not None and time.time() > session.deadline:
            return Searcher.FINISHED  # type: ignore[return-value]  # Ray's "no more trials" marker
        if session is None:
            return super().suggest(trial_id)
        store, spec = session.store, session.ctx.spec
        limit = spec.search.max_consecutive_failures
        if limit:
            failed = store.failures_in_a_row(session.since)
            if len(failed) >= limit:
                session.stopped_because = failure_message(failed)
                return Searcher.FINISHED  # type: ignore[return-value]
        if time.monotonic() >= session.next_check:  # trials of processes sharing the storage that went silent
            optuna_backend.take_over_orphans(session.ctx, store, earlier_runs=False)
            session.next_check = time.monotonic() + min(10.0, spec.search.stale_after / 4)
        with store.lock.held():  # other drivers may share the storage: the budget is the sweep's, not this run's
            counted = store.counted()
            if len(counted) >= session.budget:
                # Done, or other processes still run the last trials: if one dies, its trial is taken over here.
                others = any(t.state == OptunaState.RUNNING and t.user_attrs.get("sbsearch.owner") != store.owner
                             for t in counted)
                return None if others else Searcher.FINISHED  # type: ignore[return-value]
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None:
                store.claim(ot_trial, ot_trial.number, os.getpid())
        return config

    def _finished_in_study(self, ot_trial: Any) -> bool:
        """Whether the study already holds the trial's outcome (it finished before the driver died)."""
        assert self._ot_study is not None
        return bool(self._ot_study._storage.get_trial(ot_trial._trial_id).state.is_finished())  # one trial, not all

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        value, epoch = result.get(self.metric), result.get("epoch")
        if ot_trial is None or not isinstance(value, (int, float)) or not math.isfinite(value) or epoch is None:
            return
        with warnings.catch_warnings(), contextlib.suppress(UpdateFinishedTrialError):
            # The final report repeats the last epoch: Optuna ignores it. A trial that finished before
            # the driver died reports its record again, and its Optuna trial takes no more values.
            warnings.simplefilter("ignore")
            ot_trial.report(float(value), int(epoch))

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        self._completed_trials.add(trial_id)
        if self._finished_in_study(ot_trial):
            return
        session = _SESSION
        assert session is not None, "the searcher runs only inside RayBackend.run"
        store = session.store
        number, params = ot_trial.number, dict(ot_trial.params)
        stored = None
        with contextlib.suppress(Exception):  # the board is gone when the driver is shutting down
            stored = ray.get(_board(session.board).record.remote(number))
        if stored is not None:
            record = record_from(stored)
        elif result is None and not error:
            # Never started (the sweep ended first): not one of the sweep's trials.
            store.mark_interrupted(number, "the sweep ended before this trial started", set(), requeue=False)
            _delete_runs_of(session.ctx, number)
            return
        else:
            record = _record_of_stopped_trial(session.ctx, number, params, result, error)
            try:
                record.run_id = _close_run(session.ctx, record, params)
            except Exception as exc:  # noqa: BLE001 - the store is down: the study keeps the record for relog
                record.logged, record.tracking_error = False, f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            with contextlib.suppress(Exception):
                ray.get(_board(session.board).finish.remote(asdict(record), record.final.get(self.metric)))
            if result is not None:  # Ray does not pass the result that made it stop to on_trial_result
                self.on_trial_result(trial_id, result)
        store.finish(ot_trial, record, self.metric)


def _record_of_stopped_trial(ctx: SweepContext, number: int, params: dict[str, Any], result: Mapping[str, Any] | None,
                             error: bool) -> TrialRecord:
    spec = ctx.spec
    epoch = int((result or {}).get("epoch", 0) or 0)
    if error:
        reason = (f"ray: the trial's worker failed {spec.ray.max_failures + 1} time(s) (a lost node, a killed process "
                  f"or an error outside the trial); see {experiment_path(ctx.out_dir)}")
        state = TrialState.FAIL
    elif epoch >= spec.train.epochs:  # stopped at its last epoch: it ran every epoch, so it is complete
        reason, state = "", TrialState.COMPLETE
    else:
        reason = f"{spec.search.pruner}: Ray Tune's scheduler stopped the trial at epoch {epoch}"
        state = TrialState.PRUNED
    seconds = float((result or {}).get("time_total_s", 0.0) or 0.0)
    return TrialRecord(number, state, params, _metrics_of(result), epochs_run=epoch, seconds=seconds, reason=reason)


# --- the backend ----------------------------------------------------------------------------------------


def _scheduler(spec: Spec, metric: str, direction: str) -> Any:
    """Ray's scheduler for ``asha`` and ``ray_hyperband``; the others prune inside the trials.

    Both are Ray's asynchronous successive halving, which stops trials rather than pausing them (a
    paused trial without checkpoints would start again from epoch 1); ``ray_hyperband`` spreads the
    trials over three brackets of different grace periods, as Hyperband does.
    """
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    if spec.search.pruner in RAY_SCHEDULERS:
        epochs = spec.train.epochs
        return AsyncHyperBandScheduler(time_attr="epoch", metric=metric, mode=_MODES[direction], max_t=epochs,
                                       grace_period=min(max(1, spec.search.warmup_epochs), epochs),
                                       reduction_factor=3, brackets=3 if spec.search.pruner == "ray_hyperband" else 1)
    return FIFOScheduler()  # type: ignore[no-untyped-call]


def _connect(spec: Spec) -> bool:
    """Join ``ray.address`` or start Ray here; True when this call started it (and must shut it down)."""
    if ray.is_initialized():
        return False
    address = spec.ray.address
    _probe(address)
    from sbsearch.logs import reroute_framework_loggers

    # Ray set up its loggers to print when it was imported: from here on they write to the sweep's log
    # file (with Ray's INFO lines, for debugging), and the workers' output stays in Ray's own logs.
    reroute_framework_loggers()
    try:
        # No address starts a Ray of the sweep's own ("local"): plain ray.init() would join whatever
        # cluster another program left running on this machine.
        ray.init(address=address or "local", namespace=_NAMESPACE, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.INFO, configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - any failure to start or join is the user's to fix
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        auth = " (token authentication: set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN)" if address else ""
        raise SbsearchError(f"ray.address: Ray must start or be reachable, but {address or 'a local Ray'!s} "
                            f"failed: {first[:200]}{auth}") from None
    return True


def _probe(address: str | None) -> None:
    """Ray retries an unreachable head for minutes; a plain TCP connect says so in seconds."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SbsearchError(f"ray.address: must be host:port, auto or a ray:// URI, but got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise SbsearchError(f"ray.address: a Ray head must listen at {address}, but connecting failed: "
                            f"{exc.strerror or exc}") from None


class RayBackend(Backend):
    """Runs a sweep's trials as Ray Tune trials, on this machine or the cluster at ``ray.address``."""

    poll_seconds = 0.5

    def run(self, ctx: SweepContext, progress: ProgressSink) -> list[TrialRecord]:
        global _SESSION
        spec = ctx.spec
        metric, direction = DATASETS[spec.data.dataset].objective
        # Each trial gets the CPUs Ray reserved for it as torch threads.
        ctx = replace(ctx, threads=spec.train.threads or max(1, int(spec.ray.cpus_per_trial)))
        study = optuna_backend.open_store(ctx)
        # Trials an earlier, killed driver of this folder left running: Ray restores and re-runs them here,
        # or (asked for after its last save) they are forgotten at the end; either way they are this run's.
        study.adopt_earlier_runs()
        started = _connect(spec)
        board_name = f"sbsearch-board-{uuid.uuid4().hex[:12]}"
        budget = trial_budget(spec)
        try:
            # After ray.init, which installs a SIGTERM handler of its own that shuts Ray down at once.
            with StopSignals("Ray Tune saves its state and stops the running trials",
                             on_first=_ask_tune_to_stop) as signals:
                try:
                    board: Any = ray.remote(num_cpus=0)(_Board).options(
                        name=board_name, namespace=_NAMESPACE, scheduling_strategy=_on_this_node()).remote(
                            _finished_peers(study, metric), study.finished_records())
                    ray.get(board.record.remote(-1))  # placed and running before any trial asks
                    deadline = time.time() + spec.search.timeout if spec.search.timeout else None
                    _SESSION = _Session(ctx, study, board_name, deadline, budget, since=time.time())
                    rule = None if spec.search.pruner in RAY_SCHEDULERS else rule_for(spec, metric, direction)
                    trainable = tune.with_resources(
                        tune.with_parameters(_trainable, ctx=ctx, board=board_name, rule=rule),
                        {"cpu": spec.ray.cpus_per_trial, "gpu": spec.ray.gpus_per_trial})
                    path = experiment_path(ctx.out_dir)
                    restored = tune.Tuner.can_restore(str(path))
                    tuner = (self._restored_tuner(path, trainable) if restored
                             else self._new_tuner(ctx, study, trainable, metric, direction, path))
                    interrupted, ended = self._fit(tuner, study, spec, progress)
                    self.stopped_because = _SESSION.stopped_because
                    if (restored and ended and self.stopped_because is None and not signals.requested.is_set()
                            and (deadline is None or time.time() < deadline)):
                        # A restored experiment keeps the number of trials it began with: a larger --trials (or
                        # search.trials) runs the rest as a new experiment, with the current search.parallel.
                        _forget_orphans(ctx, study)
                        if study.finished() < budget:
                            path = path.with_name(f"experiment-{len(_experiment_paths(ctx.out_dir)) + 1}")
                            tuner = self._new_tuner(ctx, study, trainable, metric, direction, path)
                            interrupted, ended = self._fit(tuner, study, spec, progress)
                            self.stopped_because = _SESSION.stopped_because
                    if (interrupted or (signals.requested.is_set() and study.finished() < budget)
                            or (self.stopped_because is None and _unfinished(study, spec, deadline))):
                        raise SweepInterrupted(signals.signum)
                    _forget_orphans(ctx, study)
                    progress(study.views(spec))
                except KeyboardInterrupt:  # a second signal, or a first one before Tune's loop began
                    raise SweepInterrupted(signals.signum) from None
            return study.records()
        finally:
            _SESSION = None
            if started:
                ray.shutdown()

    @staticmethod
    def _restored_tuner(path: Path, trainable: Any) -> Any:
        # Finished trials stay finished (errored ones too); the ones that were running start again.
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)

    @staticmethod
    def _new_tuner(ctx: SweepContext, study: Store, trainable: Any, metric: str, direction: str,
                   path: Path) -> Any:
        spec = ctx.spec
        # One sampler for every trial of this experiment, seeded by the spec's seed and the number of
        # the first trial it samples. Ray runs the free schedule only (search.schedule): Tune asks the
        # searcher whenever a slot frees up, so what a trial sees depends on timing at parallel > 1.
        search = _SweepSearch(
            functools.partial(_define_space, spec), metric=metric, mode=_MODES[direction],
            sampler=optuna_backend.sampler(spec, len(study.trials())), study_name=spec.name, storage=study.storage)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, scheduler=_scheduler(spec, metric, direction),
                                        num_samples=max(1, trial_budget(spec) - study.finished()),
                                        max_concurrent_trials=spec.search.parallel,
                                        # a warm worker skips the imports and data loading: seconds per trial
                                        reuse_actors=True),
            run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=spec.ray.max_failures)),
        )

    def _fit(self, tuner: Any, study: Store, spec: Spec, progress: ProgressSink) -> tuple[bool, bool]:
        """Run Tune, showing progress from the journal. Returns (a signal stopped it at once, every trial
        of the experiment ended: none left pending or running, as after Ctrl-C)."""
        stop = threading.Event()
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: sbsearch's display, not Tune's tables
        # A failed trial's last result has no objective (it diverged or crashed); Tune's strict check
        # would turn that into an error of the whole sweep instead of one FAIL record.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # SIGINT stays with sbsearch's StopSignals, which also handles SIGTERM, and passes the first of
        # either on to Tune (``_ask_tune_to_stop``).
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"

        def show() -> None:
            while not stop.wait(self.poll_seconds):
                with contextlib.suppress(Exception):  # a half-written journal line: next time
                    progress(study.views(spec))

        shower = threading.Thread(target=show, name="sbsearch-progress", daemon=True)
        shower.start()
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:  # a second signal, while Tune was saving (or a first one before its loop)
            return True, False
        finally:
            stop.set()
            shower.join()
            if threading.current_thread() is threading.main_thread():
                # Tune leaves its SIGUSR1 handler behind: a stop signal from now on finds no loop to stop.
                signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        return False, grid.num_terminated + grid.num_errors == len(grid)


def _ask_tune_to_stop() -> None:
    """The first stop signal: inside ``Tuner.fit``, Tune saves the experiment's state and stops its trials,
    as it does on SIGUSR1, its signal for this. Before Tune's loop began no trial runs: stop at once."""
    tune_stops = signal.getsignal(signal.SIGUSR1)
    if not callable(tune_stops):
        raise KeyboardInterrupt
    tune_stops(signal.SIGUSR1, None)


def _on_this_node() -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # The board holds what finished trials left; on the driver's node it survives the loss of any worker.
    # Not soft: a soft affinity lets Ray place it on any worker when the driver's node has no CPUs.
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def _unfinished(study: Store, spec: Spec, deadline: float | None) -> bool:
    """Tune returns normally when Ctrl-C stopped it (after saving its state): the sweep was interrupted
    when trials of this run are still running and the budget is not met."""
    running = bool(study.running_of(study.owner))
    return running and study.finished() < trial_budget(spec) and (deadline is None or time.time() < deadline)


def _finished_peers(study: Store, metric: str) -> list[PeerTrial]:
    """The peers a resumed sweep starts with: its finished trials (running ones start again)."""
    return [p for p in study.peers(-1, metric) if p.state != "RUNNING"]


def _forget_orphans(ctx: SweepContext, study: Store) -> None:
    """Trials this run asked for after Ray's last saved state, before the driver was killed, belong to no
    Ray trial: once the sweep is complete, they are marked interrupted (not counted) and their runs deleted.
    Those of a driver killed earlier in this folder are this run's: Ray restored its experiment."""
    for t in study.running_of(study.owner):
        study.mark_interrupted(t.number, "its Ray trial was lost with the driver", set(), requeue=False)
        _delete_runs_of(ctx, t.number)
    optuna_backend.take_over_orphans(ctx, study, requeue=False)


BACKEND = RayBackend
