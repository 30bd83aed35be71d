from __future__ import annotations

import math
import random
from collections.abc import Mapping

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import Tensor, nn

from sbsearch.group_conv import GroupBatchNorm, GroupConv2d, LiftingConv2d
from sbsearch.models import GroupFeatureNorm
from sbsearch.score import ScoreResult, default_score_layers, drift_score, replica_score
from sbsearch.strategies import ModelDesc
from tests.conftest import connecting_weights, registered_model_cases, shape_only

Replica = dict[str, Tensor]

_FINITE = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def replica_sets(draw: st.DrawFn, min_replicas: int = 2) -> list[Replica]:
    """R replicas with 1-3 layers of small random shapes (same names and shapes across replicas)."""
    num_replicas = draw(st.integers(min_replicas, 4))
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3))
    replicas: list[Replica] = [{} for _ in range(num_replicas)]
    for layer, shape in enumerate(shapes):
        for replica in replicas:
            values = draw(arrays(np.float32, shape, elements=_FINITE))
            replica[f"layer{layer}.weight"] = torch.from_numpy(values)
    return replicas


def _seeded_replicas(seeds: list[int], shapes: Mapping[str, tuple[int, ...]]) -> list[Replica]:
    replicas = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        replicas.append({name: torch.randn(shape, generator=generator) for name, shape in shapes.items()})
    return replicas


def _pot_layer_value(tensors: list[Tensor]) -> float:
    """The definition written out with POT and numpy, one pair at a time."""
    flat = [tensor.detach().reshape(-1).to(torch.float64).numpy() for tensor in tensors]
    pooled_std = math.sqrt(np.mean([np.var(values) for values in flat]))
    if pooled_std == 0.0:
        return 0.0
    pairs = [ot.wasserstein_1d(flat[i], flat[j], p=1) for i in range(len(flat)) for j in range(i + 1, len(flat))]
    return float(np.mean(pairs)) / pooled_std


settings.register_profile("sbsearch_score", max_examples=60, deadline=None)
settings.load_profile("sbsearch_score")


@given(replica_sets(min_replicas=1))
def test_identical_replicas_score_exactly_zero(replicas: list[Replica]) -> None:
    copies = [replicas[0], {name: tensor.clone() for name, tensor in replicas[0].items()}]
    result = replica_score(copies)
    assert result.value == 0.0
    assert all(value == 0.0 for value in result.per_layer.values())


@given(replica_sets(), st.randoms(use_true_random=False))
def test_permuting_hidden_units_leaves_score_unchanged(replicas: list[Replica], rng: random.Random) -> None:
    permuted = [dict(replica) for replica in replicas]
    for replica in permuted:
        for name, weight in replica.items():
            rows = list(range(weight.shape[0]))
            rng.shuffle(rows)
            replica[name] = weight[rows]  # reorders the layer's output units
    assert replica_score(permuted) == replica_score(replicas)


@given(replica_sets(), st.randoms(use_true_random=False))
def test_score_is_symmetric_in_replica_order(replicas: list[Replica], rng: random.Random) -> None:
    shuffled = list(replicas)
    rng.shuffle(shuffled)
    original, reordered = replica_score(replicas), replica_score(shuffled)
    assert reordered.value == pytest.approx(original.value, rel=1e-12, abs=1e-12)
    assert reordered.per_layer == pytest.approx(original.per_layer, rel=1e-12, abs=1e-12)


@given(replica_sets(), st.floats(min_value=1e-3, max_value=1e3))
def test_score_is_invariant_to_positive_rescaling(replicas: list[Replica], scale: float) -> None:
    exact = [{name: tensor.to(torch.float64) for name, tensor in replica.items()} for replica in replicas]
    rescaled = [{name: tensor * scale for name, tensor in replica.items()} for replica in exact]
    original, scaled = replica_score(exact), replica_score(rescaled)
    assert scaled.per_layer == pytest.approx(original.per_layer, rel=1e-9, abs=1e-9)
    assert scaled.value == pytest.approx(original.value, rel=1e-9, abs=1e-9)


