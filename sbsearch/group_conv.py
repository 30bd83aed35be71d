"""Group-equivariant convolutions for C4 and D4 in plain PyTorch (G-CNNs, Cohen & Welling 2016).

A network built from these layers is equivariant *by construction*: the weights are one learnable base
filter bank, and every group element's copy of it is computed from that bank on each forward pass, so
the copies are shared exactly and gradients reach only the base filters.

Feature kinds (what a group element ``g`` does to a tensor):

- ``"image"``     (B, C, H, W): ``g`` transforms the two spatial axes (``act_on_image``).
- ``"group"``     (B, C, |G|, H, W), one map per group element: ``g`` transforms the spatial axes and
  permutes the group axis, ``(g.f)[h] = g(f[g^-1 h])`` (``act_on_group_features``).
- ``"folded"``    (B, C*|G|, H, W), a group feature map with its group axis folded into the channels
  (channel ``c*|G| + h`` is map ``h`` of channel ``c``): ``g`` acts as on ``"group"`` features.
- ``"invariant"`` any shape, e.g. logits: ``g`` does nothing.

The stacks the model builder composes::

    LiftingConv2d -> act -> [GroupBatchNorm] -> [GroupConv2d -> act -> ...]* -> GroupFold -> ordinary layers
    # (B, C, H, W) -> (B, C1, |G|, H', W') -> ...        -> (B, Ck, |G|, h, w) -> (B, Ck*|G|, h, w)

    ... group layers ... -> GroupPool -> InvariantReadout       # all conv blocks are group layers
    #                 (B, Ck, |G|, h, w) -> (B, Ck, h, w) -> (B, classes)

``GroupFold`` hands ordinary layers every orientation's map as a channel of its own, so they still see
which way a feature points (a vertical edge and a horizontal one give different channels); ``GroupPool``
keeps only the strongest orientation at each position, which is what an invariant head wants and what an
ordinary conv after it cannot recover.

What keeps equivariance between group layers:

- Pointwise nonlinearities (ReLU, GELU, ...) and bias/affine terms shared over the group axis: exactly.
- ``GroupBatchNorm``: statistics and affine parameters shared over the group axis: exactly.
- Dropout: ``nn.Dropout3d`` on (B, C, |G|, H, W) drops whole (|G|, H, W) blocks, so for a given mask it
  is exactly equivariant; element-wise ``nn.Dropout`` is equivariant only in distribution. Both are the
  identity in eval mode, which is where the checks below matter.
- Spatial pooling (e.g. ``F.max_pool2d`` on each group slice) and strided group convolutions: only when
  the sampling grid is symmetric, see below.

After ``GroupFold`` the features are still equivariant: a turn of the input turns every map and permutes
the |G| channels of each field. After ``GroupPool`` they are ``"image"`` maps that rotate with the input
but no longer carry a group axis. Ordinary layers after either are only as equivariant as they are
themselves: a ``nn.Conv2d`` with a general filter breaks the symmetry again, while a global average (or
max) pool over the spatial axes of pooled maps makes the result invariant, after which any layer
(``nn.Linear``) keeps it invariant.
``InvariantReadout`` keeps the layout that a global pool throws away: it applies any readout (a linear
classifier of a coarsely pooled map, say) to every transformed copy of the map and takes the maximum
over the copies, which a transform of the input only permutes.

Exactness rule (symmetric sampling grid). ``torch.rot90`` and ``torch.flip`` rotate/reflect about the
centre of the array. A convolution commutes with them exactly only if the centre of its output grid
lands on the centre of its input grid, i.e. for a square input of size H::

    (H + 2 * padding - kernel_size) % stride == 0

With ``stride=1`` this always holds. With ``stride=2``, ``kernel_size=3``, ``padding=1`` it needs an odd
H (H=9 works, H=8 drops the last row and column, and the rotated result no longer matches). The same rule
applies to spatial pooling. ``grid_is_symmetric`` tests it; the ``check_equivariance`` methods refuse
sizes that break it and choose sizes that satisfy it by default.

Example::

    net = nn.Sequential(LiftingConv2d(1, 8, 3, "d4", padding=1), nn.ReLU(), GroupFold("d4"))
    net[0].check_equivariance(atol=1e-5)        # [("e", 0.0), ("r1", 1e-16), ...]
    y = net(torch.randn(2, 1, 9, 9))            # (2, 64, 9, 9), turns and permutes with the input
    equivariance_errors(net, "d4", (2, 1, 9, 9), output_kind="folded")   # all about 1e-16
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbsearch.errors import did_you_mean

__all__ = [
    "GROUPS",
    "Group",
    "GroupBatchNorm",
    "GroupConv2d",
    "GroupFold",
    "GroupPool",
    "InvariantReadout",
    "LiftingConv2d",
    "act_on_group_features",
    "act_on_image",
    "act_on_image_batch",
    "assert_equivariant",
    "equivariance_errors",
    "get_group",
    "grid_is_symmetric",
]

FeatureKind = Literal["image", "group", "folded", "invariant"]


# ----------------------------------------------------------------------------------------------------
# The groups


@dataclass(frozen=True)
class Group:
    """A finite group of square symmetries, elements indexed ``0 .. order-1`` (0 is the identity).

    Element ``i`` is ``(quarter_turns, flipped)``: it acts on an image by first mirroring the last axis
    (if ``flipped``) and then ``torch.rot90`` by ``quarter_turns``. ``table[a][b]`` is the index of the
    product ``a * b`` (apply ``b`` first), ``inverse[a]`` the index of ``a^-1``; both are derived from the
    actual tensor operations, so they agree with ``act_on_image`` by construction.
    """

    name: str
    elements: tuple[tuple[int, bool], ...]
    element_names: tuple[str, ...]
    table: tuple[tuple[int, ...], ...]
    inverse: tuple[int, ...]

    @property
    def order(self) -> int:
        return len(self.elements)


def _transform_image(element: tuple[int, bool], x: Tensor) -> Tensor:
    quarter_turns, flipped = element
    if flipped:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, quarter_turns, dims=(-2, -1)) if quarter_turns % 4 else x


def _name_of_element(element: tuple[int, bool]) -> str:
    quarter_turns, flipped = element
    if quarter_turns == 0:
        return "f" if flipped else "e"
    return f"r{quarter_turns}f" if flipped else f"r{quarter_turns}"


def _make_group(name: str, elements: Sequence[tuple[int, bool]]) -> Group:
    # A probe with all-distinct entries has a trivial stabiliser, so each element gives a distinct image
    # and the product of two elements is found by comparing images.
    probe = torch.arange(9).reshape(3, 3)
    images = [_transform_image(e, probe) for e in elements]

    def index_of(image: Tensor) -> int:
        matches = [i for i, candidate in enumerate(images) if torch.equal(candidate, image)]
        assert len(matches) == 1, f"{name} is not closed under composition"
        return matches[0]

    table = tuple(tuple(index_of(_transform_image(a, _transform_image(b, probe))) for b in elements) for a in elements)
    identity = index_of(probe)
    assert identity == 0, "element 0 must be the identity"
    inverse = tuple(row.index(identity) for row in table)
    return Group(
        name=name,
        elements=tuple(elements),
        element_names=tuple(_name_of_element(e) for e in elements),
        table=table,
        inverse=inverse,
    )


GROUPS: dict[str, Group] = {
    "c4": _make_group("c4", [(r, False) for r in range(4)]),
    "d4": _make_group("d4", [(r, False) for r in range(4)] + [(r, True) for r in range(4)]),
}


def get_group(group: Group | str) -> Group:
    """The ``Group`` itself, or the registered group of that name (``"c4"``, ``"d4"``)."""
    if isinstance(group, Group):
        return group
    if group not in GROUPS:
        raise ValueError(f"group: must be one of {sorted(GROUPS)}, but got {group!r} ({did_you_mean(group, GROUPS)})")
    return GROUPS[group]


def _check_element(group: Group, g: int) -> None:
    if not 0 <= g < group.order:
        raise ValueError(f"g: must be an element index in [0, {group.order}) of {group.name}, but got {g!r}")


def act_on_image(group: Group | str, g: int, x: Tensor) -> Tensor:
    """Transform the last two (spatial) axes of ``x`` (..., H, W) by group element ``g``."""
    group = get_group(group)
    _check_element(group, g)
    return _transform_image(group.elements[g], x)


def act_on_group_features(group: Group | str, g: int, x: Tensor) -> Tensor:
    """Act with ``g`` on a group feature map ``x`` (..., |G|, H, W): ``(g.x)[h] = g(x[g^-1 h])``.

    This is the regular representation on the group axis combined with the spatial transform. The
    same action applied to a ``GroupConv2d`` filter (C_out, C_in, |G|, k, k) gives that filter's copy
    for output element ``g``.
    """
    group = get_group(group)
    _check_element(group, g)
    assert x.shape[-3] == group.order, f"group axis has {x.shape[-3]} entries, {group.name} has {group.order}"
    g_inverse = group.inverse[g]
    source = torch.tensor([group.table[g_inverse][h] for h in range(group.order)], device=x.device)
    return _transform_image(group.elements[g], x.index_select(-3, source))


def act_on_image_batch(group: Group | str, elements: Tensor, x: Tensor) -> Tensor:
    """Transform each image of a batch ``x`` (B, C, H, W) by its own element ``elements[b]`` (B,).

    Used to augment training batches with random rotations (and flips); needs square images.
    """
    group = get_group(group)
    assert x.dim() == 4 and x.shape[-1] == x.shape[-2], f"expected square (B, C, H, W), got {tuple(x.shape)}"
    assert elements.shape == (x.shape[0],), f"expected one element per image, got {tuple(elements.shape)}"
    out = x.clone()
    for g in range(1, group.order):
        chosen = (elements == g).nonzero().squeeze(1).to(x.device)
        if chosen.numel():
            out[chosen] = _transform_image(group.elements[g], x[chosen])
    return out


def grid_is_symmetric(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> bool:
    """Whether a convolution/pooling over a square ``size`` input commutes exactly with rot90 and flips.

    True iff the output grid's centre lands on the input grid's centre: the input fits at least one
    window and ``(size + 2 * padding - kernel_size) % stride == 0``.
    """
    span = size + 2 * padding - kernel_size
    return span >= 0 and span % stride == 0


# ----------------------------------------------------------------------------------------------------
# Checking equivariance


def _act(kind: FeatureKind, group: Group, g: int, x: Tensor) -> Tensor:
    if kind == "image":
        return act_on_image(group, g, x)
    if kind == "group":
        return act_on_group_features(group, g, x)
    if kind == "folded":
        unfolded = x.reshape(*x.shape[:-3], -1, group.order, *x.shape[-2:])  # (..., C, |G|, H, W)
        return act_on_group_features(group, g, unfolded).flatten(-4, -3)
    return x


def equivariance_errors(
    module: nn.Module,
    group: Group | str,
    input_shape: Sequence[int],
    input_kind: FeatureKind = "image",
    output_kind: FeatureKind = "invariant",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> list[tuple[str, float]]:
    """For every element ``g``, ``max |module(g.x) - g.module(x)|`` on one random input ``x``.

    Runs on a deep copy of ``module`` cast to ``dtype`` (float64 by default, so that the result measures
    the construction rather than float32 rounding), in the module's current train/eval mode; the module
    itself, its running statistics included, is left untouched. Works on whole models too, e.g. an image
    classifier with ``input_kind="image", output_kind="invariant"``.

    Returns:
        ``[(element_name, max_abs_error), ...]`` in element order, identity first.
    """
    group = get_group(group)
    probe = copy.deepcopy(module).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    tensors = [*probe.parameters(), *probe.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    x = torch.randn(tuple(input_shape), generator=generator, dtype=dtype).to(device)
    errors = []
    with torch.no_grad():
        y = probe(x)
        for g in range(group.order):
            transformed_then_mapped = probe(_act(input_kind, group, g, x))
            mapped_then_transformed = _act(output_kind, group, g, y)
            error = (transformed_then_mapped - mapped_then_transformed).abs().max().item()
            errors.append((group.element_names[g], float(error)))
    return errors


def assert_equivariant(errors: Sequence[tuple[str, float]], atol: float = 1e-5) -> list[tuple[str, float]]:
    """Raise ``AssertionError`` naming every element whose error exceeds ``atol``; else return ``errors``."""
    failing = [(name, error) for name, error in errors if not error <= atol]  # `not <=` also catches NaN
    if failing:
        listed = ", ".join(f"{name}: {error:.3g}" for name, error in failing)
        raise AssertionError(f"not equivariant to within atol={atol:g}: {listed}")
    return list(errors)


class _ChecksEquivariance:
    """Mixin: ``check_equivariance`` for a layer that knows its group and its input/output kinds."""

    group: Group
    input_kind: ClassVar[FeatureKind]
    output_kind: ClassVar[FeatureKind]

    def _check_input_shape(self, input_size: int | None) -> tuple[int, ...]:
        raise NotImplementedError

    def check_equivariance(
        self, atol: float = 1e-5, input_size: int | None = None, dtype: torch.dtype = torch.float64
    ) -> list[tuple[str, float]]:
        """Compare ``layer(g.x)`` with ``g.layer(x)`` for every group element on a random input.

        Args:
            atol: largest tolerated absolute error.
            input_size: side of the square random input; by default a size whose sampling grid is
                symmetric (see the module docstring). A size that breaks that rule is refused.
            dtype: the dtype the check runs in, on a copy of the layer.

        Returns:
            ``[(element_name, max_abs_error), ...]``; raises ``AssertionError`` if any exceeds ``atol``.
        """
        assert isinstance(self, nn.Module)
        errors = equivariance_errors(
            self,
            self.group,
            self._check_input_shape(input_size),
            input_kind=self.input_kind,
            output_kind=self.output_kind,
            dtype=dtype,
        )
        return assert_equivariant(errors, atol)


def _conv_check_size(input_size: int | None, kernel_size: int, stride: int, padding: int) -> int:
    if input_size is None:
        # The smallest symmetric size of at least 7, so that the check sees borders and an interior.
        smallest = kernel_size - 2 * padding
        steps = max(0, math.ceil((max(7, kernel_size) - smallest) / stride))
        input_size = smallest + stride * steps
        assert grid_is_symmetric(input_size, kernel_size, stride, padding)
    elif not grid_is_symmetric(input_size, kernel_size, stride, padding):
        raise ValueError(
            "input_size: (input_size + 2*padding - kernel_size) must be >= 0 and divisible by stride "
            f"(kernel_size={kernel_size}, stride={stride}, padding={padding}) for exact equivariance, "
            f"but got {input_size}"
        )
    return input_size


def _check_conv_arguments(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> None:
    for name, value, least in [
        ("in_channels", in_channels, 1),
        ("out_channels", out_channels, 1),
        ("kernel_size", kernel_size, 1),
        ("stride", stride, 1),
        ("padding", padding, 0),
    ]:
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name}: must be an int >= {least} (square kernels only), but got {value!r}")


# ----------------------------------------------------------------------------------------------------
# The layers


class _GroupConvBase(_ChecksEquivariance, nn.Module):
    """What both convolutions share: arguments, the base filter and one bias per output channel.

    The filter is (C_out, C_in, k, k) for a lifting layer and (C_out, C_in, |G|, k, k) for a group layer.
    """

    has_group_axis: ClassVar[bool] = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        group: Group | str,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        _check_conv_arguments(in_channels, out_channels, kernel_size, stride, padding)
        self.group = get_group(group)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        group_axis = (self.group.order,) if self.has_group_axis else ()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *group_axis, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        _reset_like_conv(self.weight, self.bias)


class LiftingConv2d(_GroupConvBase):
    """Lift an image to a group feature map: (B, C_in, H, W) -> (B, C_out, |G|, H', W').

    Output slice ``h`` is the correlation with the base filter transformed by ``h``. Parameters: one
    base filter (C_out, C_in, k, k) and, optionally, one bias per output channel shared over the group.

    Example::

        lift = LiftingConv2d(1, 8, 3, "c4", padding=1)
        y = lift(torch.randn(2, 1, 9, 9))          # (2, 8, 4, 9, 9)
        lift.check_equivariance(atol=1e-5)
    """

    input_kind: ClassVar[FeatureKind] = "image"
    output_kind: ClassVar[FeatureKind] = "group"


    def expanded_weight(self) -> Tensor:
        """The filter bank actually convolved: (C_out * |G|, C_in, k, k), output channel-major."""
        copies = [act_on_image(self.group, h, self.weight) for h in range(self.group.order)]
        return torch.stack(copies, dim=1).flatten(0, 1)  # (C_out, |G|, C_in, k, k) -> (C_out*|G|, ...)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.repeat_interleave(self.group.order)
        y = F.conv2d(x, self.expanded_weight(), bias, stride=self.stride, padding=self.padding)
        return y.reshape(y.shape[0], self.out_channels, self.group.order, *y.shape[2:])  # (B, C_out, |G|, H', W')

    def _check_input_shape(self, input_size: int | None) -> tuple[int, ...]:
        size = _conv_check_size(input_size, self.kernel_size, self.stride, self.padding)
        return (2, self.in_channels, size, size)

    def extra_repr(self) -> str:
        return _conv_repr(self)


class GroupConv2d(_GroupConvBase):
    """Group convolution: (B, C_in, |G|, H, W) -> (B, C_out, |G|, H', W').

    The base filter (C_out, C_in, |G|, k, k) is transformed for each output element ``h`` by
    ``act_on_group_features`` (spatial transform and permutation of its group axis); all copies form one
    (C_out*|G|, C_in*|G|, k, k) weight, rebuilt on every forward so gradients reach the base filter, and
    the layer runs as a single ``F.conv2d``.

    Example::

        conv = GroupConv2d(8, 8, 3, "d4", padding=1)
        y = conv(torch.randn(2, 8, 8, 9, 9))       # (2, 8, 8, 9, 9)
        conv.check_equivariance(atol=1e-5)
    """

    input_kind: ClassVar[FeatureKind] = "group"
    output_kind: ClassVar[FeatureKind] = "group"
    has_group_axis: ClassVar[bool] = True


    def expanded_weight(self) -> Tensor:
        """The filter bank actually convolved: (C_out * |G|, C_in * |G|, k, k), channel-major both ways."""
        copies = [act_on_group_features(self.group, h, self.weight) for h in range(self.group.order)]
        stacked = torch.stack(copies, dim=1)  # (C_out, |G|_out, C_in, |G|_in, k, k)
        return stacked.flatten(2, 3).flatten(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        order = self.group.order
        assert x.dim() == 5 and x.shape[2] == order, f"expected (B, C, {order}, H, W), got {tuple(x.shape)}"
        bias = None if self.bias is None else self.bias.repeat_interleave(order)
        y = F.conv2d(x.flatten(1, 2), self.expanded_weight(), bias, stride=self.stride, padding=self.padding)
        return y.reshape(y.shape[0], self.out_channels, order, *y.shape[2:])  # (B, C_out, |G|, H', W')

    def _check_input_shape(self, input_size: int | None) -> tuple[int, ...]:
        size = _conv_check_size(input_size, self.kernel_size, self.stride, self.padding)
        return (2, self.in_channels, self.group.order, size, size)

    def extra_repr(self) -> str:
        return _conv_repr(self)


class _OverGroupAxis(_ChecksEquivariance):
    """Mixin: a layer without weights that acts on group features' group axis, for any channel count; its
    equivariance is checked on 3 channels."""

    input_kind: ClassVar[FeatureKind] = "group"

    def _check_input_shape(self, input_size: int | None) -> tuple[int, ...]:
        size = 7 if input_size is None else input_size
        return (2, 3, self.group.order, size, size)


class GroupPool(_OverGroupAxis, nn.Module):
    """Pool over the group axis: (B, C, |G|, H, W) -> (B, C, H, W), ``mode`` "max" or "mean".

    The result is invariant along the group axis and still rotates with the input spatially (an
    ``"image"`` feature map). The forward pass works for any group; ``group`` only sets what
    ``check_equivariance`` tests (D4 contains C4, so the default covers both).
    """

    output_kind: ClassVar[FeatureKind] = "image"  # from group features (``_OverGroupAxis``)

    def __init__(self, mode: Literal["max", "mean"] = "max", group: Group | str = "d4") -> None:
        super().__init__()
        if mode not in ("max", "mean"):
            raise ValueError(f"mode: must be 'max' or 'mean', but got {mode!r}")
        self.mode = mode
        self.group = get_group(group)

    def forward(self, x: Tensor) -> Tensor:
        assert x.dim() == 5, f"expected (B, C, |G|, H, W), got {tuple(x.shape)}"
        return x.amax(dim=2) if self.mode == "max" else x.mean(dim=2)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, group={self.group.name!r}"


class GroupFold(_OverGroupAxis, nn.Module):
    """Fold the group axis into the channels: (B, C, |G|, H, W) -> (B, C*|G|, H, W), channel-major.

    A relabelling, no computation: channel ``c*|G| + h`` is map ``h`` of channel ``c``, the layout of the
    group convolutions' own expanded filters. An ordinary layer after it sees every orientation's response
    as its own channel, so it can tell an edge from its turn, which after ``GroupPool`` it cannot. The
    output is equivariant (``"folded"`` features: a turn of the input turns every map and cyclically
    permutes the orientations of each channel), not invariant. The forward pass works for any group;
    ``group`` sets the layout ``check_equivariance`` tests.

    Example::

        fold = GroupFold("c4")
        fold(torch.randn(2, 8, 4, 9, 9)).shape       # (2, 32, 9, 9)
        fold.check_equivariance(atol=1e-5)
    """

    output_kind: ClassVar[FeatureKind] = "folded"  # from group features (``_OverGroupAxis``)

    def __init__(self, group: Group | str) -> None:
        super().__init__()
        self.group = get_group(group)

    def forward(self, x: Tensor) -> Tensor:
        order = self.group.order
        assert x.dim() == 5 and x.shape[2] == order, f"expected (B, C, {order}, H, W), got {tuple(x.shape)}"
        return x.flatten(1, 2)  # (B, C*|G|, H, W)

    def extra_repr(self) -> str:
        return f"group={self.group.name!r}"


class InvariantReadout(_ChecksEquivariance, nn.Module):
    """An invariant readout of an image feature map: ``max over g of readout(g.x)``, (B, C, H, W) -> (B, out).

    ``readout`` (e.g. pool to 4x4, flatten, linear) sees every transformed copy of its input; a transform
    of the input only permutes the copies, so the element-wise maximum over them is invariant whatever
    ``readout`` is, while the readout itself still sees where things are. This is the rotation pooling of
    the last layer of Cohen & Welling's P4CNN. Parameters: ``readout``'s alone, initialised as it is.
    ``in_channels`` only sets the input of ``check_equivariance``.

    Example::

        head = InvariantReadout(nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(8 * 16, 10)), 8, "c4")
        head(torch.randn(2, 8, 9, 9)).shape         # (2, 10)
        head.check_equivariance(atol=1e-5)
    """

    input_kind: ClassVar[FeatureKind] = "image"
    output_kind: ClassVar[FeatureKind] = "invariant"

    def __init__(self, readout: nn.Module, in_channels: int, group: Group | str) -> None:
        super().__init__()
        self.readout = readout
        self.in_channels = in_channels
        self.group = get_group(group)

    def forward(self, x: Tensor) -> Tensor:
        order = self.group.order
        copies = torch.cat([_transform_image(element, x) for element in self.group.elements])  # (|G|*B, C, H, W)
        out: Tensor = self.readout(copies)  # (|G|*B, out)
        return out.reshape(order, x.shape[0], *out.shape[1:]).amax(dim=0)  # (B, out)

    def _check_input_shape(self, input_size: int | None) -> tuple[int, ...]:
        size = 7 if input_size is None else input_size
        return (2, self.in_channels, size, size)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, group={self.group.name!r}"


class GroupBatchNorm(_ChecksEquivariance, nn.BatchNorm3d):
    """Batch normalisation of a group feature map (B, C, |G|, H, W), one mean/variance/affine per channel.

    ``nn.BatchNorm3d`` with the group axis as its depth axis: statistics pool over batch, group and
    space, so the layer commutes exactly with every group element, in train and in eval mode.
    """

    input_kind: ClassVar[FeatureKind] = "group"
    output_kind: ClassVar[FeatureKind] = "group"

    def __init__(
        self,
        num_channels: int,
        group: Group | str,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        super().__init__(
            num_channels, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats
        )
        self.group = get_group(group)

    def forward(self, x: Tensor) -> Tensor:
        assert x.dim() == 5 and x.shape[2] == self.group.order, (
            f"expected (B, C, {self.group.order}, H, W), got {tuple(x.shape)}"
        )
        return super().forward(x)

    def _check_input_shape(self, input_size: int | None) -> tuple[int, ...]:
        size = 7 if input_size is None else input_size
        return (2, self.num_features, self.group.order, size, size)


def _reset_like_conv(weight: Tensor, bias: Tensor | None) -> None:
    # The same scheme as nn.Conv2d, with the fan-in of the filter each output map applies: the weight's
    # shape gives C_in*k*k for a lifting filter and C_in*|G|*k*k for a group filter, and every transformed
    # copy is a permutation of the base filter, so it has the same fan-in and the same spread. At
    # initialisation the group layers therefore keep the plain layers' activation scale
    # (tests/test_equivariance.py), and so does an ordinary conv after GroupFold, whose fan-in counts the
    # folded channels; the max over the group axis (GroupPool, before the invariant head) raises it, by
    # about 1.6x (C4) and 1.8x (D4) in std.
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        fan_in = weight[0].numel()
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(bias, -bound, bound)


def _conv_repr(layer: LiftingConv2d | GroupConv2d) -> str:
    return (
        f"{layer.in_channels}, {layer.out_channels}, kernel_size={layer.kernel_size}, group={layer.group.name!r}, "
        f"stride={layer.stride}, padding={layer.padding}, bias={layer.bias is not None}"
    )
