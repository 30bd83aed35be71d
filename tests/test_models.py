"""The model builder: frozen entries, the first-layer bias, the descriptions ``describe_model`` resolves
(the automatic bias learning-rate multiplier, the width-matched baseline), and resnet9."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from sbsearch.models import (
    FROZEN_MASK,
    FROZEN_VALUE,
    INPUT_KINDS,
    MODELS,
    _ScaledBias,
    build_model,
    count_parameters,
    describe_model,
    first_layer,
    first_layer_bias_name,
)
from sbsearch.replicas import ReplicaStack
from sbsearch.spec import parse_spec
from sbsearch.strategies import ModelDesc, apply_model_edits
from sbsearch.trial import build_trial
from tests.conftest import registered_model_cases, shape_only, strategy_settings, tiny_spec_dict, trial_config

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


# --- resnet9 (the DAWNBench CIFAR-10 network) ----------------------------------------------------


def test_resnet9_is_registered_for_images_and_named_by_the_spec() -> None:
    assert MODELS["resnet9"] is not None and INPUT_KINDS["resnet9"] == ("image",)
    assert "resnet9" in {p.id.split("-")[0] for p in registered_model_cases()}  # type: ignore[attr-defined]
    spec = parse_spec(tiny_spec_dict(model__name="resnet9", data__dataset="fakedata", space={}, search__trials=1))
    assert spec.model.name == "resnet9"


def test_resnet9_at_width_64_has_the_parameter_count_of_pages_network() -> None:
    def conv_bn(c_in: int, c_out: int) -> int:
        return 3 * 3 * c_in * c_out + 2 * c_out  # a 3x3 kernel without bias, and BatchNorm's scale and shift

    by_hand = (conv_bn(3, 64)  # prep
               + conv_bn(64, 128) + 2 * conv_bn(128, 128)  # layer1 and its residual
               + conv_bn(128, 256)  # layer2
               + conv_bn(256, 512) + 2 * conv_bn(512, 512)  # layer3 and its residual
               + 512 * 10)  # the classifier, without bias
    assert by_hand == 6_573_120
    desc = ModelDesc("resnet9", (3, 32, 32), 10, width=64, norm="batch")
    assert count_parameters(shape_only(desc)) == by_hand


def test_resnet9_widths_follow_width_first_width_and_the_input_channels() -> None:
    model = shape_only(ModelDesc("resnet9", (5, 32, 32), 7, width=4, first_width=6))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(5, 6), (6, 8), (8, 8), (8, 8), (8, 16), (16, 32),
                                                                (32, 32), (32, 32)]
    assert isinstance(model[-2], nn.Linear) and model[-2].weight.shape == (7, 32)


@pytest.mark.parametrize("norm, layer", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm), ("layer", nn.GroupNorm),
                                         ("none", None)])
def test_resnet9_takes_the_strategies_norm_and_has_conv_biases_only_without_one(norm: str, layer: type | None) -> None:
    model = shape_only(ModelDesc("resnet9", (3, 32, 32), 10, width=4, norm=norm))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    assert len(convs) == 8 and len(norms) == (0 if layer is None else 8)
    assert all(type(m) is layer for m in norms)
    assert all((c.bias is None) == (norm != "none") for c in convs)
    if norm == "layer":
        assert all(m.num_groups == 1 for m in norms)


def test_resnet9_puts_dropout_before_its_classifier_and_scales_the_logits() -> None:
    desc = ModelDesc("resnet9", (3, 32, 32), 10, width=4, norm="batch", dropout_rate=0.3, dropout_where="head")
    model = build_model(desc, seed=0)
    names = [name for name, _ in model.named_children()]
    assert names[-3:] == ["dropout", "linear", "scale"]
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.3
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.eval()
    features = model[:-2](x)  # (N, 32) after dropout, before the classifier
    assert torch.allclose(model(x), 0.125 * model.linear(features))


def test_resnet9_first_conv_is_the_first_layer_of_the_bias_controls() -> None:
    desc = ModelDesc("resnet9", (3, 32, 32), 10, width=4, bias_scale=2.0, first_bias="zero")
    model = build_model(desc, seed=0)
    assert first_layer(model) is model.prep[0] and first_layer_bias_name(model) == "prep.0.bias"
    assert isinstance(model.prep[0], _ScaledBias) and model.prep[0].bias_scale == 2.0
    assert torch.count_nonzero(model.prep[0].bias) == 0
    assert not any(isinstance(m, _ScaledBias) for m in list(model.modules())[3:]), "only the first conv is scaled"


@pytest.mark.parametrize("knobs", [{}, {"expansion__factor": 2}, {"expansion__factor": 2, "expansion__stem": "stride"}],
                         ids=["plain", "K=2", "K=2-stride"])
def test_resnet9_trains_forward_and_backward_on_plain_and_expanded_images(knobs: dict[str, object]) -> None:
    desc = apply_model_edits(ModelDesc("resnet9", (3, 32, 32), 10, width=4, norm="batch"), strategy_settings(**knobs))
    factor = int(knobs.get("expansion__factor", 1))  # type: ignore[call-overload]
    assert desc.input_shape == (3, 32 * factor, 32 * factor)
    model = build_model(desc, seed=0)
    assert first_layer(model).stride == ((factor, factor) if "expansion__stem" in knobs else (1, 1))
    x = torch.randn(4, *desc.input_shape, generator=torch.Generator().manual_seed(0))
    out = model(x)
    assert out.shape == (4, 10)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in model.parameters())


def test_resnet9_runs_in_the_batched_replica_stack_as_separate_models() -> None:
    desc = ModelDesc("resnet9", (3, 16, 16), 10, width=4, norm="batch")
    models = [build_model(desc, seed) for seed in (1, 2)]
    stack = ReplicaStack(models)
    assert stack.batched
    stack.eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for model, out in zip(models, stack(x)):
        assert torch.allclose(model.eval()(x), out, atol=1e-6)
