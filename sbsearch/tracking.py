"""MLflow records: one parent run per sweep, one nested child run per trial.

The only module that imports MLflow. Every write goes through ``MlflowClient`` with an explicit run id
(so worker processes can nest their runs under the sweep's parent) and is retried when SQLite says
"database is locked".
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sbsearch.errors import Problem, SbsearchError, SpecError

__all__ = ["EpochMetrics", "TrackingTarget", "Tracker", "default_tracking_uri", "trial_params", "TRIAL_STATES", "use_write_ahead_log"]

TRIAL_STATES = ("COMPLETE", "PRUNED", "FAIL")
T = TypeVar("T")
EpochMetrics = tuple[int, int, Mapping[str, float]]  # (epoch, time in ms since the epoch of Unix, metrics)

# MLflow keeps param values to 6000 characters; ours are short, but a spec's name can be anything.
_MAX_PARAM = 500


def default_tracking_uri(out_dir: Path | None) -> str:
    """``sqlite:///mlflow.db`` in the working directory, or under ``out_dir`` when one was given."""
    base = out_dir if out_dir is not None else Path.cwd()
    return f"sqlite:///{(base / 'mlflow.db').resolve()}"


@dataclass(frozen=True)
class TrackingTarget:
    """Where to log: picklable, so each trial process opens its own client."""

    uri: str
    experiment: str
    artifact_root: str  # absolute file URI for new experiments


# File systems on which SQLite's write-ahead log is safe: its index lives in shared memory that every
# process must map, which network file systems (NFS, SMB, Lustre, FUSE mounts) do not provide.
_LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "overlay", "apfs"})


