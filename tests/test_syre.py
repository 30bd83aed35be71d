"""syre: weight decay toward a fixed random anchor, through the loss hook alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sbsearch.cli import main
from sbsearch.data import load_dataset, prepare
from sbsearch.errors import SpecError
from sbsearch.models import build_model
from sbsearch.replicas import ReplicaStack
from sbsearch.score import default_score_layers
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES, LossBatch, ModelDesc, ReplicaStart, apply_model_edits, loss_terms
from sbsearch.strategies.syre import anchors, chosen_layers
from sbsearch.trainer import TrainPlan, replica_seeds, train
from tests.conftest import strategy_settings, tiny_spec_dict

SYRE = STRATEGIES["syre"]
CNN = ModelDesc("small_cnn", (1, 8, 8), 10, width=4, depth=2)


def _start(desc: ModelDesc, seed: int, replicas: int) -> ReplicaStart:
    """The start the trainer hands the loss terms: the same seeds, the same initial weights."""
    seeds = replica_seeds(seed, replicas)
    models = [build_model(desc, s) for s in seeds]
    names = default_score_layers(models[0])
    return ReplicaStart(tuple(seeds), {n: torch.stack([m.get_parameter(n).detach() for m in models]) for n in names})


def _distance(weights: list[dict[str, torch.Tensor]], target: dict[str, torch.Tensor], names: list[str]) -> float:
    """Relative distance of every replica's chosen weights from ``target`` (R, ...)."""
    diff = sum(float((w[n] - target[n][i]).pow(2).sum()) for i, w in enumerate(weights) for n in names)
    size = sum(float(target[n].pow(2).sum()) for n in names)
    return (diff / size) ** 0.5


def test_the_decay_alone_pulls_each_replica_to_its_anchor_and_not_to_zero() -> None:
    # The loss hook with no data term at all: the only gradient is the decay's.
    start = _start(CNN, seed=3, replicas=2)
    net = ReplicaStack([build_model(CNN, s) for s in start.seeds])
    [term] = loss_terms(strategy_settings(syre__gamma=0.5, syre__scale=2.0, syre__layers="hidden"))
    decay = term.start(start)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        decay(LossBatch(net.stacked_parameters(), (0, 1), None)).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    weights, anchor = net.replica_weights(), anchors(start, 2.0)
    hidden, head = list(start.initial)[:-1], list(start.initial)[-1]
    assert _distance(weights, anchor, hidden) < 1e-6
    assert all(float(w[n].abs().mean()) > 0.05 for w in weights for n in hidden)  # not decayed toward 0
    assert not torch.equal(anchor[hidden[0]][0], anchor[hidden[0]][1])  # each replica its own anchor
    for i, w in enumerate(weights):  # the output layer and every bias are left alone
        assert torch.equal(w[head], start.initial[head][i])
        assert all(torch.equal(w[n], build_model(CNN, start.seeds[i]).get_parameter(n)) for n in w if "bias" in n)


@pytest.mark.parametrize(("optimizer", "replicas"), [("sgd", 2), ("sgd", 1), ("lbfgs", 2)])
def test_training_with_a_strong_decay_ends_at_the_anchor(optimizer: str, replicas: int) -> None:
    # Batched replica stack, the single model, and L-BFGS's replica-by-replica steps.
    if optimizer == "lbfgs":
        base = load_dataset("fn_smooth", 0.25, 0)
        desc, lr, gamma = ModelDesc("mlp", (1,), 1, width=8, depth=2), 1.0, 10.0
    else:
        base = load_dataset("digits", 0.25, 0)
        desc, lr, gamma = CNN, 0.05, 5.0
    split = prepare(base, STRATEGIES["expansion"].defaults())
    plan = TrainPlan(epochs=2, batch_size=256, optimizer=optimizer, lr=lr, momentum=0.0, replicas=replicas,
                     seed=1, score=False)
    start = _start(desc, plan.seed, replicas)
    names, target = list(start.initial), anchors(start, 1.0)
    on = train(split, desc, plan, strategies=strategy_settings(syre__gamma=gamma))
    off = train(split, desc, plan, strategies=strategy_settings())
    assert _distance(on.weights, target, names) < 0.1
    assert _distance(off.weights, target, names) > 1.0  # plain training lands nowhere near the anchor
    size = sum(float(w[n].pow(2).sum()) for w in on.weights for n in names) ** 0.5
    assert size / sum(float(target[n].pow(2).sum()) for n in names) ** 0.5 > 0.9  # not decayed toward 0


