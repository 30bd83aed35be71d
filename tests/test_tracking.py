"""The MLflow side of a sweep (``sbsearch.tracking.Tracker``), on a real SQLite tracking store."""

from __future__ import annotations

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
    for epoch, acc in enumerate([0.5, 0.7], start=1):
        tracker.log_epoch(run, epoch, {"val_accuracy": acc})
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
