"""The pruning rules on handcrafted peer histories, and one real Optuna sweep per score-driven rule."""

from __future__ import annotations

import csv
from dataclasses import fields
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console

from sbsearch.errors import SpecError
from sbsearch.pruning import (
    PRUNERS,
    CombinedRule,
    HyperbandRule,
    MedianRule,
    PeerTrial,
    PruningRule,
    SuccessiveHalvingRule,
    WassersteinRule,
    learned_sign,
    make_rule,
    rule_for,
)
from sbsearch.spec import parse_spec, spec_to_dict
from sbsearch.study import Store, same_sweep_changes
from sbsearch.sweep import run_sweep
from tests.conftest import tiny_spec_dict
from tests.test_sweep import check_records_agree

ACC = "val_accuracy"


def done(number: int, curve: dict[int, tuple[float, float]], final: float) -> PeerTrial:
    """A completed peer: {epoch: (accuracy, sb_score)} and its final accuracy."""
    return PeerTrial(number, "COMPLETE", {e: {ACC: a, "sb_score": s} for e, (a, s) in curve.items()}, final)


def running(number: int, curve: dict[int, tuple[float, float]], state: str = "RUNNING") -> PeerTrial:
    return PeerTrial(number, state, {e: {ACC: a, "sb_score": s} for e, (a, s) in curve.items()})


# Five completed trials where a high score at epoch 2 goes with a high final accuracy.
RISING = [done(i, {1: (0.5, s), 2: (0.6 + 0.01 * i, s)}, final) for i, (s, final) in
          enumerate([(0.1, 0.80), (0.2, 0.85), (0.3, 0.88), (0.4, 0.91), (0.5, 0.95)])]


def flipped(peers: list[PeerTrial]) -> list[PeerTrial]:
    """The same trials with every final accuracy mirrored: the correlation changes sign."""
    return [PeerTrial(p.number, p.state, p.history, None if p.final is None else 1.8 - p.final) for p in peers]


def test_a_repeated_network_is_no_new_evidence_for_the_learned_direction() -> None:
    # Four distinct trials are too few for significance at alpha 0.05 ...
    assert learned_sign(RISING[:4], 2, "sb_score", alpha=0.05, min_finished=4)[0] == 0
    # ... and repeats of them (a sweep's trials share seeds: the same network gives the same numbers) add nothing.
    repeats = [PeerTrial(10 + p.number, p.state, p.history, p.final) for p in RISING[:4]]
    sign, words = learned_sign(RISING[:4] + repeats + repeats, 2, "sb_score", alpha=0.05, min_finished=4)
    assert sign == 0 and "over 4 completed trials" in words


def test_median_rule_compares_with_completed_peers_only() -> None:
    rule = MedianRule(ACC, "maximize", warmup_epochs=2)
    peers = [done(i, {2: (a, 0.0)}, a) for i, a in enumerate([0.6, 0.7, 0.8])]
    assert rule.decide(2, {ACC: 0.65}, peers) is not None
    assert rule.decide(2, {ACC: 0.75}, peers) is None
    assert rule.decide(1, {ACC: 0.1}, peers) is None  # warm-up
    assert rule.decide(2, {ACC: 0.1}, peers[:2]) is None  # too few peers
    # Running and pruned peers do not count for the median.
    assert rule.decide(2, {ACC: 0.65}, [running(9, {2: (0.0, 0.0)}, s) for s in ("RUNNING", "PRUNED")] * 3) is None
    mse = [PeerTrial(i, "COMPLETE", {1: {"val_mse": v}}, v) for i, v in enumerate([0.1, 0.2, 0.3])]
    assert MedianRule("val_mse", "minimize", 1).decide(1, {"val_mse": 0.5}, mse) is not None
    assert MedianRule("val_mse", "minimize", 1).decide(1, {"val_mse": 0.15}, mse) is None


