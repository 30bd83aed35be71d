"""The MLflow side of a sweep (``sbsearch.tracking.Tracker``), on a real SQLite tracking store."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sbsearch.errors import SpecError
from sbsearch.tracking import Tracker, TrackingTarget


@pytest.fixture()
def target(tmp_path: Path) -> TrackingTarget:
    return TrackingTarget(f"sqlite:///{tmp_path / 'mlflow.db'}", "demo", (tmp_path / "art").as_uri())


def test_a_sweeps_parent_run_is_found_again_by_its_key_and_names_its_store(target: TrackingTarget) -> None:
    tracker = Tracker(target)
    parent = tracker.start_sweep("demo", {"name": "demo", "seed": 0}, sweep_key="demo@/out#1", study_id="s1")
    assert tracker.start_sweep("demo", {"name": "demo", "seed": 0}, sweep_key="demo@/out#1", study_id="s1") == parent
    assert tracker.find_sweep("demo@/out#1") == parent and tracker.find_sweep("demo@/elsewhere#1") is None
    tags = MlflowClient(target.uri).get_run(parent).data.tags
    assert tags["sbsearch.study_id"] == "s1" and tags["sbsearch.role"] == "sweep"


def test_a_trial_has_one_run_with_its_epochs_final_metrics_and_state(target: TrackingTarget) -> None:
    tracker = Tracker(target)
    parent = tracker.start_sweep("demo", {"name": "demo"}, sweep_key="demo@/out")
    run = tracker.start_trial(parent, 3, {"expansion.factor": 2}, "trial-003 K=2")
    assert tracker.start_trial(parent, 3, {"expansion.factor": 2}, "trial-003 K=2") == run  # an attempt again: same run
    tracker.log_epochs(run, [(1, 1000, {"val_accuracy": 0.5})])
    tracker.log_epochs(run, [(2, 2000, {"val_accuracy": 0.7})])
    tracker.end_trial(run, "PRUNED", {"val_accuracy": 0.7, "duration_s": 1.5}, {"sbsearch.reason": "median"})
    assert tracker.metric_history(run, "val_accuracy") == {1: 0.5, 2: 0.7}
    stored = MlflowClient(target.uri).get_run(run)
    assert stored.data.metrics["final.duration_s"] == 1.5 and stored.data.params["expansion.factor"] == "2"
    assert stored.data.tags["sbsearch.state"] == "PRUNED" and stored.data.tags["sbsearch.reason"] == "median"
    assert stored.info.status == "FINISHED"
    assert [r.info.run_id for r in tracker.runs_of_trial(parent, 3)] == [run]


def test_a_trials_runs_are_deleted_under_every_parent_of_its_sweep_and_only_there(target: TrackingTarget) -> None:
    tracker = Tracker(target)
    # Two processes of one sweep (same store id, each its own parent) and another sweep's process.
    ours = [tracker.start_sweep("demo", {"name": "demo"}, sweep_key=f"demo@/{host}", study_id="s1") for host in "ab"]
    theirs = tracker.start_sweep("demo", {"name": "demo"}, sweep_key="demo@/c", study_id="s2")
    for parent in (*ours, theirs):
        for number in (3, 4):
            tracker.start_trial(parent, number, {}, f"trial-{number:03d}")
    tracker.delete_runs_of_trial("s1", 3)
    for parent in ours:
        assert tracker.runs_of_trial(parent, 3) == [] and len(tracker.runs_of_trial(parent, 4)) == 1
    assert len(tracker.runs_of_trial(theirs, 3)) == 1


def test_a_uri_mlflow_has_no_store_for_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="tracking.uri: must be a URI of a store MLflow can open"):
        Tracker(TrackingTarget("foo://bar", "demo", tmp_path.as_uri()))


def test_a_local_sqlite_store_is_put_in_write_ahead_log_mode_and_a_network_one_is_left_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    from sbsearch import tracking

    def mode(path: Path) -> str:
        with sqlite3.connect(path) as conn:
            return str(conn.execute("PRAGMA journal_mode").fetchone()[0])

    local = tmp_path / "local" / "mlflow.db"
    Tracker(TrackingTarget(f"sqlite:///{local}", "demo", (tmp_path / "art").as_uri())).check_reachable()
    assert tracking._file_system(local) in tracking._LOCAL_FILE_SYSTEMS  # the test's folder is on a local disk
    assert mode(local) == "wal"
    # A store on NFS (the mounts say so) keeps SQLite's default mode: the log's shared memory needs one host.
    monkeypatch.setattr(tracking, "_file_system", lambda path: "nfs4")
    remote = tmp_path / "remote" / "mlflow.db"
    Tracker(TrackingTarget(f"sqlite:///{remote}", "demo", (tmp_path / "art").as_uri())).check_reachable()
    assert mode(remote) == "delete"
    assert tracking.sqlite_path("postgresql://h/db") is None and tracking.sqlite_path("sqlite:///:memory:") is None


def test_the_file_system_of_a_path_is_its_deepest_mount(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sbsearch import tracking

    mounts = ("/dev/vda / ext4 rw 0 0\nserver:/export /mnt/shared nfs4 rw 0 0\n"
              "tmpfs /mnt/shared/scratch tmpfs rw 0 0\nserver:/x /mnt/with\\040space nfs rw 0 0\n")
    real_read = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: mounts if str(self) == "/proc/mounts"
                        else real_read(self, *a, **k))
    assert tracking._file_system(Path("/mnt/shared/run/mlflow.db")) == "nfs4"
    assert tracking._file_system(Path("/mnt/shared/scratch/mlflow.db")) == "tmpfs"
    assert tracking._file_system(Path("/mnt/sharedother/mlflow.db")) == "ext4"  # a name that starts alike is not inside
    assert tracking._file_system(Path("/mnt/with space/mlflow.db")) == "nfs"


def test_a_short_trials_run_is_written_in_three_calls_with_every_epoch(target: TrackingTarget,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A trial of quick epochs: the run is created, then its params, epochs and final metrics go in one batch,
    then it ends. With flushing every epoch (long epochs) each epoch is its own batch, params in the first."""
    from sbsearch import trial
    from sbsearch.spec import parse_spec
    from sbsearch.trial import SweepContext, run_trial
    from tests.conftest import tiny_spec_dict

    spec = parse_spec(tiny_spec_dict(train__epochs=3))
    tracker = Tracker(target)
    parent = tracker.start_sweep("demo", {"name": "demo"}, sweep_key="demo@/out")
    ctx = SweepContext(spec, Path(target.artifact_root.removeprefix("file://")), target, parent, threads=1)
    from sbsearch.space import config_from_params

    config = config_from_params(spec, {"expansion.factor": 2, "expansion.fill": 0.5, "norm.kind": "none"})
    client = trial._tracker(target).client
    calls: list[str] = []
    for name in ("create_run", "log_batch", "set_terminated", "search_runs", "update_run"):
        real = getattr(client, name)
        monkeypatch.setattr(client, name, lambda *a, _real=real, _name=name, **k: (calls.append(_name), _real(*a, **k))[1])
    records = []
    for number, flush in ((0, 3600.0), (1, 0.0)):
        monkeypatch.setattr(trial._TrialLog, "FLUSH_SECONDS", flush)
        calls.clear()
        records.append(run_trial(ctx, number, config, lambda epoch, metrics: None, first_attempt=True))
        expected = ["create_run", "log_batch", "set_terminated"] if flush else \
            ["create_run", "log_batch", "log_batch", "log_batch", "log_batch", "set_terminated"]
        assert calls == expected, (flush, calls)
    mlflow = MlflowClient(target.uri)
    for record in records:
        assert record.state == "COMPLETE" and record.logged
        run = mlflow.get_run(record.run_id)
        assert run.data.params["expansion.factor"] == "2" and run.data.params["trial.number"] == str(record.number)
        assert run.info.status == "FINISHED" and run.data.tags["sbsearch.state"] == "COMPLETE"
        # Where and how it trained: the CPU's model, and the way the replicas ran with the timing that chose it.
        assert run.data.tags["sbsearch.device"].startswith("cpu ") and len(run.data.tags["sbsearch.device"]) > 4
        assert re.fullmatch(r"(batched|sequential) \(measured per step: batched [\d.e+-]+ ms, sequential [\d.e+-]+ ms\)",
                            run.data.tags["sbsearch.replicas"]), run.data.tags["sbsearch.replicas"]
        for key in record.history[0]:
            logged = {m.step: m.value for m in mlflow.get_metric_history(record.run_id, key)}
            assert logged == {e: h[key] for e, h in enumerate(record.history, start=1)}, key
    # Not a first attempt: the run of an earlier attempt is looked for, found and reused.
    calls.clear()
    again = run_trial(ctx, 1, config, lambda epoch, metrics: None)
    assert calls[0] == "search_runs" and "create_run" not in calls and again.run_id == records[1].run_id
