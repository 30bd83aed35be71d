"""The bias-scale control: its auto rule against an expanded model's own steps, its start, its checks.

The expanded dense model's first-layer unit computes ``w x + sum_j v_j c_j + b``; its effective bias is
``b' = b + sum_j v_j c_j``. The control computes ``w x + s * b`` on the unexpanded input. Started from the
same function, the two must move their effective biases by the same amount at every step when ``s`` is
``bias_scale: auto`` for the optimiser, and by a different amount under the other optimiser family's rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from sbsearch.errors import SpecError
from sbsearch.models import build_model, describe_model, first_layer
from sbsearch.replicas import ReplicaStack
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.strategies import ModelDesc, auto_bias_scale
from sbsearch.trainer import TrainPlan, replica_seeds, train
from sbsearch.trial import SweepContext, build_trial, run_trial
from tests.conftest import strategy_settings, tiny_spec_dict

# One expanded 1-D sample: x at position 2, constants of both signs and one zero around it, so that
# sum c^2 (gradient steps) and sum |c| (normalised steps) give clearly different scales.
CONSTANTS = torch.tensor([math.pi, -0.5, 0.0, 2.0, 1.0], dtype=torch.float64)
X_AT = 2
OTHER_RULE = {"sgd": "adam", "lbfgs": "adam", "adam": "sgd", "adamw": "sgd"}


settings = strategy_settings


def _control_desc(optimizer: str) -> ModelDesc:
    plain = ModelDesc("mlp", (1,), 1, width=8, depth=2)
    s = settings(expansion__factor=5, expansion__layout="border", controls__bias_scale="auto")
    return describe_model(plain, s, CONSTANTS, optimizer)


def _same_function(scale: float) -> tuple[nn.Module, nn.Module]:
    """An expanded MLP and a bias-scaled unexpanded one, set to compute the same function (in float64)."""
    expanded = build_model(ModelDesc("mlp", (5,), 1, width=8, depth=2), seed=0).double()
    control = build_model(replace(_control_desc("sgd"), bias_scale=scale), seed=1).double()
    big, small = first_layer(expanded), first_layer(control)
    assert isinstance(big, nn.Linear) and isinstance(small, nn.Linear)
    with torch.no_grad():
        small.weight.copy_(big.weight[:, X_AT : X_AT + 1])
        small.bias.copy_((big.bias + big.weight @ CONSTANTS) / scale)
        for (name, p), q in zip(expanded.named_parameters(), control.parameters()):
            if not name.startswith("1."):  # every layer after the first is the same shape in both
                q.copy_(p)
    return expanded, control


def _effective_biases(expanded: nn.Module, control: nn.Module, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    big, small = first_layer(expanded), first_layer(control)
    assert isinstance(big, nn.Linear) and isinstance(small, nn.Linear)
    return (big.bias + big.weight @ CONSTANTS).detach().clone(), (scale * small.bias).detach().clone()


def _optimiser(name: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    if name == "lbfgs":
        return torch.optim.LBFGS(params, lr=1.0, max_iter=5, line_search_fn="strong_wolfe")
    make: dict[str, Callable[..., torch.optim.Optimizer]] = {
        "sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    return make[name](params, lr=0.01, **({"weight_decay": 0.0} if name == "adamw" else {}))


def step_ratios(optimizer: str, scale: float, steps: int = 3) -> list[torch.Tensor]:
    """Per optimiser step, the control's effective-bias change over the expanded model's, per unit."""
    expanded, control = _same_function(scale)
    x = torch.rand(32, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 * math.pi
    x_expanded = CONSTANTS.expand(32, 5).clone()
    x_expanded[:, X_AT] = x[:, 0]
    y = torch.sin(x)
    torch.testing.assert_close(expanded(x_expanded), control(x))
    # L-BFGS's very first trial step is lr / |grad|_1 when that norm exceeds 1, and the two models'
    # L1 norms differ (the rule matches Euclidean geometry); a small loss keeps the first step at lr.
    loss_scale = 1e-2 if optimizer == "lbfgs" else 1.0
    pairs = [(expanded, x_expanded, _optimiser(optimizer, expanded.parameters())),
             (control, x, _optimiser(optimizer, control.parameters()))]
    before = _effective_biases(expanded, control, scale)
    ratios = []
    for _ in range(steps):
        for net, inputs, opt in pairs:
            def closure(net: nn.Module = net, inputs: torch.Tensor = inputs, opt: torch.optim.Optimizer = opt) -> torch.Tensor:
                opt.zero_grad()
                loss = loss_scale * (net(inputs) - y).pow(2).mean()
                loss.backward()  # type: ignore[no-untyped-call]
                return loss

            if optimizer == "lbfgs" and not opt.state:
                closure()
                assert sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None) < 1
            opt.step(closure)  # type: ignore[arg-type]
        after = _effective_biases(expanded, control, scale)
        ratios.append((after[1] - before[1]) / (after[0] - before[0]))
        before = after
    return ratios


# --- the auto rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, expected", [
    ("sgd", math.sqrt(1 + 4 * math.pi**2)), ("lbfgs", math.sqrt(1 + 4 * math.pi**2)),
    ("adam", 1 + 4 * math.pi), ("adamw", 1 + 4 * math.pi),
])
def test_auto_bias_scale_follows_the_optimiser(optimizer: str, expected: float) -> None:
    # [pi, pi, x, pi, pi]: the follow-up study's 1-D input; a dense unit sees four constants.
    plain = ModelDesc("mlp", (1,), 1, width=8)
    s = settings(expansion__factor=5, expansion__fill=math.pi, expansion__layout="border",
                 controls__bias_scale="auto")
    desc = describe_model(plain, s, torch.tensor([math.pi, math.pi, 0.0, math.pi, math.pi]), optimizer)
    assert desc.bias_scale == pytest.approx(expected)
    assert desc.input_shape == (1,), "auto stands in for the expansion: the input stays unexpanded"
    assert desc.bias_lr_multiplier == 1.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "lbfgs"])
def test_the_expanded_models_effective_bias_moves_as_the_auto_scaled_bias_does(optimizer: str) -> None:
    scale = _control_desc(optimizer).bias_scale
    assert isinstance(scale, float)
    for ratio in step_ratios(optimizer, scale):
        # 1e-4: Adam's eps (1e-8) against gradients of about 1e-3 on the smallest constant leaves ~1e-5.
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-4)
    # The other family's rule moves the bias by a different step: the comparison can tell them apart.
    wrong = _control_desc(OTHER_RULE[optimizer]).bias_scale
    assert isinstance(wrong, float)
    assert (step_ratios(optimizer, wrong, steps=1)[0] - 1).abs().min() > 0.2


def test_auto_bias_scale_of_a_conv_averages_the_absolute_constants_in_its_window() -> None:
    plain = ModelDesc("small_cnn", (1, 2, 2), 3, width=4)
    s = settings(expansion__factor=2, controls__bias_scale="auto")
    constants = torch.tensor([[[0.0, -2.0, 0.0, 2.0], [2.0] * 4, [0.0, 2.0, 0.0, -2.0], [2.0] * 4]])  # (1, 4, 4)
    padded = torch.nn.functional.pad(constants[0], (1, 1, 1, 1))  # a 3x3 window, zero padding
    window = [padded[i : i + 3, j : j + 3] for i in range(4) for j in range(4)]
    mass = sum(float(w.abs().sum()) for w in window) / 16
    energy = sum(float(w.pow(2).sum()) for w in window) / 16
    assert describe_model(plain, s, constants, "adam").bias_scale == pytest.approx(1 + mass)
    assert describe_model(plain, s, constants, "sgd").bias_scale == pytest.approx(math.sqrt(1 + energy))
    assert auto_bias_scale("adamw", energy, mass) == pytest.approx(1 + mass)


# --- the model it builds --------------------------------------------------------------------------


@pytest.mark.parametrize("arch, shape, extra", [
    ("mlp", (1,), {"first_bias": "default"}), ("mlp", (1,), {"first_bias": "zero"}),
    ("small_cnn", (1, 8, 8), {}), ("small_cnn", (1, 8, 8), {"equivariant_layers": "stem"}),  # a lifting conv
])
def test_bias_scale_starts_where_the_plain_bias_does_and_stacks_replicas(
        arch: str, shape: tuple[int, ...], extra: dict[str, Any]) -> None:
    plain = ModelDesc(arch, shape, 3, width=4, **extra)
    scaled = replace(plain, bias_scale=3.5)
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    models = [build_model(scaled, seed) for seed in replica_seeds(0, 2)]
    for seed, model in zip(replica_seeds(0, 2), models):
        reference = build_model(plain, seed)
        torch.testing.assert_close(model(x), reference(x))  # the effective bias s * b starts at b0
        bias, reference_bias = first_layer(model).bias, first_layer(reference).bias
        assert isinstance(bias, torch.Tensor) and isinstance(reference_bias, torch.Tensor)
        torch.testing.assert_close(bias * 3.5, reference_bias)
    stack = ReplicaStack(models)
    assert stack.batched
    for replica, model in zip(stack(x), models):
        torch.testing.assert_close(replica, model(x))


# --- an L-BFGS trial ------------------------------------------------------------------------------


def _function_spec(factor: int = 5, **space: Any) -> Any:
    return parse_spec({
        "data": {"dataset": "fn_abs", "domain": [0, "2pi"], "sampling": "grid", "points": 40},
        "model": {"name": "mlp", "width": 8, "depth": 2, "first_bias": "zero"},
        "train": {"optimizer": "lbfgs", "lr": 1.0, "epochs": 3, "replicas": 2},
        "space": {"expansion": {"factor": factor, "fill": "pi", "layout": "border"}, **space},
    })


def test_an_lbfgs_trial_with_auto_bias_scale_trains_and_logs_its_scale(tmp_path: Path) -> None:
    expanded_spec = _function_spec()
    expanded_split, _ = build_trial(expanded_spec, config_from_params(expanded_spec, {}))
    constants = expanded_split.x_train[0, [0, 1, 3, 4]].double()  # the expanded model's inputs around x
    spec = _function_spec(controls={"bias_scale": "auto"})
    config = config_from_params(spec, {})
    split, desc = build_trial(spec, config)
    assert split.x_train.shape[1:] == (1,) and desc.input_shape == (1,)
    assert desc.bias_scale == pytest.approx(math.sqrt(1 + float(constants.pow(2).sum())))
    record = run_trial(SweepContext(spec, tmp_path, None, None), 0, config, lambda epoch, metrics: None)
    assert record.state == "COMPLETE", record.reason
    assert record.final["controls.bias_scale_value"] == pytest.approx(desc.bias_scale)
    assert "controls.bias_lr_multiplier_value" not in record.final  # logged only when switched on
    losses = [h["train_loss"] for h in record.history]
    assert len(losses) == 3 and losses[-1] < 0.5 * losses[0], losses


def test_training_steps_the_stored_bias_by_the_scaled_gradient() -> None:
    # One SGD step on one batch: the stored b moves s times as far as a plain bias given the same
    # gradient, so the effective bias s * b moves s^2 times as far.
    spec = _function_spec(factor=1)
    split, _ = build_trial(spec, config_from_params(spec, {}))
    plain = ModelDesc("mlp", (1,), 1, width=8, depth=2)
    plan = TrainPlan(epochs=1, batch_size=len(split.x_train), optimizer="sgd", momentum=0.0, lr=0.01, score=False)
    moved = {}
    for scale in (1.0, 3.0):
        desc = replace(plain, bias_scale=scale)
        start = first_layer(build_model(desc, replica_seeds(0, 1)[0])).bias
        assert isinstance(start, torch.Tensor)
        moved[scale] = scale * (train(split, desc, plan).weights[0]["1.bias"] - start.detach())
    torch.testing.assert_close(moved[3.0], 9.0 * moved[1.0], rtol=1e-4, atol=1e-6)  # float32 differences


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, path, words", [
    ({"model__name": "resnet18", "space": {"controls": {"bias_scale": 2.0}}}, "space.controls.bias_scale",
     "the first conv of resnet18 has no bias"),
    ({"space": {"norm": {"kind": ["none", "batch"]}, "controls": {"bias_scale": "auto"}}},
     "space.controls.bias_scale", "needs a first-layer bias, which small_cnn has only with norm.kind: none"),
    ({"space": {"controls": {"bias_scale": "auto", "bias_lr_multiplier": "auto"}}}, "space.controls.bias_scale",
     "use one at a time"),
    ({"space": {"controls": {"bias_scale": 0.0}}}, "space.controls.bias_scale", "must be a finite number > 0"),
])
def test_validation_refuses_a_bias_scale_without_a_first_layer_bias_in_one_line(
        changes: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(**changes))
    [line] = [line.strip() for line in str(caught.value).strip().splitlines() if line.strip().startswith(path + ":")]
    assert words in line and "but got" in line, line


def test_lbfgs_accepts_the_bias_scale_but_not_the_bias_learning_rate() -> None:
    _function_spec(controls={"bias_scale": [1.0, "auto"]})
    with pytest.raises(SpecError) as caught:
        _function_spec(controls={"bias_lr_multiplier": "auto"})
    assert [p.path for p in caught.value.problems] == ["space.controls.bias_lr_multiplier"]


# --- what the controls offer the report ------------------------------------------------------------

def test_the_report_controls_sort_trials_into_baseline_treatment_and_each_control() -> None:
    from sbsearch.strategies import STRATEGIES, report_controls

    assert report_controls() == {"controls": STRATEGIES["controls"].report_controls}
    offered = report_controls()["controls"]
    assert [c.name for c in offered.controls] == ["upsample", "width_matched", "bias_lr", "bias_scale"]
    assert all(c.knob.startswith(("expansion.", "controls.")) and "space." in c.how for c in offered.controls)

    def where(params: dict[str, Any]) -> set[str]:
        roles = {c.name for c in offered.controls if c.member(params)}
        roles |= {role for role in ("tried", "treated", "baseline") if getattr(offered, role)(params)}
        return roles

    # Parameters as a sweep records them: only the searched knobs, numbers possibly as strings.
    assert where({"expansion.factor": 1}) == {"baseline"}
    assert where({"expansion.factor": "3", "expansion.layout": "grid"}) == {"tried", "treated"}
    assert where({"expansion.factor": 2, "expansion.layout": "upsample"}) == {"tried", "upsample"}
    assert where({"expansion.factor": 2, "controls.width_matched": True}) == {"tried", "width_matched"}
    assert where({"expansion.factor": 2, "controls.bias_lr_multiplier": "auto"}) == {"tried", "bias_lr"}
    # auto under upsample has no constants to take its value from (s = 1): a plain model, no control.
    assert where({"expansion.factor": 2, "expansion.layout": "upsample", "controls.bias_scale": "auto"}) == {"tried"}
    assert where({"expansion.factor": 2, "expansion.layout": "upsample",
                  "controls.bias_lr_multiplier": "auto"}) == {"tried"}
    assert where({"expansion.factor": 1, "controls.bias_scale": 2.5}) == {"bias_scale"}
    assert where({"expansion.factor": 2, "controls.bias_scale": 2.5}) == {"tried"}  # a number on top of constants
    assert where({"expansion.factor": 2, "controls.bias_scale": "auto",
                  "controls.bias_lr_multiplier": "auto"}) == {"tried"}  # two controls at once: neither