def test_anchors_are_fixed_by_the_trial_seed_and_replica_alone() -> None:
    start = _start(CNN, seed=0, replicas=3)
    first, again = anchors(start, 1.0), anchors(_start(CNN, seed=0, replicas=3), 1.0)
    assert all(torch.equal(first[n], again[n]) for n in first)
    other = anchors(_start(CNN, seed=1, replicas=3), 1.0)
    assert not any(torch.equal(first[n], other[n]) for n in first)
    two = anchors(_start(CNN, seed=0, replicas=2), 1.0)  # replica i's anchor does not depend on R
    assert all(torch.equal(first[n][:2], two[n]) for n in first)
    for n, a in first.items():  # the anchor's scale is the layer's initial scale, per replica
        for i in range(3):
            assert float(a[i].std()) == pytest.approx(float(start.initial[n][i].std()), rel=0.35)
        assert not torch.equal(a[0], start.initial[n][0])
    names = list(start.initial)
    assert chosen_layers("all", names) == names
    assert chosen_layers("hidden", names) == names[:-1] and chosen_layers("first", names) == names[:1]


def test_with_syre_off_training_is_unchanged_bit_for_bit() -> None:
    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    plan = TrainPlan(epochs=1, batch_size=128, lr=0.01, replicas=2)
    off = train(split, CNN, plan, strategies=strategy_settings(syre__gamma=0.0, syre__scale=3.0, syre__layers="first"))
    without = train(split, CNN, plan)
    assert off.history == without.history
    assert all(torch.equal(a[n], b[n]) for a, b in zip(off.weights, without.weights) for n in a)


def test_anchors_are_no_parameters_and_the_score_never_sees_them() -> None:
    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    plan = TrainPlan(epochs=1, batch_size=128, lr=0.01, replicas=2)
    on = train(split, CNN, plan, strategies=strategy_settings(syre__gamma=0.1))
    off = train(split, CNN, plan)
    assert on.num_parameters == off.num_parameters
    assert [sorted(w) for w in on.weights] == [sorted(w) for w in off.weights]
    assert sorted(on.final) == sorted(off.final)  # the same sb_score.<layer> entries: the model's weights only
    assert on.final["sb_score"] != off.final["sb_score"]  # while the decay did change the weights
    assert apply_model_edits(CNN, strategy_settings(syre__gamma=0.1)) == CNN  # no field of the model description


def test_the_strategies_command_lists_syre(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert all(f"syre.{knob}" in out for knob in ("gamma", "scale", "layers"))


def test_bad_knob_values_get_one_line_each() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(space__syre__gamma=-0.1, space__syre__layers="hiden", space__syre__scale=0))
    lines = str(caught.value).strip().splitlines()
    assert len(lines) == 3
    assert any(re.search(r"space\.syre\.gamma: must be a finite number >= 0, but got -0\.1", line) for line in lines)
    assert any(re.search(r"space\.syre\.scale: must be a finite number > 0, but got 0", line) for line in lines)
    layers = next(line for line in lines if "space.syre.layers" in line)
    assert "must be one of 'all', 'hidden', 'first'" in layers and "hidden" in layers.split("but got")[1]


def test_a_tiny_sweep_searches_syre(tmp_path: Path) -> None:
    from rich.console import Console

    from sbsearch.sweep import run_sweep

    raw = tiny_spec_dict(space={"syre": {"gamma": [0.0, 0.01], "layers": "hidden"}},
                         search__sampler="grid", search__trials=2, train__epochs=1, train__replicas=2)
    with open("/dev/null", "w") as quiet:
        result = run_sweep(parse_spec(raw), tmp_path / "out", console=Console(file=quiet), track=False)
    records = result.records
    assert sorted(r.params["syre.gamma"] for r in records) == [0.0, 0.01]
    assert all(r.state == "COMPLETE" for r in records)
    with_decay, without = sorted(records, key=lambda r: r.params["syre.gamma"], reverse=True)
    assert with_decay.final["sb_drift"] != without.final["sb_drift"]
