"""The data's own augmentation (``data.augment_crop``, ``data.augment_flip``): random crops and flips of the
training images, on the images as loaded, before the expansion places them."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sbsearch.trainer
from sbsearch.data import random_crop, random_flip
from sbsearch.errors import SpecError
from sbsearch.group_conv import act_on_image_batch, get_group
from sbsearch.space import config_from_params
from sbsearch.spec import parse_spec
from sbsearch.strategies import ModelDesc
from sbsearch.trainer import TrainResult, train
from sbsearch.trial import build_trial, train_plan
from tests.conftest import tiny_spec_dict

# --- the steps on a batch --------------------------------------------------------------------------


def _images(n: int = 32, channels: int = 2, side: int = 6) -> torch.Tensor:
    # Distinct, nonzero values: every crop window matches at one offset only, and padding shows as 0.
    return torch.rand(n, channels, side, side, generator=torch.Generator().manual_seed(3)) + 0.5


def test_a_crop_is_a_shifted_copy_of_the_image_with_zeros_where_the_padding_falls() -> None:
    x, padding = _images(), 2
    out = random_crop(x, padding, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    offsets = []
    for b in range(x.shape[0]):
        padded = F.pad(x[b], (padding,) * 4)  # (C, H+4, W+4)
        found = [(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
                 if torch.equal(out[b], padded[:, dy : dy + 6, dx : dx + 6])]
        assert len(found) == 1, f"image {b} is no crop of its padded original"
        offsets.append(found[0])
        # Zeros only where the window left the original image, and the image's own values everywhere else.
        dy, dx = found[0]
        inside = torch.zeros(6 + 2 * padding, 6 + 2 * padding, dtype=torch.bool)
        inside[padding : padding + 6, padding : padding + 6] = True
        assert torch.equal(out[b].eq(0).any(0), ~inside[dy : dy + 6, dx : dx + 6])
    assert len(set(offsets)) >= 10  # one offset per image, not one per batch


def test_a_flip_mirrors_about_half_the_images_and_leaves_the_rest() -> None:
    x = _images(64)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = [torch.equal(out[b], x[b].flip(-1)) for b in range(64)]
    kept = [torch.equal(out[b], x[b]) for b in range(64)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image one or the other
    assert 16 <= sum(flipped) <= 48


def test_the_steps_draw_only_from_their_generator() -> None:
    x = _images()
    torch.manual_seed(0)  # the global stream must not matter
    a = random_flip(random_crop(x, 1, torch.Generator().manual_seed(5)), torch.Generator().manual_seed(6))
    torch.manual_seed(1)
    b = random_flip(random_crop(x, 1, torch.Generator().manual_seed(5)), torch.Generator().manual_seed(6))
    c = random_flip(random_crop(x, 1, torch.Generator().manual_seed(7)), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --- in a trained trial ------------------------------------------------------------------------------


def _spec(seed: int = 0, crop: int = 2, flip: bool = True, equivariance: str = "none", **changes: Any) -> Any:
    raw = tiny_spec_dict(seed=seed, data__augment_crop=crop, data__augment_flip=flip, train__epochs=2,
                         train__replicas=1, **changes)
    raw["space"] = {"expansion": {"factor": 2, "fill": 0.5}, "equivariance": {"how": equivariance, "group": "d4"}}
    return parse_spec(raw)


_BUILD_MODEL = sbsearch.trainer.build_model


def _train_watching(spec: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
    """Train one trial of ``spec`` and record what its network receives: (split, training inputs, evaluation
    inputs), each in the order the network saw them."""
    training: list[torch.Tensor] = []
    evaluation: list[torch.Tensor] = []

    def watched(desc: ModelDesc, seed: int) -> nn.Module:
        model = _BUILD_MODEL(desc, seed)

        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            (training if module.training else evaluation).append(args[0].detach().clone())

        model.register_forward_pre_hook(record)
        return model

    monkeypatch.setattr(sbsearch.trainer, "build_model", watched)
    config = config_from_params(spec, {})
    split, desc = build_trial(spec, config)
    result: TrainResult = train(split, desc, train_plan(spec), strategies=config.all_settings())
    assert result.epochs_run == 2 and training and evaluation
    return split, training, evaluation


def _constant_positions() -> torch.Tensor:
    """Where the expansion (K = 2, grid layout, offset start) puts its constants: all but every other pixel of
    every other row. (1, 16, 16)"""
    constant = torch.ones(1, 16, 16, dtype=torch.bool)
    constant[:, ::2, ::2] = False
    return constant


def test_augmentation_hands_the_trainer_the_images_as_loaded_and_the_pipeline_for_after() -> None:
    spec = _spec()
    split, _ = build_trial(spec, config_from_params(spec, {}))
    assert len(split.augment) == 2 and split.x_train.shape[1:] == (1, 8, 8) and split.x_val.shape[1:] == (1, 16, 16)
    assert split.train_pipeline is not None
    nan = torch.full((1, 1, 8, 8), float("nan"))
    assert torch.equal(~torch.isnan(split.train_pipeline(nan)), _constant_positions()[None])


def test_every_augmented_training_batch_holds_the_expansion_constants_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    split, training, _ = _train_watching(_spec(), monkeypatch)
    constant = _constant_positions()
    fill = split.x_val[0, constant][0].item()  # the fill after normalisation, as validation has it
    assert split.x_val[:, constant].eq(fill).all()
    for batch in training:
        assert batch.shape[1:] == (1, 16, 16)
        assert batch[:, constant].eq(fill).all()
        assert not batch[:, ~constant].eq(fill).all()  # the images sit between them


@pytest.mark.parametrize("equivariance", ["none", "augment"])
def test_the_network_trains_on_the_crop_then_the_flip_then_the_strategies_then_the_expansion(
        equivariance: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Replay the trainer's first batch: its order and its augmentation streams (trainer._train).
    spec = _spec(equivariance=equivariance)
    split, training, _ = _train_watching(spec, monkeypatch)
    batch = split.x_train[torch.randperm(split.x_train.shape[0], generator=torch.Generator().manual_seed(spec.seed))
                          [: spec.data.batch_size]]
    generator = torch.Generator().manual_seed(spec.seed + 1)
    expected = random_flip(random_crop(batch, 2, generator), generator)
    if equivariance == "augment":
        expected = act_on_image_batch("d4", torch.randint(get_group("d4").order, (batch.shape[0],),
                                                          generator=generator), expected)
    assert split.train_pipeline is not None
    torch.testing.assert_close(training[0], split.train_pipeline(expected), atol=0, rtol=0)


def test_evaluation_inputs_are_never_augmented(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, evaluation = _train_watching(_spec(), monkeypatch)
    plain_spec = _spec(crop=0, flip=False)
    plain, _ = build_trial(plain_spec, config_from_params(plain_spec, {}))
    # Two epochs of validation, then the test split once, each in order and as a trial without augmentation has them.
    assert plain.x_test is not None
    assert torch.equal(torch.cat(evaluation), torch.cat([plain.x_val, plain.x_val, plain.x_test]))


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(monkeypatch: pytest.MonkeyPatch) -> None:
    _, first, _ = _train_watching(_spec(seed=0), monkeypatch)
    _, again, _ = _train_watching(_spec(seed=0), monkeypatch)
    _, other, _ = _train_watching(_spec(seed=1), monkeypatch)
    _, plain, _ = _train_watching(_spec(seed=0, crop=0, flip=False), monkeypatch)
    assert len(first) == len(again) and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], plain[0])  # the augmentation did happen


def test_augmentation_off_leaves_the_training_inputs_prepared() -> None:
    split, _ = build_trial(_spec(crop=0, flip=False), config_from_params(_spec(crop=0, flip=False), {}))
    assert split.train_pipeline is None and split.augment == () and split.x_train.shape[1:] == (1, 16, 16)


# --- the spec's rules ----------------------------------------------------------------------------------


def _problems(raw: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("key, value", [("augment_crop", 2), ("augment_flip", True)])
def test_augmentation_is_refused_on_tabular_and_function_data(key: str, value: object) -> None:
    for dataset in ("iris", "fn_smooth"):
        raw = tiny_spec_dict(**{"data__dataset": dataset, f"data__{key}": value, "model__name": "mlp"})
        raw["space"] = {}
        problems = _problems(raw)
        assert len(problems) == 1 and problems[0].startswith(f"data.{key}: applies to image data sets only")
        assert dataset in problems[0]


@pytest.mark.parametrize("key, value", [("augment_crop", 2), ("augment_flip", True)])
def test_augmentation_is_refused_with_full_batch_lbfgs(key: str, value: object) -> None:
    raw = tiny_spec_dict(**{f"data__{key}": value, "train__optimizer": "lbfgs"})
    problems = _problems(raw)
    assert len(problems) == 1 and problems[0].startswith(f"data.{key}: random augmentation needs a minibatch")


def test_a_crop_must_be_smaller_than_the_image_and_not_negative() -> None:
    assert _problems(tiny_spec_dict(data__augment_crop=8)) == [
        "data.augment_crop: must be smaller than the image side (8 for data set 'digits'), but got 8"]
    assert _problems(tiny_spec_dict(data__augment_crop=-1)) == ["data.augment_crop: must be >= 0, but got -1"]
    spec = parse_spec(tiny_spec_dict(data__augment_crop=7, data__image_size=16))  # a larger image takes more
    assert dataclasses.asdict(spec.data)["augment_crop"] == 7


def test_the_deferred_pipeline_runs_on_batches_on_another_device() -> None:
    """With augmentation on, the trainer runs the input pipeline on training batches already on its device
    (a GPU), while the split keeps its statistics on the CPU. PyTorch's ``meta`` device refuses a CPU
    tensor of more than one element just as CUDA does, so this runs the pipeline there."""
    spec = parse_spec(tiny_spec_dict(data__augment_crop=2, data__augment_flip=True, space__expansion__factor=2,
                                     space__expansion__fill=0.5, space__norm__kind="none"))
    split, _ = build_trial(spec, config_from_params(spec, {}))
    assert split.train_pipeline is not None
    batch = split.x_train[:4].to("meta")
    out = split.train_pipeline(batch)
    assert out.device.type == "meta" and out.shape == split.train_pipeline(split.x_train[:4]).shape
