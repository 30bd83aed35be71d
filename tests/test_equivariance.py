"""The equivariance strategy: invariant models by construction, augmentation, and the penalty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sbsearch.group_conv import (
    GROUPS,
    LiftingConv2d,
    act_on_image,
    act_on_image_batch,
    assert_equivariant,
    equivariance_errors,
)
from sbsearch.models import build_model
from sbsearch.strategies import STRATEGIES, ModelDesc, apply_model_edits
from sbsearch.trainer import invariance_penalty

EQUIVARIANCE = STRATEGIES["equivariance"]


def settings(**equivariance: object) -> dict[str, dict[str, object]]:
    out = {name: s.defaults() for name, s in STRATEGIES.items()}
    out["equivariance"].update(equivariance)
    return out


def equivariant_cnn(group: str, where: str, norm: str = "none", depth: int = 3, size: int = 9) -> nn.Module:
    desc = apply_model_edits(ModelDesc("small_cnn", (2, size, size), 5, width=4, depth=depth),
                             settings(how="layers", group=group, where=where))
    desc = ModelDesc(**{**desc.__dict__, "norm": norm})
    return build_model(desc, seed=0).eval()


@pytest.mark.parametrize("group", ["c4", "d4"])
@pytest.mark.parametrize("norm", ["none", "batch", "group", "layer"])
@pytest.mark.parametrize("size", [8, 9])
def test_small_cnn_with_group_layers_everywhere_gives_invariant_logits(group: str, norm: str, size: int) -> None:
    # Stride-1 "same" convs keep the sampling grid symmetric at every size, even and odd.
    model = equivariant_cnn(group, "all", norm, size=size)
    assert any(isinstance(m, LiftingConv2d) for m in model.modules())
    assert_equivariant(equivariance_errors(model, group, (3, 2, size, size)), atol=1e-5)
    # And in float32, the dtype training uses, on the model itself:
    x = torch.randn(3, 2, size, size)
    with torch.no_grad():
        logits = model(x)
        for g in range(GROUPS[group].order):
            torch.testing.assert_close(model(act_on_image(group, g, x)), logits, atol=1e-5, rtol=0)


def test_a_c4_model_is_not_flip_invariant() -> None:
    # The check has teeth: C4 layers say nothing about mirror images.
    errors = dict(equivariance_errors(equivariant_cnn("c4", "all"), "d4", (3, 2, 9, 9)))
    assert errors["r1"] < 1e-9 and errors["f"] > 1e-4


@pytest.mark.parametrize("where, group_blocks", [("stem", 1), ("early", 2), ("all", 3)])
def test_where_sets_how_many_blocks_are_group_convolutions(where: str, group_blocks: int) -> None:
    model = equivariant_cnn("c4", where)
    lifting_and_group = [m for m in model.modules() if type(m).__name__ in ("LiftingConv2d", "GroupConv2d")]
    plain = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert (len(lifting_and_group), len(plain)) == (group_blocks, 3 - group_blocks)
    assert model(torch.randn(2, 2, 9, 9)).shape == (2, 5)


def test_how_none_leaves_the_model_alone() -> None:
    plain = ModelDesc("small_cnn", (1, 8, 8), 10)
    assert apply_model_edits(plain, settings()) == plain


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_augmentation_transforms_each_image_by_a_group_element_and_keeps_its_place(group: str) -> None:
    x = torch.randn(16, 1, 5, 5)
    elements = torch.randint(GROUPS[group].order, (16,), generator=torch.Generator().manual_seed(0))
    out = act_on_image_batch(group, elements, x)
    for b in range(16):
        # Image b is still image b (its label stays valid), only turned or mirrored.
        assert torch.equal(out[b], act_on_image(group, int(elements[b]), x[b]))
    assert not torch.equal(out, x)


class _Stack:
    """A model behind the trainer's (R, B, out) interface."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(0)


@pytest.mark.parametrize("group", ["c4", "d4"])
def test_penalty_is_zero_for_an_invariant_model_and_positive_otherwise(group: str) -> None:
    x = torch.randn(4, 2, 9, 9)
    invariant = _Stack(equivariant_cnn(group, "all"))
    plain = _Stack(build_model(ModelDesc("small_cnn", (2, 9, 9), 5, width=4), seed=0).eval())
    for g in range(1, GROUPS[group].order):
        with torch.no_grad():
            assert invariance_penalty(invariant, x, invariant(x), group, g).item() < 1e-10
            assert invariance_penalty(plain, x, plain(x), group, g).item() > 1e-6


def test_augment_and_penalty_reach_the_description_the_trainer_reads() -> None:
    plain = ModelDesc("small_cnn", (1, 8, 8), 10)
    augmented = apply_model_edits(plain, settings(how="augment", group="d4"))
    penalised = apply_model_edits(plain, settings(how="penalty", group="c4", penalty_weight=0.3))
    assert (augmented.augment_group, augmented.penalty_group) == ("d4", "none")
    assert (penalised.penalty_group, penalised.penalty_weight) == ("c4", 0.3)


@pytest.mark.parametrize("how", ["augment", "penalty"])
def test_training_with_augmentation_or_penalty_runs_and_learns(how: str) -> None:
    from sbsearch.data import load_dataset, prepare
    from sbsearch.trainer import TrainPlan, train

    split = prepare(load_dataset("digits", 0.25, 0), STRATEGIES["expansion"].defaults())
    desc = apply_model_edits(ModelDesc("small_cnn", (1, 8, 8), 10, width=8), settings(how=how, group="d4"))
    result = train(split, desc, TrainPlan(epochs=2, batch_size=128, lr=0.01))
    assert result.final["val_accuracy"] > 0.3


def test_validation_names_what_cannot_apply() -> None:
    assert EQUIVARIANCE.incompatible is not None
    assert EQUIVARIANCE.incompatible({"how": "layers"}, "small_cnn", "image") is None
    assert "small_cnn" in str(EQUIVARIANCE.incompatible({"how": "layers"}, "densenet121", "image"))
    assert "vector" in str(EQUIVARIANCE.incompatible({"how": "augment"}, "mlp", "vector"))
    assert EQUIVARIANCE.incompatible({"how": "penalty"}, "resnet18", "image") is None
