"""End to end: a real sweep into a real SQLite MLflow store and a real Optuna journal, cross-checked."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from rich.console import Console

from sbsearch.study import Store
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
    study = Store.open(spec, out, "maximize").study
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
    # Each trial samples with its own seed, (seed, n): parallel trials never propose in lockstep.
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


def test_a_sweep_of_an_older_version_resumes_when_the_new_keys_keep_their_defaults(tmp_path: Path) -> None:
    from sbsearch.errors import SbsearchError

    quiet = Console(file=open("/dev/null", "w"))
    run_sweep(parse_spec(tiny_spec_dict(search__trials=1, train__epochs=1)), tmp_path / "out", console=quiet)
    saved = yaml.safe_load((tmp_path / "out" / "spec.yaml").read_text(encoding="utf-8"))
    older = [("search", "repeat"), ("search", "storage"), ("search", "stale_after"), ("search", "devices"),
             ("search", "trials_per_gpu"), ("data", "augment_crop"), ("data", "augment_flip"), ("data", "cache"),
             *[("train", k) for k in ("nesterov", "schedule", "warmup", "label_smoothing", "precision", "channels_last",
                                      "compile")]]
    for section, key in older:
        del saved[section][key]  # keys that older versions did not write
    del saved["space"]["syre"]  # nor a strategy they did not have
    (tmp_path / "out" / "spec.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    result = run_sweep(parse_spec(tiny_spec_dict(search__trials=2, train__epochs=1)), tmp_path / "out", console=quiet)
    assert [r.number for r in result.records] == [0, 1]
    # A sweep from before the test split trained on more data: at the default split it is still refused.
    del saved["data"]["test_fraction"]
    (tmp_path / "out" / "spec.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    with pytest.raises(SbsearchError, match=r"holds a different sweep \(its spec differs at data.test_fraction\)"):
        run_sweep(parse_spec(tiny_spec_dict(search__trials=3, train__epochs=1)), tmp_path / "out", console=quiet)


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


# --- the fixed schedule: the same spec gives the same sweep at any parallel ----------------------------------


def _schedule_run(raw: dict[str, Any], lag: int, finish_order: list[int]) -> dict[int, dict[str, Any]]:
    """Drive the fixed schedule over a real in-memory study, finishing trials in ``finish_order`` (as
    workers of different speeds would): each slot is sampled as soon as its turn has come."""
    from sbsearch.backends.optuna import OptunaSuggest, _Chosen, _turn_has_come, sample_on_replay
    from sbsearch.space import sample_config

    spec = parse_spec(raw)
    names = {p.name for p in spec.searched}
    study = optuna.create_study(direction="maximize")
    held: dict[int, Any] = {}
    running: dict[int, Any] = {}
    pending = list(finish_order)
    while len(held) < spec.search.trials:
        slot = len(held)
        frozen = {n: study.trials[t.number] for n, t in held.items()}
        if _turn_has_come(frozen, slot, lag, names):
            study.sampler = _Chosen(sample_on_replay(spec, "maximize", frozen, slot, lag))
            trial = study.ask()
            sample_config(spec, OptunaSuggest(trial))
            held[slot] = running[slot] = trial
            continue
        # Not its turn: the next trial in finish_order that is running finishes (its value a function of its params).
        done = next(n for n in pending if n in running)
        pending.remove(done)
        trial = running.pop(done)
        study.tell(trial, float(trial.params.get("dropout.rate", 0.0)) + (trial.params["norm.kind"] == "batch"))
    return {n: dict(t.params) for n, t in held.items()}


def test_fixed_schedule_samples_from_what_the_schedule_says_not_from_timing() -> None:
    raw = tiny_spec_dict(search__trials=10, search__sampler="tpe", space__dropout__rate={"low": 0.0, "high": 0.5})
    in_order = _schedule_run(raw, 2, list(range(10)))
    # Slot 1 is slow: 2 and 3 finish before it (and 3 before 2), and later ones overtake each other too.
    overtaken = _schedule_run(raw, 2, [0, 3, 2, 1, 5, 4, 6, 8, 7, 9])
    assert overtaken == in_order
    # TPE's startup (4 trials here) is over: later slots are proposed from what finished, yet still agree.
    assert len({p["dropout.rate"] for p in in_order.values()}) == 10
    # Another lag is another schedule: slot 5 sees slots 0..4 instead of 0..3.
    assert _schedule_run(raw, 1, list(range(10))) != in_order


def test_replay_shows_finished_slots_with_values_and_later_ones_running_without() -> None:
    from sbsearch.backends.optuna import replay_study

    study = optuna.create_study(direction="maximize")
    for value in (0.1, 0.2, 0.3):
        trial = study.ask()
        trial.suggest_float("x", 0, 1)
        trial.report(value, 1)
        study.tell(trial, value)
    held = dict(enumerate(study.trials))
    replay = replay_study("maximize", held, 3, 2)  # slot 3 sees slots 0 and 1 finished; slot 2 runs
    assert [t.state.name for t in replay.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert [t.value for t in replay.trials] == [0.1, 0.2, None]
    assert replay.trials[2].params == study.trials[2].params and not replay.trials[2].intermediate_values
    assert replay.trials[1].intermediate_values == {1: 0.2}


def test_a_workers_kept_replay_study_samples_what_a_fresh_one_does() -> None:
    from sbsearch.backends.optuna import OptunaSuggest, _Chosen, _ScheduleCache, _turn_has_come, sample_on_replay
    from sbsearch.space import sample_config
    from sbsearch.study import as_peer

    spec = parse_spec(tiny_spec_dict(search__trials=12, search__sampler="tpe", space__dropout__rate={"low": 0.0, "high": 0.5}))
    names, lag = {p.name for p in spec.searched}, 2
    study = optuna.create_study(direction="maximize")
    cache = _ScheduleCache("maximize", "val_accuracy")
    running: list[Any] = []
    for slot in range(12):
        frozen = dict(enumerate(study.trials))
        while not _turn_has_come(frozen, slot, lag, names):  # the oldest running trial finishes
            trial = running.pop(0)
            trial.report(0.5, 1)
            study.tell(trial, float(trial.params["dropout.rate"]))
            frozen = dict(enumerate(study.trials))
        values = cache.sample(spec, frozen, slot, lag)
        assert values == sample_on_replay(spec, "maximize", frozen, slot, lag)
        assert cache.peers_of(frozen, slot, lag) == [as_peer(frozen[n], "val_accuracy", n) for n in range(slot - lag + 1)]
        study.sampler = _Chosen(values)
        trial = study.ask()
        sample_config(spec, OptunaSuggest(trial))
        running.append(trial)
    assert len(cache.study.trials) == 11 - lag + 1  # slots 0..9, finished: the running ones were dropped again


def test_fixed_schedule_waits_for_earlier_slots_and_their_values() -> None:
    from sbsearch.backends.optuna import _turn_has_come

    study = optuna.create_study(direction="maximize")
    finished = study.ask()
    finished.suggest_float("x", 0, 1)
    study.tell(finished, 0.5)
    with_values = study.ask()
    with_values.suggest_float("x", 0, 1)
    study.ask()  # claimed, values not drawn yet
    t = study.trials
    assert _turn_has_come({0: t[0], 1: t[1]}, 2, 2, {"x"})  # slot 0 finished, slot 1 has its values
    assert not _turn_has_come({0: t[0], 1: t[1]}, 2, 1, {"x"})  # lag 1: slot 1 must have finished
    assert not _turn_has_come({0: t[0], 1: t[1], 2: t[2]}, 3, 2, {"x"})  # slot 1 running, and 1 <= 3 - 2
    assert not _turn_has_come({0: t[0], 1: t[1], 2: t[2]}, 3, 3, {"x"})  # slot 2 has no values yet
    assert not _turn_has_come({0: t[0], 2: t[2]}, 3, 3, {"x"})  # nobody holds slot 1


def test_grid_under_the_fixed_schedule_gives_each_cell_once() -> None:
    raw = tiny_spec_dict(search__sampler="grid", search__trials=8)
    params = _schedule_run(raw, 3, [0, 2, 1, 4, 3, 5, 7, 6])
    assert len({tuple(sorted(p.items())) for p in params.values()}) == 8


def _rows_without_timing(out: Path) -> list[dict[str, str]]:
    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: v for k, v in row.items() if k not in ("seconds", "startup_seconds", "mlflow_run_id")} for row in rows]


@pytest.mark.slow
def test_two_runs_at_parallel_2_give_the_same_sweep(tmp_path: Path) -> None:
    raw = tiny_spec_dict(search__trials=8, search__parallel=2, search__sampler="tpe", search__pruner="median",
                         search__warmup_epochs=1, train__epochs=3, space__dropout__rate={"low": 0.0, "high": 0.5})
    quiet = Console(quiet=True)
    first = run_sweep(parse_spec(raw), tmp_path / "a", console=quiet)
    second = run_sweep(parse_spec(raw), tmp_path / "b", console=quiet)
    assert _rows_without_timing(tmp_path / "a") == _rows_without_timing(tmp_path / "b")
    # The sweep exercised what could make runs differ: TPE past its startup (4) and the pruning rule.
    assert {r.state for r in first.records} >= {"COMPLETE", "PRUNED"}, [r.state for r in first.records]
    assert len(second.records) == 8


# --- the held-out test split: chosen on validation, measured on test -------------------------------

def test_trainer_measures_the_test_split_once_and_never_reports_it() -> None:
    from dataclasses import replace

    import torch

    from sbsearch.data import load_dataset, prepare
    from sbsearch.strategies import STRATEGIES, ModelDesc
    from sbsearch.trainer import TrainPlan, train

    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    assert split.x_test is not None and split.y_test is not None
    desc = ModelDesc("small_cnn", (1, 8, 8), 10, width=4, depth=1)
    plan = TrainPlan(epochs=2, replicas=2, batch_size=128, lr=0.01)
    reported: list[dict[str, float]] = []
    result = train(split, desc, plan, lambda epoch, metrics: reported.append(dict(metrics)) is not None)
    assert set(result.test) == {"test_accuracy", "test_accuracy_std", "test_loss"}
    assert not any(key.startswith("test_") for metrics in reported for key in metrics)
    # It is the test split that is measured: the validation split in its place gives the validation numbers.
    as_val = train(replace(split, x_test=split.x_val, y_test=split.y_val), desc, plan)
    assert as_val.test["test_accuracy"] == pytest.approx(as_val.final["val_accuracy"])
    assert as_val.test["test_loss"] == pytest.approx(as_val.final["val_loss"])
    shuffled = replace(split, y_test=split.y_test[torch.randperm(len(split.y_test), generator=torch.Generator().manual_seed(0))])
    assert train(shuffled, desc, plan).test["test_accuracy"] < result.test["test_accuracy"] - 0.2
    # A trial stopped early is not a candidate: nothing is measured.
    assert train(split, desc, plan, lambda epoch, metrics: True).test == {}


@pytest.mark.slow
def test_a_finished_sweep_shows_test_numbers_for_the_top_five_chosen_on_validation(tmp_path: Path) -> None:
    import io
    import math

    raw = tiny_spec_dict(search__trials=7, train__replicas=2,
                         space={"expansion": {"factor": [1, 2], "fill": [0.0, 0.5]}, "norm": {"kind": ["none", "batch"]},
                                "dropout": {"rate": {"low": 0.0, "high": 0.5}}})
    out = tmp_path / "out"
    console = Console(file=io.StringIO(), width=200)
    result = run_sweep(parse_spec(raw), out, console=console)
    from sbsearch.sweep import print_summary

    print_summary(result, console)
    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    assert len(complete) >= 6
    ranked = sorted(complete, key=lambda r: (-float(r["val_accuracy"]), int(r["number"])))
    chosen = {int(r["number"]): rank for rank, r in enumerate(ranked[:5], start=1)}
    for row in rows:
        number = int(row["number"])
        if number in chosen:
            assert int(row["heldout_rank"]) == chosen[number]
            assert 0.0 <= float(row["test_accuracy"]) <= 1.0 and float(row["test_accuracy_std"]) >= 0.0
        else:
            assert row["heldout_rank"] == row["test_accuracy"] == row["test_loss"] == ""
    # Test numbers of their own, not the validation numbers copied.
    assert any(not math.isclose(float(r["test_accuracy"]), float(r["val_accuracy"])) for r in ranked[:5])
    parent, children = _runs(f"sqlite:///{out / 'mlflow.db'}", "tiny")
    with_test = {int(c.data.tags["sbsearch.trial_number"]): c for c in children if "test_accuracy" in c.data.metrics}
    assert set(with_test) == set(chosen)
    for number, child in with_test.items():
        row = next(r for r in rows if int(r["number"]) == number)
        assert child.data.metrics["test_accuracy"] == pytest.approx(float(row["test_accuracy"]))
        assert child.data.tags["sbsearch.heldout_rank"] == str(chosen[number])
    best = ranked[0]
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(float(best["test_accuracy"]))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "chosen on validation (val_accuracy), measured on test" in text
    assert f"held-out test_accuracy = {float(best['test_accuracy']):.4g}" in text