def test_successive_halving_keeps_the_top_third_at_rungs_only() -> None:
    rule = SuccessiveHalvingRule(ACC, "maximize", warmup_epochs=1, reduction_factor=3)
    # Five peers reached epoch 1, one of them still running and one pruned later: all count at the rung.
    peers = [running(0, {1: (0.9, 0)}), running(1, {1: (0.8, 0)}, "PRUNED"), done(2, {1: (0.7, 0)}, 0.9),
             done(3, {1: (0.6, 0)}, 0.9), done(4, {1: (0.5, 0)}, 0.9)]
    # 6 trials at the rung: the best 2 go on.
    assert rule.decide(1, {ACC: 0.95}, peers) is None
    assert rule.decide(1, {ACC: 0.85}, peers) is None
    reason = rule.decide(1, {ACC: 0.75}, peers)
    assert reason is not None and reason.startswith("successive_halving") and "ranks 3 of 6" in reason
    assert rule.decide(2, {ACC: 0.1}, [running(i, {2: (0.9, 0)}) for i in range(5)]) is None  # 2 is no rung
    assert rule.decide(3, {ACC: 0.1}, [running(i, {3: (0.9, 0)}) for i in range(5)]) is not None  # 3 is
    assert rule.decide(1, {ACC: 0.1}, peers[:2]) is None  # too few peers


def test_hyperband_compares_within_the_trials_bracket() -> None:
    rule = HyperbandRule(ACC, "maximize", warmup_epochs=1, reduction_factor=3, epochs=9)
    assert rule.brackets == 2  # first rungs at 1 and 3; 9 is the last epoch
    peers = [running(n, {1: (0.9, 0), 3: (0.9, 0)}) for n in range(10)]
    # Trial 10 is in bracket 0 (first rung 1), compared with trials 0, 2, 4, 6, 8 (all better).
    assert rule.decide(1, {ACC: 0.5}, peers, number=10) is not None
    # Trial 11 is in bracket 1: no rung at epoch 1, its first judgement comes at epoch 3.
    assert rule.decide(1, {ACC: 0.5}, peers, number=11) is None
    reason = rule.decide(3, {ACC: 0.5}, peers, number=11)
    assert reason is not None and "bracket 1 of 2" in reason and "of 6 trials" in reason


def test_learned_direction_follows_the_sign_of_the_correlation() -> None:
    assert learned_sign(RISING, 2, "sb_score", alpha=0.05, min_finished=5)[0] == 1
    assert learned_sign(flipped(RISING), 2, "sb_score", alpha=0.05, min_finished=5)[0] == -1
    assert learned_sign(RISING[:4], 2, "sb_score", alpha=0.05, min_finished=5)[0] == 0  # too few
    assert learned_sign(RISING[:4], 2, "sb_score", alpha=0.05, min_finished=4)[0] == 0  # not significant
    rule = WassersteinRule(ACC, "maximize", warmup_epochs=2, fallback="none")
    low, high = {ACC: 0.7, "sb_score": 0.15}, {ACC: 0.7, "sb_score": 0.45}
    reason = rule.decide(2, low, RISING)
    assert reason is not None and "learned: high is good" in reason
    assert rule.decide(2, high, RISING) is None
    reason = rule.decide(2, high, flipped(RISING))
    assert reason is not None and "learned: low is good" in reason
    assert rule.decide(2, low, flipped(RISING)) is None
    # For an objective to minimise, the same positive correlation makes a low score good.
    mse = [PeerTrial(p.number, p.state, {e: {"val_mse": 1 - m[ACC], "sb_score": m["sb_score"]} for e, m in p.history.items()},
                     p.final) for p in RISING]
    assert WassersteinRule("val_mse", "minimize", 2, fallback="none").decide(2, {"val_mse": 0.3, "sb_score": 0.45}, mse) is not None