def sqlite_path(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` tracking URI, or None for any other store (and in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").partition("?")[0]
    return Path(path) if path and path != ":memory:" else None


def _file_system(path: Path) -> str:
    """The type of the file system holding ``path`` (from /proc/mounts; "" where it cannot be told)."""
    try:
        mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    target, best, kind = str(path.resolve()), -1, ""
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        point = parts[1].replace("\\040", " ")
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), parts[2]
    return kind


def use_write_ahead_log(uri: str) -> bool:
    """Put a local SQLite tracking store in write-ahead-log mode; True when it is (or was already) in it.

    In its default mode SQLite makes every writer wait for every reader and syncs the disk on each
    commit; with ``parallel`` workers logging at once that was most of a short trial's cost. The mode
    is kept in the file, so every process that opens the store afterwards (workers, ``mlflow ui``) uses
    it. Only on a local file system: on a network one the file keeps its mode and SQLite's own locking.
    """
    path = sqlite_path(uri)
    if path is None or _file_system(path.parent if not path.exists() else path) not in _LOCAL_FILE_SYSTEMS:
        return False
    import sqlite3

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(path, timeout=20)) as conn:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        return bool(mode) and str(mode[0]).lower() == "wal"
    except sqlite3.Error:  # held by another process in the middle of a change: it keeps its mode
        return False


def _relax_sync_in_wal(dbapi_connection: Any, _record: Any) -> None:
    """For each new SQLite connection of a store in write-ahead-log mode: sync at checkpoints, not at
    each commit. A crash of the process loses nothing; a power cut may lose the last commits, never
    the file."""
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        mode = dbapi_connection.execute("PRAGMA journal_mode").fetchone()
        if mode and str(mode[0]).lower() == "wal":
            dbapi_connection.execute("PRAGMA synchronous=NORMAL")


@functools.lru_cache(maxsize=1)
def _listen_for_sqlite_connections() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "connect", _relax_sync_in_wal)


@functools.lru_cache(maxsize=16)
def _prepare_sqlite_store(uri: str) -> None:
    """Once per process and store: its write-ahead log (``use_write_ahead_log``) and the relaxed sync of
    every connection to it. A Ray worker builds a ``Tracker`` per trial; the mounts and the file are read once."""
    use_write_ahead_log(uri)
    _listen_for_sqlite_connections()


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    delay = 0.05
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # MLflow wraps SQLAlchemy's OperationalError in MlflowException
            if "locked" not in str(exc).lower() or attempt == attempts - 1:
                raise
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class Tracker:
    """Writes a sweep's runs to an MLflow tracking store.

    Example:
        >>> tracker = Tracker(TrackingTarget("sqlite:///mlflow.db", "demo", "file:///tmp/art"))
        >>> parent = tracker.start_sweep("demo", {"name": "demo"}, sweep_key="demo@/tmp/out")
        >>> child = tracker.start_trial(parent, 0, {"expansion.factor": 2}, "trial-000 K=2")
    """

    def __init__(self, target: TrackingTarget) -> None:
        from mlflow.tracking import MlflowClient

        self.target = target
        if sqlite_path(target.uri) is not None:
            _prepare_sqlite_store(target.uri)
        try:
            self.client = MlflowClient(tracking_uri=target.uri)
        except Exception as exc:  # MLflow refuses a scheme it has no store for, with a long message
            scheme = target.uri.partition(":")[0]
            hint = f"MLflow has no store for {scheme!r}" if "unsupported uri" in str(exc).lower() else _first_line(exc)
            raise SpecError([Problem("tracking.uri", "must be a URI of a store MLflow can open (a path, file:, sqlite:///, "
                                     "http(s)://, postgresql://, mysql://)", target.uri, hint)]) from None
        self._experiment_id: str | None = None

    # --- set-up -----------------------------------------------------------------------------------
    def check_reachable(self) -> None:
        """Fail fast, before any training, when the store cannot be reached or written.

        Raises:
            SbsearchError: one line naming the URI and what went wrong.
        """
        saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "10"
        try:
            self.experiment_id()
        except Exception as exc:
            raise SbsearchError(
                f"tracking.uri: the MLflow store must be reachable, but {self.target.uri!r} failed: {_first_line(exc)}"
            ) from None
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = _retry(lambda: self.client.get_experiment_by_name(self.target.experiment))
            if exp is None:
                try:
                    self._experiment_id = _retry(
                        lambda: self.client.create_experiment(self.target.experiment, artifact_location=self.target.artifact_root)
                    )
                except Exception:  # another process created it first
                    exp = self.client.get_experiment_by_name(self.target.experiment)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # --- the sweep's parent run -------------------------------------------------------------------
    def start_sweep(self, name: str, spec: Mapping[str, Any], sweep_key: str, spec_yaml: str = "",
                    study_id: str = "") -> str:
        """Create the sweep's parent run, or find it again when the sweep is resumed.

        ``study_id`` names the store of the sweep's trials: every process that joins the sweep from its
        own folder has a parent run of its own, and the id ties them together (``delete_runs_of_trial``).
        """
        found = self.find_sweep(sweep_key)
        if found is not None:
            _retry(lambda: self.client.update_run(found, status="RUNNING"))
            return found
        tags = {"sbsearch.sweep_key": sweep_key, "sbsearch.role": "sweep"}
        if study_id:
            tags["sbsearch.study_id"] = study_id
        run = _retry(lambda: self.client.create_run(self.experiment_id(), run_name=f"sweep {name}", tags=tags))
        run_id = run.info.run_id
        self._log(run_id, params=_flatten(spec, skip=("space",)))
        if spec_yaml:
            _retry(lambda: self.client.log_text(run_id, spec_yaml, "spec.yaml"))
        return str(run_id)

    def end_sweep(self, run_id: str, summary: Mapping[str, float], tags: Mapping[str, str], status: str = "FINISHED") -> None:
        self._log(run_id, metrics=summary, tags=tags)
        _retry(lambda: self.client.set_terminated(run_id, status=status))

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        _retry(lambda: self.client.log_artifact(run_id, str(path), artifact_path))

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Log every file under ``folder`` (the report and its plots), keeping the folder's layout."""
        _retry(lambda: self.client.log_artifacts(run_id, str(folder), artifact_path))

    def find_sweep(self, sweep_key: str) -> str | None:
        """The parent run id of the sweep with this key, or None; unlike ``start_sweep`` it creates nothing."""
        exp = _retry(lambda: self.client.get_experiment_by_name(self.target.experiment))
        if exp is None:
            return None
        self._experiment_id = exp.experiment_id
        found = self._find_runs(f"tags.`sbsearch.sweep_key` = '{_quote(sweep_key)}' and tags.`sbsearch.role` = 'sweep'")
        return str(found[0].info.run_id) if found else None

    def metric_history(self, run_id: str, key: str) -> dict[int, float]:
        """Every logged value of one metric by step (for per-epoch metrics, step = epoch)."""
        return {m.step: m.value for m in _retry(lambda: self.client.get_metric_history(run_id, key))}

    # --- one trial's child run --------------------------------------------------------------------
    def start_trial(self, parent_id: str, number: int, params: Mapping[str, Any] | None, run_name: str,
                    first_attempt: bool = False) -> str:
        """Create the child run of trial ``number``; a run left over from an interrupted attempt of
        the same trial is reused, so a trial never has two runs. ``first_attempt``: the caller knows
        there was none, and the search for it (a query that grows with the experiment) is skipped.
        ``params`` None: the caller logs ``trial_params`` later, with its first metrics (one write fewer)."""
        found = [] if first_attempt else self.runs_of_trial(parent_id, number)
        if found:
            run_id = found[0].info.run_id
            _retry(lambda: self.client.update_run(run_id, status="RUNNING"))
            return str(run_id)
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        tags = {MLFLOW_PARENT_RUN_ID: parent_id, "sbsearch.trial_number": str(number), "sbsearch.role": "trial",
                "sbsearch.state": "RUNNING"}
        run = _retry(lambda: self.client.create_run(self.experiment_id(), run_name=run_name, tags=tags))
        if params is not None:
            self._log(run.info.run_id, params=trial_params(number, params))
        return str(run.info.run_id)

    def missing_epochs(self, run_id: str, history: Sequence[Mapping[str, float]], key: str) -> list[EpochMetrics]:
        """The epochs of ``history`` (epoch 1 first) that the run has no ``key`` for: those a trial had not
        written yet when its process died, to be written by whoever closes its run."""
        logged = self.metric_history(run_id, key)
        now = int(time.time() * 1000)
        return [(epoch, now, metrics) for epoch, metrics in enumerate(history, start=1) if epoch not in logged]

    def log_epochs(self, run_id: str, epochs: Sequence[EpochMetrics], params: Mapping[str, str] | None = None) -> None:
        """Several epochs' metrics (and the trial's params, when not yet logged) in one write."""
        self._log(run_id, params=params, epochs=epochs)

    def end_trial(self, run_id: str, state: str, final: Mapping[str, float], tags: Mapping[str, str],
                  epochs: Sequence[EpochMetrics] = (), params: Mapping[str, str] | None = None) -> None:
        """The final metrics and state, with any epochs (and params) not written yet, then the run's end."""
        assert state in TRIAL_STATES, state
        self._log(run_id, metrics={f"final.{k}": v for k, v in final.items()}, tags={"sbsearch.state": state, **tags},
                  params=params, epochs=epochs)
        _retry(lambda: self.client.set_terminated(run_id, status="FAILED" if state == "FAIL" else "FINISHED"))

    def log_heldout(self, run_id: str, rank: int, test: Mapping[str, float]) -> None:
        """Put a chosen trial's test-split numbers on its (finished) run: ``test_<metric>``, its spread over
        replicas and ``test_loss``, with ``sbsearch.heldout_rank`` (1 = the best on validation)."""
        self._log(run_id, metrics=test, tags={"sbsearch.heldout_rank": str(rank)})

    # --- reading back -----------------------------------------------------------------------------
    def trial_runs(self, parent_id: str) -> list[Any]:
        return self._find_runs(f"tags.`mlflow.parentRunId` = '{parent_id}'")

    def runs_of_trial(self, parent_id: str, number: int) -> list[Any]:
        """The (active) child runs of trial ``number``: one, or none; more only if an older version left them."""
        return self._find_runs(f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`sbsearch.trial_number` = '{number}'")

    def delete_trial_runs(self, parent_id: str, number: int) -> None:
        """Hide the runs of an attempt of trial ``number`` that will not be its record."""
        for run in self.runs_of_trial(parent_id, number):
            _retry(lambda: self.client.delete_run(run.info.run_id))

    def delete_runs_of_trial(self, study_id: str, number: int) -> None:
        """Hide the runs of trial ``number`` under every parent run of the sweep ``study_id``: a process that
        died left its attempt under its own parent, and another process runs the trial again under its own."""
        parents = self._find_runs(f"tags.`sbsearch.study_id` = '{_quote(study_id)}' and tags.`sbsearch.role` = 'sweep'")
        for parent in parents:
            self.delete_trial_runs(parent.info.run_id, number)

    def _find_runs(self, filter_string: str) -> list[Any]:
        runs: list[Any] = []
        token = None
        while True:
            page = _retry(lambda: self.client.search_runs([self.experiment_id()], filter_string, max_results=1000, page_token=token))
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _log(self, run_id: str, metrics: Mapping[str, float] | None = None, params: Mapping[str, str] | None = None,
             tags: Mapping[str, str] | None = None, step: int = 0, epochs: Sequence[EpochMetrics] = ()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        m = [Metric(k, float(v), when, epoch) for epoch, when, values in epochs for k, v in values.items()]
        m += [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
        p = [Param(k, str(v)[:_MAX_PARAM]) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)[:5000]) for k, v in (tags or {}).items()]
        for i in range(0, max(len(m), 1), 900):  # MLflow takes at most 1000 metrics per batch
            _retry(lambda: self.client.log_batch(run_id, metrics=m[i : i + 900], params=p if i == 0 else (),
                                                 tags=t if i == 0 else (), synchronous=True))


def trial_params(number: int, params: Mapping[str, Any]) -> dict[str, str]:
    """A trial's MLflow params: its configuration and its number."""
    return {**{k: _param(v) for k, v in params.items()}, "trial.number": str(number)}


def _first_line(exc: BaseException) -> str:
    """The start of an error's message (MLflow's can run to many lines), or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _param(value: Any) -> str:
    return repr(value) if isinstance(value, str) and value == "" else str(value)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _flatten(tree: Mapping[str, Any], skip: tuple[str, ...] = (), prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if key in skip:
            continue
        if isinstance(value, Mapping):
            out.update(_flatten(value, (), f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
