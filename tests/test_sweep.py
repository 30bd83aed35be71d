"""End to end: a real sweep into a real SQLite MLflow store and a real Optuna journal, cross-checked."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from sbsearch.backends.optuna import open_study
from sbsearch.spec import parse_spec
from sbsearch.sweep import run_sweep
from tests.conftest import tiny_spec_dict


def _runs(uri: str, experiment: str) -> tuple[Any, list[Any]]:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("sbsearch.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("sbsearch.role") == "trial"]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    return parents[0], children


def check_records_agree(out: Path, spec_raw: dict[str, Any], expected_trials: int) -> None:
    """MLflow, the Optuna storage and trials.csv tell the same story, one entry per trial."""
    spec = parse_spec(spec_raw)
    uri = f"sqlite:///{out / 'mlflow.db'}"
    parent, children = _runs(uri, spec.name)
    client = MlflowClient(tracking_uri=uri)
    study = open_study(spec, out, "maximize")
    trials = [t for t in study.get_trials() if not t.user_attrs.get("sbsearch.interrupted")]
    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(trials) == len(rows) == len(children) == expected_trials
    by_number = {int(c.data.tags["sbsearch.trial_number"]): c for c in children}
    assert sorted(by_number) == sorted(t.number for t in trials) == sorted(int(r["number"]) for r in rows)
    optuna_state = {optuna.trial.TrialState.COMPLETE: "COMPLETE", optuna.trial.TrialState.PRUNED: "PRUNED",
                    optuna.trial.TrialState.FAIL: "FAIL"}
    for t, row in zip(sorted(trials, key=lambda t: t.number), sorted(rows, key=lambda r: int(r["number"]))):
        child = by_number[t.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["sbsearch.state"] == row["state"] == optuna_state[t.state]
        assert child.info.run_name.startswith(f"trial-{t.number:03d}")
        for name in ("expansion.factor", "expansion.fill", "norm.kind", "dropout.rate"):
            assert name in child.data.params
        for name, value in t.params.items():
            assert child.data.params[name] == str(value) and row[name] == str(value)
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(1, int(row["epochs_run"]) + 1))
        assert sorted(t.intermediate_values) == [m.step for m in history]
        for name in ("train_loss", "val_loss"):
            assert len(client.get_metric_history(child.info.run_id, name)) == len(history)
        if row["state"] == "COMPLETE":
            assert float(row["val_accuracy"]) == pytest.approx(t.value)
            assert child.data.metrics["final.val_accuracy"] == pytest.approx(t.value)
            assert child.info.status == "FINISHED"
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    assert parent.data.metrics["trials_complete"] == counts["COMPLETE"]
    assert parent.data.metrics["trials_total"] == expected_trials
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "trials.csv"} <= artifacts


def test_sweep_in_process_records_agree(tmp_path: Path) -> None:
    raw = tiny_spec_dict()
    result = run_sweep(parse_spec(raw), tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    assert len(result.records) == 3 and result.best is not None
    check_records_agree(tmp_path / "out", raw, 3)


@pytest.mark.slow
def test_parallel_sweep_with_pruning_records_agree(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__trials=6, search__parallel=2, search__pruner="median", search__warmup_epochs=0,
                         train__epochs=3, space__dropout__rate={"low": 0.0, "high": 0.5})
    result = run_sweep(parse_spec(raw), tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    assert len(result.records) == 6
    # Each worker process samples with its own seed: workers never propose in lockstep.
    assert len({r.params["dropout.rate"] for r in result.records}) == 6
    check_records_agree(tmp_path / "out", raw, 6)


def test_rerun_of_a_finished_sweep_adds_nothing_and_more_trials_extend_it(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__trials=2, train__epochs=1)
    quiet = Console(file=open("/dev/null", "w"))
    run_sweep(parse_spec(raw), tmp_path / "out", console=quiet)
    again = run_sweep(parse_spec(raw), tmp_path / "out", console=quiet)
    assert [r.number for r in again.records] == [0, 1]
    check_records_agree(tmp_path / "out", raw, 2)
    more = tiny_spec_dict(search__trials=3, train__epochs=1)
    run_sweep(parse_spec(more), tmp_path / "out", console=quiet)
    check_records_agree(tmp_path / "out", more, 3)


def test_a_different_spec_in_the_same_out_is_refused(tmp_path: Path) -> None:
    from sbsearch.errors import SbsearchError

    quiet = Console(file=open("/dev/null", "w"))
    run_sweep(parse_spec(tiny_spec_dict(search__trials=1, train__epochs=1)), tmp_path / "out", console=quiet)
    with pytest.raises(SbsearchError, match=r"--out: .* holds a different sweep \(its spec differs at train.lr\)"):
        run_sweep(parse_spec(tiny_spec_dict(search__trials=1, train__epochs=1, train__lr=0.5)), tmp_path / "out", console=quiet)


def test_grid_sampler_covers_the_grid_once(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__sampler="grid", search__trials=50, train__epochs=1)
    result = run_sweep(parse_spec(raw), tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    combos = {tuple(sorted(r.params.items())) for r in result.records}
    assert len(result.records) == len(combos) == 8


def test_a_sweep_begun_again_in_a_recreated_folder_gets_its_own_parent_run(tmp_path: Path) -> None:
    import shutil

    quiet = Console(file=open("/dev/null", "w"))
    raw = tiny_spec_dict(search__trials=1, train__epochs=1)
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    first = run_sweep(parse_spec(raw), tmp_path / "out", tracking_uri=uri, console=quiet)
    shutil.rmtree(tmp_path / "out")
    second = run_sweep(parse_spec(raw), tmp_path / "out", tracking_uri=uri, console=quiet)
    assert first.parent_run_id != second.parent_run_id
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("tiny")
    for parent in (first.parent_run_id, second.parent_run_id):
        children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
        assert len(children) == 1
    # Resuming in the same folder keeps the parent run.
    third = run_sweep(parse_spec(tiny_spec_dict(search__trials=2, train__epochs=1)), tmp_path / "out",
                      tracking_uri=uri, console=quiet)
    assert third.parent_run_id == second.parent_run_id
