"""The trainer: frozen entries stay put, the bias learning rate, L-BFGS, ``max_steps``, and the score it
reports after every epoch."""

from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

import pytest
import torch

from sbsearch.data import DataSpec, Split, load_dataset, prepare
from sbsearch.group_conv import GroupConv2d, LiftingConv2d
from sbsearch.models import FROZEN_MASK, FROZEN_VALUE, build_model
from sbsearch.rank import sample_configs
from sbsearch.score import default_score_layers
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES, ModelDesc, apply_model_edits
from sbsearch.trainer import TrainPlan, _score_layers, replica_seeds, train
from sbsearch.trial import build_trial
from tests.conftest import connecting_weights, registered_model_cases, shape_only, strategy_settings, tiny_spec_dict

TWO_PI = 2 * math.pi


def _expansion(**knobs: Any) -> dict[str, object]:
    return {**STRATEGIES["expansion"].defaults(), **knobs}


@pytest.fixture(scope="module")
def digits() -> Split:
    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    return replace(split, x_train=split.x_train[:384], y_train=split.y_train[:384])


@pytest.fixture(scope="module")
def digits_sample(digits: Split) -> Split:
    return replace(digits, x_train=digits.x_train[:128], y_train=digits.y_train[:128], x_val=digits.x_val[:64],
                   y_val=digits.y_val[:64])


# --- frozen entries (strategies.asymmetry) -------------------------------------------------------


@pytest.mark.parametrize("replicas, optimizer", [(1, "adam"), (2, "adamw"), (1, "lbfgs")])
def test_frozen_entries_never_change_during_training(digits: Any, replicas: int, optimizer: str) -> None:
    desc = apply_model_edits(ModelDesc("small_cnn", (1, 8, 8), 10, width=4),
                             strategy_settings(asymmetry__fraction=0.5))
    # Weight decay pulls every entry towards zero: only the trainer's restore keeps frozen ones exact.
    plan = TrainPlan(epochs=1, batch_size=64, lr=0.01, weight_decay=0.1, replicas=replicas, optimizer=optimizer)
    result = train(digits, desc, plan)
    assert len(result.weights) == replicas
    for seed, trained in zip(replica_seeds(plan.seed, replicas), result.weights):
        start = build_model(desc, seed)
        for name, before in start.named_parameters():
            if before.dim() < 2:
                continue
            mask = start.get_buffer(name + FROZEN_MASK)
            assert torch.equal(trained[name][mask], before.detach()[mask]), name
            assert not torch.equal(trained[name][~mask], before.detach()[~mask]), f"{name} did not train"


def test_lbfgs_never_moves_frozen_entries() -> None:
    base = load_dataset("fn_smooth", 0.25, 0, DataSpec(points=40))
    desc = ModelDesc("mlp", (1,), 1, width=16, depth=2, frozen_fraction=0.3)
    result = train(prepare(base, _expansion()), desc,
                   TrainPlan(epochs=2, optimizer="lbfgs", lr=1.0, replicas=2, weight_decay=1e-3))
    for replica, seed in enumerate(replica_seeds(0, 2)):
        start = build_model(desc, seed)
        mask, value = start.get_buffer("3.weight" + FROZEN_MASK), start.get_buffer("3.weight" + FROZEN_VALUE)
        trained = result.weights[replica]["3.weight"]
        assert torch.equal(trained[mask], value[mask]) and not torch.equal(trained[~mask], start.get_parameter("3.weight")[~mask])


# --- the bias learning-rate multiplier (strategies.controls) -------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
def test_bias_multiplier_scales_only_the_first_bias_step(digits: Any, arch: str) -> None:
    one_batch = replace(digits, x_train=digits.x_train[:64], y_train=digits.y_train[:64])
    plan = TrainPlan(epochs=1, batch_size=64, optimizer="sgd", momentum=0.0, lr=0.05)
    plain = ModelDesc(arch, (1, 8, 8), 10, width=8)
    start = dict(build_model(plain, replica_seeds(0, 1)[0]).named_parameters())
    steps = {}
    for multiplier in (1.0, 7.0):
        desc = apply_model_edits(plain, strategy_settings(controls__bias_lr_multiplier=multiplier))
        trained = train(one_batch, desc, plan).weights[0]
        steps[multiplier] = {name: trained[name] - start[name].detach() for name in start}
    first_bias = "1.bias" if arch == "mlp" else "0.bias"
    for name in start:
        expected = steps[1.0][name] * (7.0 if name == first_bias else 1.0)
        torch.testing.assert_close(steps[7.0][name], expected, rtol=1e-4, atol=1e-7)
    assert steps[1.0][first_bias].abs().max() > 0


# --- L-BFGS --------------------------------------------------------------------------------------


def _fit(epochs: int, replicas: int = 1, factor: int = 1, norm: str = "none") -> tuple[list[float], float]:
    base = load_dataset("fn_smooth", 0.25, 0, DataSpec(domain=(0.0, TWO_PI), points=40))
    split = prepare(base, _expansion(factor=factor, fill=math.pi, layout="border"))
    desc = ModelDesc("mlp", (factor,), 1, width=16, depth=2, norm=norm, first_bias="zero")
    history: list[float] = []
    result = train(split, desc, TrainPlan(epochs=epochs, optimizer="lbfgs", lr=1.0, replicas=replicas),
                   lambda epoch, metrics: history.append(metrics["val_mse"]) or False)
    assert result.final["val_mse"] == history[-1]
    return history, float(base.y_val.var(unbiased=False))