def test_wasserstein_with_a_fixed_direction_and_its_fallback() -> None:
    rule = WassersteinRule(ACC, "maximize", warmup_epochs=2, score_direction="low_is_good", quantile=0.5)
    peers = [running(i, {2: (0.5, s)}) for i, s in enumerate([0.1, 0.2, 0.3, 0.4])]  # nothing completed yet
    assert rule.decide(2, {ACC: 0.9, "sb_score": 0.35}, peers) is not None  # 3 of 4 peers are better
    assert rule.decide(2, {ACC: 0.1, "sb_score": 0.25}, peers) is None  # half are better: not in the worst half
    assert rule.decide(1, {ACC: 0.1, "sb_score": 9.9}, peers) is None  # warm-up
    assert rule.decide(2, {ACC: 0.1, "sb_score": 9.9}, peers[:2]) is None  # too few peers
    narrow = WassersteinRule(ACC, "maximize", 2, score_direction="high_is_good", quantile=0.25)
    assert narrow.decide(2, {ACC: 0.5, "sb_score": 0.15}, peers) is None  # only 3 of 4 better, not all
    assert narrow.decide(2, {ACC: 0.5, "sb_score": 0.05}, peers) is not None
    # Learned, with nothing completed: the median fallback decides on the accuracy.
    learned = WassersteinRule(ACC, "maximize", warmup_epochs=2)
    half = [done(i, {2: (a, 0.1 * i)}, 0.9) for i, a in enumerate([0.6, 0.7, 0.8])]
    reason = learned.decide(2, {ACC: 0.5, "sb_score": 0.3}, half)
    assert reason is not None and reason.startswith("median:") and "direction not known yet" in reason
    assert WassersteinRule(ACC, "maximize", 2, fallback="none").decide(2, {ACC: 0.5, "sb_score": 0.3}, half) is None


def test_combined_rule_predicts_the_final_metric_from_metric_and_score() -> None:
    # The final accuracy is early accuracy + score: neither alone orders the trials.
    finals = [(0.60, 0.30), (0.70, 0.10), (0.65, 0.25), (0.80, 0.05), (0.62, 0.20), (0.75, 0.15)]
    peers = [done(i, {2: (a, s)}, a + s) for i, (a, s) in enumerate(finals)]
    rule = CombinedRule(ACC, "maximize", warmup_epochs=2, quantile=0.5, fallback="none")
    # Predicted 0.58 + 0.40 = 0.98: better than every peer although its accuracy is the lowest.
    assert rule.decide(2, {ACC: 0.58, "sb_score": 0.40}, peers) is None
    reason = rule.decide(2, {ACC: 0.72, "sb_score": 0.0}, peers)  # 0.72: worse than 5 of 6
    assert reason is not None and reason.startswith("combined: predicted final val_accuracy=0.72")
    assert rule.decide(2, {ACC: 0.72, "sb_score": 0.0}, peers[:4]) is None  # fewer than min_finished: fallback none
    # The median fallback before the fit: 0.3 is below the median accuracy of the completed trials.
    median_fallback = CombinedRule(ACC, "maximize", warmup_epochs=2)
    reason = median_fallback.decide(2, {ACC: 0.3, "sb_score": 0.0}, peers[:4])
    assert reason is not None and reason.startswith("median:")
    assert rule.decide(1, {ACC: 0.0, "sb_score": 0.0}, peers) is None  # warm-up
    # Without the score (combined_features: []) the fit sees accuracy alone: whichever way its slope
    # goes, one accuracy far outside the peers' is predicted worst, and the fit names no score.
    metric_only = make_rule("combined", ACC, "maximize", 2, fallback="none", combined_features=())
    reasons = [metric_only.decide(2, {ACC: a, "sb_score": 0.40}, peers) for a in (-5.0, 5.0)]
    [reason] = [r for r in reasons if r is not None]
    assert "sb_score" not in reason and reason.endswith("*val_accuracy)")


MSE = "val_mse"


def drift_peers(drift_logged: bool = True) -> list[PeerTrial]:
    """Six completed trials of a task to minimise whose final val_mse is 0.3 - 0.25 * sb_drift at epoch 2,
    while their val_mse at epoch 2 orders the finals the wrong way round (Spearman -0.49)."""
    early = [(0.30, 0.9), (0.10, 0.1), (0.20, 0.5), (0.25, 0.3), (0.15, 0.7), (0.35, 0.6)]
    return [PeerTrial(i, "COMPLETE", {2: {MSE: m, "sb_score": 0.2, **({"sb_drift": d} if drift_logged else {})}},
                      0.3 - 0.25 * d) for i, (m, d) in enumerate(early)]


