"""The model builder: frozen entries, the first-layer bias, and the descriptions ``describe_model`` resolves
(the automatic bias learning-rate multiplier, the width-matched baseline)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from sbsearch.models import FROZEN_MASK, FROZEN_VALUE, build_model, count_parameters, describe_model
from sbsearch.spec import parse_spec
from sbsearch.strategies import ModelDesc, apply_model_edits
from sbsearch.trial import build_trial
from tests.conftest import strategy_settings, tiny_spec_dict, trial_config

# --- frozen entries (strategies.asymmetry) -------------------------------------------------------


def test_each_unit_gets_its_own_share_of_frozen_entries() -> None:
    desc = apply_model_edits(ModelDesc("small_cnn", (1, 8, 8), 10, width=8),
                             strategy_settings(asymmetry__fraction=0.25))
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


def test_fraction_zero_leaves_the_description_alone() -> None:
    plain = ModelDesc("mlp", (1, 8, 8), 10)
    assert apply_model_edits(plain, strategy_settings(asymmetry__fraction=0.0)) == plain


def test_a_fraction_too_small_for_one_entry_per_unit_freezes_nothing() -> None:
    # round(fraction * fan_in) entries per unit: 0.004 * 64 and 0.004 * 16 both round to 0.
    plain = ModelDesc("mlp", (1, 8, 8), 10)
    desc = apply_model_edits(plain, strategy_settings(asymmetry__fraction=0.004))
    assert desc == replace(plain, frozen_fraction=0.004)
    tiny, reference = build_model(desc, seed=1), build_model(plain, seed=1)
    assert tiny.state_dict().keys() == reference.state_dict().keys(), "no frozen-entry buffers"
    assert all(torch.equal(tiny.get_parameter(name), p) for name, p in reference.named_parameters())
    # No entry's gradient is masked either: every weight trains as in the plain network.
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for model in (tiny, reference):
        model(x).square().sum().backward()
    assert all(torch.equal(tiny.get_parameter(name).grad, p.grad) for name, p in reference.named_parameters())


# --- the first layer's bias ----------------------------------------------------------------------


@pytest.mark.parametrize("arch,shape", [("mlp", (5,)), ("small_cnn", (1, 8, 8))])
def test_first_bias_zero_zeroes_only_the_first_layer_bias(arch: str, shape: tuple[int, ...]) -> None:
    default = build_model(ModelDesc(arch, shape, 3), seed=7)
    zero = build_model(ModelDesc(arch, shape, 3, first_bias="zero"), seed=7)
    biases = [name for name, p in zero.named_parameters() if name.endswith("bias")]
    first = biases[0]
    for (name, p_default), (_, p_zero) in zip(default.named_parameters(), zero.named_parameters()):
        if name == first:
            assert torch.count_nonzero(p_zero) == 0 and torch.count_nonzero(p_default) > 0
        else:  # every other parameter starts exactly as it would have
            assert torch.equal(p_default, p_zero), name


# --- the automatic bias learning-rate multiplier -------------------------------------------------


def test_auto_multiplier_of_a_dense_layer_is_one_plus_every_squared_constant() -> None:
    # [pi, pi, x, pi, pi]: the follow-up study's 1-D input; a dense unit sees four constants.
    plain = ModelDesc("mlp", (1,), 1, width=8)
    s = strategy_settings(expansion__factor=5, expansion__fill=math.pi, expansion__layout="border",
                          controls__bias_lr_multiplier="auto")
    desc = describe_model(plain, s, torch.tensor([math.pi, math.pi, 0.0, math.pi, math.pi]))
    assert desc.bias_lr_multiplier == pytest.approx(1 + 4 * math.pi**2)
    assert desc.input_shape == (1,), "auto stands in for the expansion: the input stays unexpanded"


def test_auto_multiplier_of_a_conv_averages_the_constants_in_its_window() -> None:
    plain = ModelDesc("small_cnn", (1, 2, 2), 3, width=4)
    s = strategy_settings(expansion__factor=2, controls__bias_lr_multiplier="auto")
    constants = torch.tensor([[[0.0, 2.0, 0.0, 2.0], [2.0] * 4, [0.0, 2.0, 0.0, 2.0], [2.0] * 4]])  # (1, 4, 4)
    squares = torch.nn.functional.pad(constants[0] ** 2, (1, 1, 1, 1))  # a 3x3 window, zero padding
    by_hand = sum(float(squares[i : i + 3, j : j + 3].sum()) for i in range(4) for j in range(4)) / 16
    desc = describe_model(plain, s, constants)
    assert desc.bias_lr_multiplier == pytest.approx(1 + by_hand)


# --- the width-matched baseline ------------------------------------------------------------------


def test_width_matched_mlp_has_about_the_expanded_parameter_count_and_no_constants() -> None:
    spec = parse_spec(tiny_spec_dict(model__name="mlp", model__width=16, space={}))
    knobs = {"expansion__factor": 3, "expansion__fill": 0.5}
    _, expanded = build_trial(spec, trial_config(**knobs))
    split, matched = build_trial(spec, trial_config(**knobs, controls__width_matched=True))
    assert split.x_train.shape[1:] == (1, 8, 8) and matched.input_shape == (1, 8, 8)
    target = count_parameters(build_model(expanded, 0))
    got = count_parameters(build_model(matched, 0))
    slope = count_parameters(build_model(replace(matched, first_width=matched.first_width + 1), 0)) - got
    assert abs(got - target) <= slope / 2
    assert matched.first_width > 16 and matched.width == 16
    assert torch.equal(split.x_train, build_trial(spec, trial_config())[0].x_train)


def test_width_matched_small_cnn_widens_only_when_the_stem_grows() -> None:
    spec = parse_spec(tiny_spec_dict(model__width=8, model__depth=2, space={}))
    _, same = build_trial(spec, trial_config(expansion__factor=2, controls__width_matched=True))
    _, wider = build_trial(spec, trial_config(expansion__factor=2, expansion__stem="kernel",
                                              controls__width_matched=True))
    assert same.first_width == 8  # conv weights do not grow with the image, so neither does the count
    assert wider.first_width > 8 and wider.stem_kernel == 3