def test_a_short_lbfgs_fit_reduces_the_mse() -> None:
    history, variance = _fit(epochs=4)
    # Predicting the mean scores the targets' variance; a few L-BFGS steps must do far better.
    assert history[-1] < 0.05 * variance
    assert history[-1] < history[0]


def test_lbfgs_with_expanded_input_and_batch_norm_fits() -> None:
    history, variance = _fit(epochs=4, factor=5, norm="batch")
    assert all(math.isfinite(v) for v in history) and history[-1] < variance


def test_lbfgs_replicas_train_independently() -> None:
    """Replica 0 of a two-replica run is exactly the one-replica run: no shared line search."""
    alone, _ = _fit(epochs=2)
    base = load_dataset("fn_smooth", 0.25, 0, DataSpec(domain=(0.0, TWO_PI), points=40))
    split = prepare(base, _expansion())
    desc = ModelDesc("mlp", (1,), 1, width=16, depth=2, first_bias="zero")
    result = train(split, desc, TrainPlan(epochs=2, optimizer="lbfgs", lr=1.0, replicas=2))
    mean, std = result.final["val_mse"], result.final["val_mse_std"]
    pair = (mean - std / math.sqrt(2), mean + std / math.sqrt(2))  # the two replicas' values, from mean and std
    assert min(abs(v - alone[-1]) for v in pair) <= 1e-6 * max(1.0, alone[-1]) + 1e-9
    assert std > 0  # and the second replica is a different model


# --- max_steps -----------------------------------------------------------------------------------


def test_max_steps_stops_training_mid_epoch() -> None:
    spec = parse_spec(tiny_spec_dict())
    split, desc = build_trial(spec, sample_configs(spec, 1, seed=0)[0])
    seen: list[int] = []
    result = train(split, desc, TrainPlan(epochs=5, batch_size=64, replicas=2, max_steps=3),
                   lambda epoch, metrics: seen.append(epoch) is None and False)
    assert result.epochs_run == 1 and seen == [1] and "sb_score" in result.final  # 21 batches in an epoch; 3 ran


# --- the score after every epoch -----------------------------------------------------------------


@pytest.mark.parametrize("desc", registered_model_cases())
def test_score_layers_can_pick_any_conv_like_or_linear_weight_and_no_bias(desc: ModelDesc) -> None:
    model = shape_only(desc)
    for name in connecting_weights(model):
        assert _score_layers(model, f"^{re.escape(name)}$") == [name]
    # A pattern that picks nothing (biases are never scored) is an error, not a silently empty score.
    with pytest.raises(ValueError, match=r"^train.score_layers: must match at least one scored weight .*but got 'bias\$'$"):
        _score_layers(model, r"bias$")


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_training_with_group_layers_everywhere_scores_the_group_convolutions(digits_sample: Split,
                                                                             group: str) -> None:
    settings = {name: s.defaults() for name, s in STRATEGIES.items()}
    settings["equivariance"].update(how="layers", where="all", group=group)
    desc = apply_model_edits(ModelDesc("small_cnn", (1, 8, 8), 10, width=4, depth=2), settings)
    model = shape_only(desc)
    group_weights = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (LiftingConv2d, GroupConv2d))]
    assert len(group_weights) == 2
    plan = TrainPlan(epochs=1, batch_size=64, replicas=2)
    [metrics] = train(digits_sample, desc, plan).history
    scored = {key.removeprefix("sb_score.") for key in metrics if key.startswith("sb_score.")}
    assert scored == set(default_score_layers(model)) and set(group_weights) < scored
    assert all(math.isfinite(metrics[f"sb_score.{name}"]) and metrics[f"sb_score.{name}"] > 0 for name in group_weights)
    assert math.isfinite(metrics["sb_drift"]) and metrics["sb_drift"] > 0
    # A regex that picks the group convolution alone scores it alone, drift included.
    last_group_conv = group_weights[-1]
    [picked] = train(digits_sample, desc, replace(plan, score_layers=f"^{re.escape(last_group_conv)}$")).history
    assert {key for key in picked if key.startswith("sb_")} == {"sb_score", f"sb_score.{last_group_conv}", "sb_drift"}
    assert picked["sb_score"] == pytest.approx(picked[f"sb_score.{last_group_conv}"], rel=1e-12) and picked["sb_drift"] > 0


def test_every_evaluation_of_one_lbfgs_step_sees_the_same_dropout_masks_and_the_next_step_new_ones() -> None:
    """L-BFGS's line search compares losses of one objective: masks redrawn per closure call stalled training."""
    from torch import nn

    from sbsearch.trainer import _lbfgs_epoch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 1))
    masks: list[torch.Tensor] = []
    model[2].register_forward_hook(lambda module, inputs, output: masks.append(output == 0))
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=5)
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    y = torch.sin(3 * x)
    steps = []
    for _ in range(2):
        masks.clear()
        _lbfgs_epoch([model], [optimizer], x, y, "regression", 0.0, [])
        assert len(masks) > 1, "the line search evaluated the objective more than once"
        assert all(torch.equal(m, masks[0]) for m in masks)
        steps.append(masks[0])
    assert not torch.equal(steps[0], steps[1])