def combined(features: list[str], **search: object) -> PruningRule:
    """The combined rule a spec with ``search.combined_features: features`` runs, for val_mse."""
    options = {"pruner": "combined", "fallback": "none", "combined_features": features, **search}
    raw = tiny_spec_dict(**{f"search__{k}": v for k, v in options.items()})
    return rule_for(parse_spec(raw), MSE, "minimize")


def test_combined_rule_fits_on_sb_drift_when_asked() -> None:
    peers = drift_peers()
    # A trial whose weights moved far (drift 0.95: predicted final 0.06, the best) and one whose weights
    # barely moved (drift 0.05: 0.29, the worst), with a low and a high early error.
    moved, stuck = {MSE: 0.12, "sb_drift": 0.95, "sb_score": 0.2}, {MSE: 0.33, "sb_drift": 0.05, "sb_score": 0.2}
    metric_only = combined([])
    # On the metric alone the misleading early error decides: the trial that moved goes, the stuck one stays.
    assert metric_only.decide(2, moved, peers) is not None
    assert metric_only.decide(2, stuck, peers) is None
    for features in (["sb_drift"], ["sb_score", "sb_drift"]):
        rule = combined(features)
        assert rule.decide(2, moved, peers) is None
        reason = rule.decide(2, stuck, peers)
        # The reason names each feature with its coefficient; the fit found the slope -0.25 on sb_drift.
        assert reason is not None and reason.startswith("combined: predicted final val_mse=0.2875"), reason
        assert "*val_mse" in reason and "-0.25*sb_drift)" in reason and ("*sb_score" in reason) == (len(features) == 2)
    # sb_score alone (the default) adds nothing here: every trial has the same score, so it decides as the metric.
    assert combined(["sb_score"]).decide(2, stuck, peers) is None


def test_combined_rule_without_drift_fits_what_the_trial_logged() -> None:
    peers = drift_peers()
    rule = combined(["sb_drift"])
    moved = {MSE: 0.12, "sb_score": 0.2}  # the trials above, with no sb_drift logged
    stuck = {MSE: 0.33, "sb_score": 0.2}
    # A trial that did not log sb_drift is fitted on the metric alone, as the metric-only rule fits it, and
    # the reason says what was left out.
    assert rule.decide(2, stuck, peers) is None
    metric_only = combined([]).decide(2, moved, peers)
    assert metric_only is not None and metric_only.endswith("*val_mse)")
    assert rule.decide(2, moved, peers) == f"{metric_only[:-1]}; without sb_drift, which this trial did not log)"
    # A trial with one replica has no sb_score: with both features it is fitted on the metric and sb_drift.
    one_replica = combined(["sb_score", "sb_drift"]).decide(2, {MSE: 0.33, "sb_drift": 0.05}, peers)
    assert one_replica is not None and "-0.25*sb_drift; without sb_score" in one_replica, one_replica
    # Peers that did not log sb_drift cannot be fitted on it: too few completed trials, so the fallback
    # decides (none here; the median of the completed trials' val_mse with fallback: median).
    blind = drift_peers(drift_logged=False)
    assert rule.decide(2, {MSE: 0.12, "sb_drift": 0.05}, blind) is None
    reason = combined(["sb_drift"], fallback="median").decide(2, {MSE: 0.34, "sb_drift": 0.05}, blind)
    assert reason is not None and reason.startswith("median:") and "; combined: 0 of 5 completed trials needed" in reason


