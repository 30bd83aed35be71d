"""The asymmetry and controls strategies, and what validation says about strategies a model cannot take."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest
import torch

from sbsearch.data import load_dataset, prepare
from sbsearch.errors import SpecError
from sbsearch.models import FROZEN_MASK, FROZEN_VALUE, build_model, count_parameters, describe_model
from sbsearch.space import TrialConfig
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES, ModelDesc, apply_model_edits
from sbsearch.trainer import TrainPlan, replica_seeds, train
from sbsearch.trial import build_trial
from tests.conftest import strategy_settings, tiny_spec_dict

settings = strategy_settings


def config(**knobs: Any) -> TrialConfig:
    return TrialConfig({f"{s}.{k}": v for s, ks in settings(**knobs).items() for k, v in ks.items()}, ())


@pytest.fixture(scope="module")
def digits() -> Any:
    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    return replace(split, x_train=split.x_train[:384], y_train=split.y_train[:384])


# --- asymmetry -----------------------------------------------------------------------------------


def test_each_unit_gets_its_own_share_of_frozen_entries() -> None:
    desc = apply_model_edits(ModelDesc("small_cnn", (1, 8, 8), 10, width=8), settings(asymmetry__fraction=0.25))
    model = build_model(desc, seed=3)
    frozen = {name: buffer for name, buffer in model.named_buffers() if name.endswith(FROZEN_MASK)}
    weights = {name: p for name, p in model.named_parameters() if p.dim() >= 2}
    assert {n.removesuffix(FROZEN_MASK) for n in frozen} == set(weights)
    for name, weight in weights.items():
        mask = frozen[name + FROZEN_MASK].flatten(1)  # (units, fan_in)
        assert (mask.sum(dim=1) == round(0.25 * mask.shape[1])).all()
        assert len({tuple(row.tolist()) for row in mask}) > 1, "units must not share one pattern"
        value = model.get_buffer(name + FROZEN_VALUE)
        assert torch.equal(weight[mask.view_as(weight)], value[mask.view_as(weight)])
    # Seeded by the model seed: the same seed gives the same masks, another seed others.
    again, other = build_model(desc, seed=3), build_model(desc, seed=4)
    assert all(torch.equal(b, again.get_buffer(n)) for n, b in frozen.items())
    assert not all(torch.equal(b, other.get_buffer(n)) for n, b in frozen.items())


@pytest.mark.parametrize("replicas, optimizer", [(1, "adam"), (2, "adamw"), (1, "lbfgs")])
def test_frozen_entries_never_change_during_training(digits: Any, replicas: int, optimizer: str) -> None:
    desc = apply_model_edits(ModelDesc("small_cnn", (1, 8, 8), 10, width=4), settings(asymmetry__fraction=0.5))
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


def test_fraction_zero_leaves_the_description_alone() -> None:
    plain = ModelDesc("mlp", (1, 8, 8), 10)
    assert apply_model_edits(plain, settings(asymmetry__fraction=0.0)) == plain


def test_a_fraction_too_small_for_one_entry_per_unit_freezes_nothing() -> None:
    # round(fraction * fan_in) entries per unit: 0.004 * 64 and 0.004 * 16 both round to 0.
    plain = ModelDesc("mlp", (1, 8, 8), 10)
    desc = apply_model_edits(plain, settings(asymmetry__fraction=0.004))
    assert desc == replace(plain, frozen_fraction=0.004)
    tiny, reference = build_model(desc, seed=1), build_model(plain, seed=1)
    assert tiny.state_dict().keys() == reference.state_dict().keys(), "no frozen-entry buffers"
    assert all(torch.equal(tiny.get_parameter(name), p) for name, p in reference.named_parameters())
    # No entry's gradient is masked either: every weight trains as in the plain network.
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for model in (tiny, reference):
        model(x).square().sum().backward()
    assert all(torch.equal(tiny.get_parameter(name).grad, p.grad) for name, p in reference.named_parameters())


# --- controls: the bias learning-rate multiplier --------------------------------------------------


@pytest.mark.parametrize("arch", ["mlp", "small_cnn"])
def test_bias_multiplier_scales_only_the_first_bias_step(digits: Any, arch: str) -> None:
    one_batch = replace(digits, x_train=digits.x_train[:64], y_train=digits.y_train[:64])
    plan = TrainPlan(epochs=1, batch_size=64, optimizer="sgd", momentum=0.0, lr=0.05)
    plain = ModelDesc(arch, (1, 8, 8), 10, width=8)
    start = dict(build_model(plain, replica_seeds(0, 1)[0]).named_parameters())
    steps = {}
    for multiplier in (1.0, 7.0):
        desc = apply_model_edits(plain, settings(controls__bias_lr_multiplier=multiplier))
        trained = train(one_batch, desc, plan).weights[0]
        steps[multiplier] = {name: trained[name] - start[name].detach() for name in start}
    first_bias = "1.bias" if arch == "mlp" else "0.bias"
    for name in start:
        expected = steps[1.0][name] * (7.0 if name == first_bias else 1.0)
        torch.testing.assert_close(steps[7.0][name], expected, rtol=1e-4, atol=1e-7)
    assert steps[1.0][first_bias].abs().max() > 0


def test_auto_multiplier_of_a_dense_layer_is_one_plus_every_squared_constant() -> None:
    # [pi, pi, x, pi, pi]: the follow-up study's 1-D input; a dense unit sees four constants.
    plain = ModelDesc("mlp", (1,), 1, width=8)
    s = settings(expansion__factor=5, expansion__fill=math.pi, expansion__layout="border",
                 controls__bias_lr_multiplier="auto")
    desc = describe_model(plain, s, torch.tensor([math.pi, math.pi, 0.0, math.pi, math.pi]))
    assert desc.bias_lr_multiplier == pytest.approx(1 + 4 * math.pi**2)
    assert desc.input_shape == (1,), "auto stands in for the expansion: the input stays unexpanded"


def test_auto_multiplier_of_a_conv_averages_the_constants_in_its_window() -> None:
    plain = ModelDesc("small_cnn", (1, 2, 2), 3, width=4)
    s = settings(expansion__factor=2, controls__bias_lr_multiplier="auto")
    constants = torch.tensor([[[0.0, 2.0, 0.0, 2.0], [2.0] * 4, [0.0, 2.0, 0.0, 2.0], [2.0] * 4]])  # (1, 4, 4)
    squares = torch.nn.functional.pad(constants[0] ** 2, (1, 1, 1, 1))  # a 3x3 window, zero padding
    by_hand = sum(float(squares[i : i + 3, j : j + 3].sum()) for i in range(4) for j in range(4)) / 16
    desc = describe_model(plain, s, constants)
    assert desc.bias_lr_multiplier == pytest.approx(1 + by_hand)


def test_auto_multiplier_through_a_trial_uses_the_normalised_constant() -> None:
    spec = parse_spec(tiny_spec_dict(model__name="mlp", space={}))
    split, desc = build_trial(spec, config(expansion__factor=2, expansion__fill=0.5,
                                           controls__bias_lr_multiplier="auto"))
    base = load_dataset("digits", spec.data.val_fraction, spec.seed)
    c = (0.5 - base.mean) / base.std  # fill_space raw: the constant is normalised like the pixels
    assert split.x_train.shape[1:] == (1, 8, 8) and desc.input_shape == (1, 8, 8)
    assert desc.bias_lr_multiplier == pytest.approx(1 + (256 - 64) * float(c[0]) ** 2, rel=1e-5)


# --- controls: the width-matched baseline ---------------------------------------------------------


def test_width_matched_mlp_has_about_the_expanded_parameter_count_and_no_constants() -> None:
    spec = parse_spec(tiny_spec_dict(model__name="mlp", model__width=16, space={}))
    knobs = {"expansion__factor": 3, "expansion__fill": 0.5}
    _, expanded = build_trial(spec, config(**knobs))
    split, matched = build_trial(spec, config(**knobs, controls__width_matched=True))
    assert split.x_train.shape[1:] == (1, 8, 8) and matched.input_shape == (1, 8, 8)
    target = count_parameters(build_model(expanded, 0))
    got = count_parameters(build_model(matched, 0))
    slope = count_parameters(build_model(replace(matched, first_width=matched.first_width + 1), 0)) - got
    assert abs(got - target) <= slope / 2
    assert matched.first_width > 16 and matched.width == 16
    assert torch.equal(split.x_train, build_trial(spec, config())[0].x_train)


def test_width_matched_small_cnn_widens_only_when_the_stem_grows() -> None:
    spec = parse_spec(tiny_spec_dict(model__width=8, model__depth=2, space={}))
    _, same = build_trial(spec, config(expansion__factor=2, controls__width_matched=True))
    _, wider = build_trial(spec, config(expansion__factor=2, expansion__stem="kernel", controls__width_matched=True))
    assert same.first_width == 8  # conv weights do not grow with the image, so neither does the count
    assert wider.first_width > 8 and wider.stem_kernel == 3


# --- validation: one line per problem, before anything runs ---------------------------------------


@pytest.mark.parametrize("changes, path", [
    ({"model__name": "resnet18", "space": {"controls": {"width_matched": True}}}, "space.controls.width_matched"),
    ({"model__name": "densenet121", "space": {"controls": {"bias_lr_multiplier": 2.0}}},
     "space.controls.bias_lr_multiplier"),
    ({"space": {"norm": {"kind": ["none", "batch"]}, "controls": {"bias_lr_multiplier": "auto"}}},
     "space.controls.bias_lr_multiplier"),
    ({"model__name": "densenet121", "space": {"equivariance": {"how": "layers"}}}, "space.equivariance.how"),
    ({"model__name": "mlp", "space": {"dropout": {"rate": 0.2, "kind": "channel"}}}, "space.dropout.kind"),
    ({"model__name": "resnet18", "space": {"dropout": {"rate": 0.2}}}, "space.dropout.rate"),  # where: all
    ({"model__cifar_stem": True}, "model.cifar_stem"),
    ({"train__optimizer": "lbfgs", "space": {"equivariance": {"how": "augment"}}}, "space.equivariance.how"),
    ({"space": {"controls": {"bias_lr_multiplier": {"low": "auto", "high": 3.0}}}},
     "space.controls.bias_lr_multiplier.low"),
    ({"space": {"controls": {"bias_lr_multiplier": 0.0}}}, "space.controls.bias_lr_multiplier"),
])
def test_validation_says_what_cannot_apply_in_one_line(changes: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(**changes))
    lines = str(caught.value).strip().splitlines()
    assert any(line.strip().startswith(f"{path}:") and "but got" in line for line in lines), lines


def test_an_image_too_small_for_the_network_is_caught_before_running() -> None:
    # DenseNet pools an 8x8 digit to nothing; validation runs the network on shapes alone to find out.
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(model__name="densenet121"))
    assert ("model.name: densenet121 needs images of at least 29x29, and data set 'digits' gives 8x8: "
            "set data.image_size, or model.cifar_stem: true, but got 'densenet121'") in str(caught.value).splitlines()
    # Expanded but strided back by the stem, the first feature map is as small as the digit's own.
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(model__name="densenet121",
                                  space={"expansion": {"factor": [2, 3], "stem": "stride"}}))
    [line] = str(caught.value).strip().splitlines()
    assert line.startswith("space.expansion.factor: densenet121 at expansion.factor 2 (stem stride) needs images "
                           "of at least"), line


@pytest.mark.parametrize("changes", [
    {"model__name": "resnet18", "model__cifar_stem": True, "space": {"equivariance": {"how": "augment"}}},
    {"model__name": "densenet121", "data__image_size": 32, "space": {"dropout": {"rate": 0.2, "where": "all"}}},
    {"model__name": "densenet121", "model__cifar_stem": True, "space": {"expansion": {"factor": [1, 3]}}},
    {"space": {"controls": {"bias_lr_multiplier": [1.0, "auto"], "width_matched": [False, True]}}},
    {"model__name": "mlp", "space": {"asymmetry": {"fraction": {"low": 0.0, "high": 0.5}}}},
])
def test_validation_accepts_what_applies(changes: dict[str, Any]) -> None:
    parse_spec(tiny_spec_dict(**changes))