@given(st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=4, unique=True))
def test_replicas_from_different_seeds_score_above_zero(seeds: list[int]) -> None:
    replicas = _seeded_replicas(seeds, {"a.weight": (8, 4), "b.weight": (3, 3, 2)})
    result = replica_score(replicas)
    assert result.value > 0.0
    assert all(value > 0.0 for value in result.per_layer.values())


@given(replica_sets())
def test_total_is_mean_of_layers_weighted_by_parameter_count(replicas: list[Replica]) -> None:
    result = replica_score(replicas)
    sizes = {name: tensor.numel() for name, tensor in replicas[0].items()}
    for name in sizes:
        alone = replica_score(replicas, layers=[name])
        assert alone.per_layer == {name: result.per_layer[name]}
        assert alone.value == pytest.approx(result.per_layer[name], rel=1e-12)
    expected = sum(result.per_layer[name] * sizes[name] for name in sizes) / sum(sizes.values())
    assert result.value == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(replica_sets())
def test_sorted_fast_path_equals_pot(replicas: list[Replica]) -> None:
    result = replica_score(replicas)
    for name, value in result.per_layer.items():
        expected = _pot_layer_value([replica[name] for replica in replicas])
        assert value == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_fast_path_equals_pot_on_a_large_layer() -> None:
    replicas = _seeded_replicas([0, 1, 2], {"conv.weight": (32, 16, 3, 3)})
    value = replica_score(replicas).per_layer["conv.weight"]
    assert value == pytest.approx(_pot_layer_value([r["conv.weight"] for r in replicas]), rel=1e-9)


def test_layers_selects_and_orders_the_scored_tensors() -> None:
    replicas = _seeded_replicas([0, 1], {"a.weight": (4, 4), "a.bias": (4,), "b.weight": (2, 4)})
    result = replica_score(replicas, layers=["b.weight", "a.weight"])
    assert list(result.per_layer) == ["b.weight", "a.weight"]
    assert isinstance(result, ScoreResult)


def test_constant_layer_scores_zero() -> None:
    replicas = [{"w": torch.full((3, 3), 0.5)}, {"w": torch.full((3, 3), 0.5)}]
    assert replica_score(replicas).per_layer == {"w": 0.0}


def test_bad_inputs_name_the_rule_and_the_value() -> None:
    one = _seeded_replicas([0], {"w": (2, 2)})
    with pytest.raises(ValueError, match="at least 2 replicas, but got 1"):
        replica_score(one)
    mismatched = [{"w": torch.zeros(2, 2)}, {"w": torch.zeros(2, 3)}]
    with pytest.raises(ValueError, match="same shape"):
        replica_score(mismatched)
    with pytest.raises(ValueError, match="lacks \\['missing'\\]"):
        replica_score(_seeded_replicas([0, 1], {"w": (2, 2)}), layers=["missing"])
    with pytest.raises(ValueError, match="at least one tensor"):
        replica_score(_seeded_replicas([0, 1], {"w": (2, 2)}), layers=[])


@given(replica_sets(min_replicas=1))
def test_drift_is_zero_without_training(replicas: list[Replica]) -> None:
    assert drift_score(replicas, replicas).value == 0.0


@given(replica_sets(min_replicas=1), st.floats(min_value=1e-3, max_value=1e3))
def test_drift_is_invariant_to_positive_rescaling(replicas: list[Replica], scale: float) -> None:
    exact = [{name: tensor.to(torch.float64) for name, tensor in replica.items()} for replica in replicas]
    moved = [{name: -1.5 * tensor.flip(0) for name, tensor in replica.items()} for replica in exact]

    def rescale(replica_set: list[Replica]) -> list[Replica]:
        return [{name: tensor * scale for name, tensor in replica.items()} for replica in replica_set]

    original = drift_score(moved, exact)
    scaled = drift_score(rescale(moved), rescale(exact))
    assert scaled.per_layer == pytest.approx(original.per_layer, rel=1e-9, abs=1e-9)