def test_combined_features_key_validates_and_refuses_bad_values() -> None:
    def problems(**search: object) -> str:
        with pytest.raises(SpecError) as caught:
            parse_spec(tiny_spec_dict(**{f"search__{k}": v for k, v in search.items()}))
        return str(caught.value)

    assert parse_spec(tiny_spec_dict()).search.combined_features == ("sb_score",)
    for features in ([], ["sb_drift"], ["sb_drift", "sb_score"]):
        assert parse_spec(tiny_spec_dict(search__combined_features=features)).search.combined_features == tuple(features)
    assert problems(combined_features=["drift"]) == ("search.combined_features[0]: must be a registered name, but got "
                                                     "'drift' (did you mean 'sb_drift'?)")
    assert problems(combined_features=["sb_score", "val_loss"]).startswith(
        "search.combined_features[1]: must be a registered name, but got 'val_loss' (allowed: sb_drift, sb_score)")
    assert problems(combined_features="sb_drift") == "search.combined_features: must be a list of names, but got 'sb_drift'"
    assert problems(combined_features=None) == "search.combined_features: must be a list of names, but got None"
    assert problems(combined_features=["sb_drift", "sb_drift"]).startswith(
        "search.combined_features: must not name a metric twice, but got")
    # The key it replaced still validates, as what it meant.
    assert parse_spec(tiny_spec_dict(search__combined_score=True)).search.combined_features == ("sb_score",)
    assert parse_spec(tiny_spec_dict(search__combined_score=False)).search.combined_features == ()
    assert problems(combined_score="no") == "search.combined_score: must be true or false, but got 'no'"
    assert problems(combined_score=False, combined_features=[]) == (
        "search.combined_score: was replaced by combined_features: give only that key, but got False")


@pytest.mark.parametrize("old, new, differs", [
    (True, ["sb_score"], []), (False, [], []), (False, ["sb_score"], ["search.combined_features"]),
    (True, ["sb_score", "sb_drift"], ["search.combined_features"]),
])
def test_a_sweep_written_with_combined_score_resumes_with_what_it_meant(old: bool, new: list[str],
                                                                        differs: list[str]) -> None:
    before = spec_to_dict(parse_spec(tiny_spec_dict(search__pruner="combined")))
    del before["search"]["combined_features"]
    before["search"]["combined_score"] = old  # what sbsearch wrote before combined_features replaced it
    now = spec_to_dict(parse_spec(tiny_spec_dict(search__pruner="combined", search__combined_features=new)))
    assert same_sweep_changes(before, now) == differs


# Every option of make_rule away from its default, and which of them each rule must receive.
OPTIONS: dict[str, Any] = {"epochs": 27, "reduction_factor": 2, "quantile": 0.25, "score_direction": "high_is_good",
                           "fallback": "none", "alpha": 0.1, "min_finished": 7,
                           "combined_features": ("sb_drift",)}
TAKES: dict[str, dict[str, object]] = {
    "none": {},
    "median": {},
    "successive_halving": {"reduction_factor": 2},
    "hyperband": {"reduction_factor": 2, "epochs": 27},
    "wasserstein": {"quantile": 0.25, "score_direction": "high_is_good", "fallback": "none", "alpha": 0.1,
                    "min_finished": 7},
    "combined": {"quantile": 0.25, "fallback": "none", "min_finished": 7, "features": ("sb_drift",)},
}


@pytest.mark.parametrize("name", PRUNERS)
def test_make_rule_passes_the_options_each_rule_takes(name: str) -> None:
    rule = make_rule(name, "val_mse", "minimize", 4, **OPTIONS)
    assert type(rule) is PRUNERS[name]
    assert (rule.metric, rule.direction, rule.warmup_epochs) == ("val_mse", "minimize", 4)
    # Each option the rule has arrives; a rule that gains an option fails here until it is passed on.
    own = {f.name: getattr(rule, f.name) for f in fields(rule) if f.name not in {f.name for f in fields(PruningRule)}}
    assert own == TAKES[name]


def test_no_pruning_never_prunes() -> None:
    rule = make_rule("none", ACC, "maximize", 0)
    assert rule.decide(5, {ACC: 0.0, "sb_score": 9.9}, [done(i, {5: (0.9, 0.1)}, 0.9) for i in range(5)]) is None


# --- real sweeps ---------------------------------------------------------------------------------


