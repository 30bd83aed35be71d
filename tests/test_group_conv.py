"""Group convolutions are exactly equivariant, share their weights exactly, and train."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sbsearch.group_conv import (
    GROUPS,
    GroupBatchNorm,
    GroupConv2d,
    GroupFold,
    GroupPool,
    InvariantReadout,
    LiftingConv2d,
    act_on_group_features,
    act_on_image,
    assert_equivariant,
    equivariance_errors,
    get_group,
    grid_is_symmetric,
)

FEW = settings(max_examples=12, deadline=None)
group_names = st.sampled_from(sorted(GROUPS))


@st.composite
def conv_geometry(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """(kernel_size, stride, padding, input_size) with a symmetric sampling grid."""
    kernel_size = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, 2))
    steps = draw(st.integers(1, 3))
    input_size = max(kernel_size - 2 * padding, 1)
    while not grid_is_symmetric(input_size, kernel_size, stride, padding):
        input_size += 1
    return kernel_size, stride, padding, input_size + stride * steps


def small_invariant_net(group: str) -> nn.Sequential:
    return nn.Sequential(
        LiftingConv2d(1, 4, 3, group, padding=1),
        nn.ReLU(),
        GroupConv2d(4, 4, 3, group, padding=1),
        nn.ReLU(),
        GroupPool("max", group),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


# --- the groups ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, order", [("c4", 4), ("d4", 8)])
def test_group_tables_satisfy_the_group_axioms(name: str, order: int) -> None:
    group = GROUPS[name]
    assert group.order == order
    elements = range(order)
    for a in elements:
        assert group.table[0][a] == group.table[a][0] == a
        assert group.table[a][group.inverse[a]] == 0
        for b in elements:
            for c in elements:
                assert group.table[group.table[a][b]][c] == group.table[a][group.table[b][c]]


def test_elements_are_rot90_and_flips() -> None:
    x = torch.randn(2, 5, 5)
    c4, d4 = GROUPS["c4"], GROUPS["d4"]
    assert torch.equal(act_on_image(c4, c4.element_names.index("r1"), x), torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.equal(act_on_image(d4, d4.element_names.index("f"), x), torch.flip(x, dims=(-1,)))


@FEW
@given(name=group_names, data=st.data())
def test_group_feature_action_is_a_group_action(name: str, data: st.DataObject) -> None:
    group = GROUPS[name]
    g = data.draw(st.integers(0, group.order - 1))
    h = data.draw(st.integers(0, group.order - 1))
    x = torch.randn(2, 3, group.order, 5, 5)
    lhs = act_on_group_features(group, g, act_on_group_features(group, h, x))
    assert torch.equal(lhs, act_on_group_features(group, group.table[g][h], x))
    assert torch.equal(act_on_image(group, g, act_on_image(group, h, x)), act_on_image(group, group.table[g][h], x))


def test_unknown_group_and_element_are_refused() -> None:
    with pytest.raises(ValueError, match="group: must be one of"):
        get_group("c8")
    with pytest.raises(ValueError, match=r"g: must be an element index in \[0, 4\)"):
        act_on_image("c4", 4, torch.zeros(3, 3))


# --- every layer checks its own equivariance ---------------------------------------------------------


@FEW
@given(name=group_names, geometry=conv_geometry(), channels=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_lifting_conv_is_equivariant(name: str, geometry: tuple[int, int, int, int], channels: tuple[int, int]) -> None:
    kernel_size, stride, padding, size = geometry
    layer = LiftingConv2d(*channels, kernel_size, name, stride=stride, padding=padding)
    errors = layer.check_equivariance(atol=1e-5, input_size=size)
    assert len(errors) == GROUPS[name].order


@FEW
@given(name=group_names, geometry=conv_geometry(), channels=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_group_conv_is_equivariant(name: str, geometry: tuple[int, int, int, int], channels: tuple[int, int]) -> None:
    kernel_size, stride, padding, size = geometry
    layer = GroupConv2d(*channels, kernel_size, name, stride=stride, padding=padding, bias=stride == 1)
    layer.check_equivariance(atol=1e-5, input_size=size)


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_default_checks_pass_in_float32(name: str) -> None:
    for layer in (
        LiftingConv2d(3, 4, 3, name, padding=1),
        LiftingConv2d(3, 4, 3, name, stride=2, padding=1),
        GroupConv2d(4, 4, 3, name, padding=1),
        GroupConv2d(4, 4, 5, name, stride=2),
        GroupPool("max", name),
        GroupPool("mean", name),
        GroupFold(name),
        GroupBatchNorm(3, name),
        InvariantReadout(nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, 5)), 3, name),
    ):
        layer.check_equivariance(atol=1e-5, dtype=torch.float32)


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_group_batch_norm_is_equivariant_in_train_and_eval_and_the_check_leaves_it_untouched(name: str) -> None:
    norm = GroupBatchNorm(3, name)
    norm(torch.randn(4, 3, GROUPS[name].order, 5, 5) * 3 + 1)  # move the running stats off (0, 1)
    before = {key: value.clone() for key, value in norm.state_dict().items()}
    norm.check_equivariance(atol=1e-5)
    norm.eval()
    norm.check_equivariance(atol=1e-5)
    assert all(torch.equal(before[key], value) for key, value in norm.state_dict().items())


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_channel_dropout_over_group_maps_is_equivariant_for_a_fixed_mask(name: str) -> None:
    group, dropout = GROUPS[name], nn.Dropout3d(0.5)
    x = torch.randn(2, 6, group.order, 5, 5)
    for g in range(group.order):
        torch.manual_seed(g)
        transformed_then_dropped = dropout(act_on_group_features(group, g, x))
        torch.manual_seed(g)
        dropped_then_transformed = act_on_group_features(group, g, dropout(x))
        assert torch.equal(transformed_then_dropped, dropped_then_transformed)


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_fold_lays_out_each_channels_orientations_side_by_side_and_keeps_them_apart(name: str) -> None:
    group = GROUPS[name]
    x = torch.randn(2, 3, group.order, 5, 5)
    folded = GroupFold(name)(x)  # (2, 3*|G|, 5, 5)
    assert all(torch.equal(folded[:, c * group.order + h], x[:, c, h]) for c in range(3) for h in range(group.order))
    GroupFold(name).check_equivariance(atol=0.0)  # a relabelling: exact
    # The folded maps are equivariant, not invariant: a turn also permutes each channel's orientations.
    errors = equivariance_errors(GroupFold(name), name, (2, 3, group.order, 5, 5), "group", "image")
    with pytest.raises(AssertionError, match="r1"):
        assert_equivariant(errors, atol=1e-5)


def test_an_asymmetric_sampling_grid_breaks_equivariance_and_the_check_refuses_it() -> None:
    layer = LiftingConv2d(1, 2, 3, "c4", stride=2, padding=1)
    assert not grid_is_symmetric(8, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="input_size: .* but got 8"):
        layer.check_equivariance(input_size=8)
    errors = equivariance_errors(layer, "c4", (1, 1, 8, 8), input_kind="image", output_kind="group")
    with pytest.raises(AssertionError, match="r1"):
        assert_equivariant(errors, atol=1e-5)


@FEW
@given(name=group_names, size=st.integers(4, 11))
def test_invariant_readout_makes_a_layout_sensitive_head_invariant(name: str, size: int) -> None:
    torch.manual_seed(size)
    readout = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(2 * 16, 3))
    x = torch.randn(2, 2, size, size, dtype=torch.float64)
    errors = equivariance_errors(readout, name, (2, 2, size, size))
    assert max(error for _, error in errors) > 1e-3  # the head alone sees where things are
    head = InvariantReadout(readout, 2, name)
    assert_equivariant(equivariance_errors(head, name, (2, 2, size, size)), atol=1e-6)
    assert head.double()(x).shape == (2, 3)
    assert [id(p) for p in head.parameters()] == [id(p) for p in readout.parameters()]


# --- a whole network ---------------------------------------------------------------------------------


@FEW
@given(name=group_names, data=st.data(), size=st.integers(5, 12))
def test_small_network_logits_are_invariant(name: str, data: st.DataObject, size: int) -> None:
    group = GROUPS[name]
    torch.manual_seed(size)
    net = small_invariant_net(name).double()
    g = data.draw(st.integers(0, group.order - 1))
    x = torch.randn(2, 1, size, size, dtype=torch.float64)
    torch.testing.assert_close(net(act_on_image(group, g, x)), net(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_small_network_logits_are_invariant_in_float32_to_plain_rot90_and_flip(name: str) -> None:
    torch.manual_seed(0)
    net = small_invariant_net(name)
    x = torch.randn(4, 1, 8, 8)
    logits = net(x)
    transforms = [torch.rot90(x, k, dims=(-2, -1)) for k in (1, 2, 3)]
    if name == "d4":
        transforms += [torch.flip(x, dims=(-1,)), torch.flip(x, dims=(-2,)), x.transpose(-2, -1)]
    for transformed in transforms:
        torch.testing.assert_close(net(transformed), logits, atol=1e-5, rtol=0)
    errors = equivariance_errors(net, name, (2, 1, 9, 9), dtype=torch.float32)
    assert_equivariant(errors, atol=1e-5)


# --- weights: shared exactly, trained through the base filter ----------------------------------------


@pytest.mark.parametrize("name, order", [("c4", 4), ("d4", 8)])
def test_parameters_are_the_base_filters_only(name: str, order: int) -> None:
    lift = LiftingConv2d(3, 5, 3, name)
    conv = GroupConv2d(5, 7, 3, name)
    assert [tuple(p.shape) for p in lift.parameters()] == [(5, 3, 3, 3), (5,)]
    assert sum(p.numel() for p in lift.parameters()) == 5 * 3 * 3 * 3 + 5
    assert sum(p.numel() for p in conv.parameters()) == 7 * 5 * order * 3 * 3 + 7
    assert sum(p.numel() for p in LiftingConv2d(3, 5, 3, name, bias=False).parameters()) == 5 * 3 * 3 * 3
    assert sum(p.numel() for p in GroupPool("mean", name).parameters()) == 0
    assert sum(p.numel() for p in GroupFold(name).parameters()) == 0
    assert sum(p.numel() for p in GroupBatchNorm(5, name).parameters()) == 2 * 5
    assert tuple(lift.expanded_weight().shape) == (5 * order, 3, 3, 3)
    assert tuple(conv.expanded_weight().shape) == (7 * order, 5 * order, 3, 3)


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_gradients_reach_the_base_filters(name: str) -> None:
    net = small_invariant_net(name)
    loss = nn.functional.cross_entropy(net(torch.randn(4, 1, 7, 7)), torch.tensor([0, 1, 2, 0]))
    loss.backward()  # type: ignore[no-untyped-call]
    for layer in (net[0], net[2]):
        assert isinstance(layer, LiftingConv2d | GroupConv2d)
        for parameter in (layer.weight, layer.bias):
            assert parameter is not None and parameter.grad is not None
            assert parameter.grad.abs().sum() > 0


def test_output_shapes() -> None:
    x = torch.randn(2, 3, 9, 9)
    lifted = LiftingConv2d(3, 4, 3, "d4", stride=2, padding=1)(x)
    assert lifted.shape == (2, 4, 8, 5, 5)
    grouped = GroupConv2d(4, 6, 3, "d4")(lifted)
    assert grouped.shape == (2, 6, 8, 3, 3)
    assert GroupPool("max")(grouped).shape == (2, 6, 3, 3)
    assert GroupFold("d4")(grouped).shape == (2, 6 * 8, 3, 3)
    assert GroupBatchNorm(6, "d4")(grouped).shape == grouped.shape