def test_drift_equals_pot_per_replica_and_averages_over_replicas() -> None:
    initial = _seeded_replicas([0, 1, 2], {"a.weight": (6, 5), "b.weight": (4,)})
    current = [{name: tensor * 1.3 + 0.1 * torch.randn_like(tensor) for name, tensor in r.items()} for r in initial]
    result = drift_score(current, initial)
    sizes = {"a.weight": 30, "b.weight": 4}
    for name in sizes:
        per_replica = []
        for now, start in zip(current, initial, strict=True):
            a, b = now[name].double().numpy().ravel(), start[name].double().numpy().ravel()
            pooled = math.sqrt((np.var(a) + np.var(b)) / 2)
            per_replica.append(ot.wasserstein_1d(a, b, p=1) / pooled)
        assert result.per_layer[name] == pytest.approx(np.mean(per_replica), rel=1e-9)
    expected = sum(result.per_layer[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert result.value == pytest.approx(expected, rel=1e-12)


def test_drift_needs_matching_replicas() -> None:
    initial = _seeded_replicas([0, 1], {"w": (2, 2)})
    with pytest.raises(ValueError, match="as many replicas as current \\(1\\), but got 2"):
        drift_score(initial[:1], initial)


def test_default_layers_are_conv_and_linear_weights_only() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ConvTranspose2d(4, 4, 2),
        nn.GroupNorm(2, 4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        shared,
        nn.LayerNorm(4),
        shared,
        nn.Linear(4, 2, bias=False),
    )
    assert default_score_layers(model) == ["0.weight", "2.weight", "6.weight", "9.weight"]
    named = dict(model.named_parameters())
    assert all(name in named for name in default_score_layers(model))


def test_a_non_finite_weight_scores_nan() -> None:
    finite = {"w": torch.tensor([1.0, 3.0, 2.0])}
    for bad in (float("nan"), float("inf")):
        diverged = {"w": torch.tensor([1.0, bad, 2.0])}
        assert math.isnan(replica_score([diverged, finite]).value)


def test_norm_tensors_biases_and_weights_that_do_not_train_stay_out() -> None:
    frozen = nn.Conv2d(2, 2, 1)
    frozen.weight.requires_grad_(False)
    model = nn.Sequential(
        nn.Conv1d(2, 2, 3),
        nn.LayerNorm([2, 3, 3]),  # an affine tensor with 3 axes: it scales features, it connects none
        frozen,
        LiftingConv2d(2, 2, 3, "c4"),
        GroupBatchNorm(2, "c4"),
        GroupFeatureNorm(1, 2),
        GroupConv2d(2, 2, 3, "d4", bias=False),
        nn.Bilinear(2, 2, 2),
        nn.Embedding(5, 2),
    )
    assert default_score_layers(model) == ["0.weight", "3.weight", "6.weight", "7.weight", "8.weight"]


# --- every weight of every registered model -------------------------------------------------------

# What the score must cover is ``connecting_weights`` (conftest.py); what it may leave out besides biases:
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, GroupFeatureNorm)


@pytest.mark.parametrize("desc", registered_model_cases())
def test_every_conv_like_and_linear_weight_of_every_registered_model_is_scored(desc: ModelDesc) -> None:
    model = shape_only(desc)
    scored = default_score_layers(model)
    assert scored == connecting_weights(model)
    group_convs = [m.weight for m in model.modules() if isinstance(m, (LiftingConv2d, GroupConv2d))]
    assert len(group_convs) == {"none": 0, "stem": 1, "early": 2, "all": 3}[desc.equivariant_layers]
    # What is left out is a bias or a norm layer's parameter, never a weight of some other kind.
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters()}
    unscored = {name: p for name, p in model.named_parameters() if name not in scored}
    assert all(name.endswith(".bias") or id(p) in norm_params for name, p in unscored.items()), sorted(unscored)