def _pruned_everywhere(out: Path, raw: dict[str, object], trials: int) -> list[str]:
    """Records agree, and every pruned trial carries the same reason in Optuna, MLflow and trials.csv;
    the reasons, in trial order."""
    check_records_agree(out, raw, trials)
    spec = parse_spec(raw)
    with open(out / "trials.csv", newline="", encoding="utf-8") as handle:
        rows = {int(r["number"]): r for r in csv.DictReader(handle)}
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    runs = {int(r.data.tags["sbsearch.trial_number"]): r for r in
            client.search_runs([client.get_experiment_by_name(spec.name).experiment_id]) if "sbsearch.trial_number" in r.data.tags}
    store = Store.load(spec, out)
    assert store is not None
    study = store.study
    reasons = []
    for t in study.trials:
        if t.state != optuna.trial.TrialState.PRUNED:
            continue
        reason = t.user_attrs["sbsearch.record"]["reason"]
        assert rows[t.number]["state"] == "PRUNED" and rows[t.number]["reason"] == reason
        assert runs[t.number].data.tags["sbsearch.state"] == "PRUNED"
        assert runs[t.number].data.tags["sbsearch.reason"] == reason
        reasons.append(reason)
    return reasons


@pytest.mark.slow
@pytest.mark.parametrize("pruner, options, own, fallback", [
    # A fixed direction prunes as soon as 3 peers reached the epoch, with no fallback.
    ("wasserstein", {"score_direction": "high_is_good"}, "wasserstein:", None),
    # The least-squares fit needs min_finished completed trials; the median rule stands in before,
    # saying so. The fit itself must prune at least once, or the sweep tests only its fallback.
    ("combined", {"min_finished": 3}, "combined:", "median:"),
    ("hyperband", {}, "hyperband (bracket", None),
])
def test_a_real_sweep_prunes_with_the_rules_reason(tmp_path: Path, pruner: str, options: dict[str, object],
                                                   own: str, fallback: str | None) -> None:
    raw = tiny_spec_dict(search__trials=8, train__epochs=3, search__pruner=pruner, search__warmup_epochs=1,
                         search__prune_quantile=0.75, train__replicas=2, data__val_fraction=0.5,
                         **{f"search__{k}": v for k, v in options.items()})
    run_sweep(parse_spec(raw), tmp_path / "out", console=Console(file=open("/dev/null", "w")))
    reasons = _pruned_everywhere(tmp_path / "out", raw, 8)
    assert any(r.startswith(own) for r in reasons), reasons
    for reason in reasons:
        # A fallback's reason names the rule it stands in for: "median: ...; combined: 2 of 3 ... needed".
        by_fallback = fallback is not None and reason.startswith(fallback) and f"; {own}" in reason
        assert reason.startswith(own) or by_fallback, reason


def test_optuna_peers_show_running_trials_epochs_and_completed_finals(tmp_path: Path) -> None:
    store = Store.open(parse_spec(tiny_spec_dict()), tmp_path, "maximize")
    study = store.study
    finished = study.ask()
    finished.report(0.5, 1)
    finished.set_user_attr("sbsearch.record", {"history": [{ACC: 0.5, "sb_score": 0.2}]})
    study.tell(finished, 0.9)
    running_trial = study.ask()
    history: list[dict[str, float]] = []
    for epoch, (acc, score) in enumerate([(0.4, 0.1), (0.6, 0.3)], start=1):
        store.report_epoch(running_trial, epoch, ACC, {ACC: acc, "sb_score": score, "sb_score.conv1": 9.0}, history)
    me = study.ask()
    peers = {p.number: p for p in store.peers(me.number, ACC)}
    assert set(peers) == {finished.number, running_trial.number}
    assert peers[finished.number].state == "COMPLETE" and peers[finished.number].final == 0.9
    assert peers[finished.number].at(1, "sb_score") == 0.2
    assert peers[running_trial.number].state == "RUNNING" and peers[running_trial.number].final is None
    assert peers[running_trial.number].at(2, ACC) == 0.6 and peers[running_trial.number].at(3, ACC) is None
    assert peers[running_trial.number].at(2, "sb_score.conv1") is None  # per-layer scores stay out of the store
    assert store.trial(running_trial.number).intermediate_values == {1: 0.4, 2: 0.6}
