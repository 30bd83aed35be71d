"""The model builder: the only place that turns a plain ``ModelDesc`` into ``nn.Module``s.

Registered architectures (``MODELS``): ``mlp``, ``small_cnn`` (with optional group-equivariant blocks,
parameter-matched to the plain network: ``equivariant_block_widths``),
``resnet9`` (the DAWNBench CIFAR-10 network, built here) and torchvision classifiers by name
(``resnet18``, ``densenet121``, ``mobilenet_v3_small``; another torchvision classifier is one
``TORCHVISION_MODELS`` entry), built without pretrained weights and
adapted to the data: ``num_classes``, the first conv replaced when the images do not have 3 channels, the stem
adapted to expanded inputs, a ``cifar_stem`` option, the spec's normalisation and dropout.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sbsearch.group_conv import (
    GroupBatchNorm,
    GroupConv2d,
    GroupFold,
    GroupPool,
    InvariantReadout,
    LiftingConv2d,
    get_group,
)
from sbsearch.strategies import ModelDesc, apply_model_edits, auto_bias_scale, input_expansion, replaces_expansion

__all__ = [
    "INPUT_KINDS",
    "MODELS",
    "RESNET9_LOGIT_SCALE",
    "TORCHVISION_MODELS",
    "build_model",
    "constant_bias_energy",
    "constant_bias_mass",
    "count_parameters",
    "describe_model",
    "equivariant_block_widths",
    "first_layer",
    "first_layer_bias_name",
    "input_problem",
    "match_first_width",
]

FROZEN_MASK, FROZEN_VALUE = "_frozen_mask", "_frozen_value"
"""Suffixes of the buffers that hold a weight's frozen entries (``0.weight_frozen_mask``)."""


# --- building blocks -----------------------------------------------------------------------------


def _norm_groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def _norm_layer(kind: str, channels: int, image: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels) if image else nn.BatchNorm1d(channels)
    if kind == "group":
        return nn.GroupNorm(_norm_groups(channels), channels)
    if kind == "layer":
        # For feature maps, GroupNorm with one group is LayerNorm over (C, H, W) of each sample.
        return nn.GroupNorm(1, channels) if image else nn.LayerNorm(channels)
    raise AssertionError(f"unknown norm kind {kind!r}")


def _dropout_layer(desc: ModelDesc, image: bool) -> nn.Module:
    if desc.dropout_rate == 0.0:
        return nn.Identity()
    if desc.dropout_kind == "channel" and image:
        return nn.Dropout2d(desc.dropout_rate)
    return nn.Dropout(desc.dropout_rate)


class GroupFeatureNorm(nn.Module):
    """Group or layer norm of a group feature map (B, C, |G|, H, W), exactly equivariant.

    Each normalisation group holds whole fields (a channel with all its |G| maps), and the affine
    parameters are per channel, shared over the group axis; a per-(channel, element) affine would
    break equivariance.
    """

    def __init__(self, num_groups: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        assert channels % num_groups == 0, (channels, num_groups)
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.group_norm(x, self.num_groups, eps=self.eps)  # (B, C, |G|, H, W), stats per group of fields
        return y * self.weight.view(1, -1, 1, 1, 1) + self.bias.view(1, -1, 1, 1, 1)


def _group_norm_layer(kind: str, channels: int, group: str) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return GroupBatchNorm(channels, group)
    return GroupFeatureNorm(_norm_groups(channels) if kind == "group" else 1, channels)


def _group_dropout_layer(desc: ModelDesc) -> nn.Module:
    if desc.dropout_rate == 0.0:
        return nn.Identity()
    # Dropout3d drops a channel's whole (|G|, H, W) block, so each mask keeps equivariance exactly.
    return nn.Dropout3d(desc.dropout_rate) if desc.dropout_kind == "channel" else nn.Dropout(desc.dropout_rate)


class _ScaledBias(nn.Module):
    """Mixin for a first layer whose bias enters its output as ``bias_scale * bias`` (``controls.bias_scale``).

    The layer's own forward adds ``bias`` once; adding ``(bias_scale - 1) * bias`` on the channel axis
    makes that ``bias_scale * bias`` for a dense, conv or lifting-conv layer alike, without a copy of
    their forward passes. ``bias_scale`` is a plain float, not a tensor: the replica stack's
    ``functional_call`` swaps every parameter and buffer per replica, and a float stays the same for all.
    """

    bias_scale: float

    def __init__(self, *args: Any, bias_scale: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bias_scale = bias_scale

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # named as nn.Linear.forward names it
        out: torch.Tensor = super().forward(input)  # (B, C, ...)
        bias = getattr(self, "bias", None)
        if not isinstance(bias, torch.Tensor):
            return out
        return out + (self.bias_scale - 1.0) * bias.view(1, -1, *(1,) * (out.dim() - 2))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias_scale={self.bias_scale:.6g}"


class _ScaledBiasLinear(_ScaledBias, nn.Linear):
    pass


class _ScaledBiasConv2d(_ScaledBias, nn.Conv2d):
    pass


class _ScaledBiasLiftingConv2d(_ScaledBias, LiftingConv2d):
    pass


_SCALED_BIAS: dict[type[nn.Module], type[_ScaledBias]] = {
    nn.Linear: _ScaledBiasLinear, nn.Conv2d: _ScaledBiasConv2d, LiftingConv2d: _ScaledBiasLiftingConv2d,
}


def _scaled_if_first(layer_type: type[nn.Module], desc: ModelDesc, block: int) -> Callable[..., nn.Module]:
    """``layer_type``, or in the first block under ``controls.bias_scale`` its scaled-bias version."""
    if block != 0 or desc.bias_scale == 1.0:
        return layer_type
    assert isinstance(desc.bias_scale, float), f"bias_scale must be resolved before building, got {desc.bias_scale!r}"
    return functools.partial(_SCALED_BIAS[layer_type], bias_scale=desc.bias_scale)


def symmetric_strided_stem(stride: int) -> tuple[int, int]:
    """(kernel, padding) of a strided group-conv stem whose sampling grid is symmetric under rot90 and flips.

    A convolution commutes with them only when ``(size + 2 * padding - kernel) % stride == 0``
    (``group_conv.grid_is_symmetric``). On the expanded input (size N*K, stride K) a 3x3 kernel with
    padding 1 breaks that for every even K. The smallest kernel >= 3 with the stride's parity and
    padding ``(kernel - stride) / 2`` satisfy it for every N and give N x N feature maps, as the plain
    strided stem does: K = 2 gets a 4x4 kernel with padding 1, K = 3 a 3x3 one with padding 0.
    """
    kernel = {1: 3, 2: 4}.get(stride, stride)
    return kernel, (kernel - stride) // 2


def _equivariant_blocks(desc: ModelDesc) -> int:
    """How many of the first conv blocks are group convolutions."""
    return {"none": 0, "stem": 1, "early": math.ceil(desc.depth / 2), "all": desc.depth}[desc.equivariant_layers]


# --- mlp and small_cnn ---------------------------------------------------------------------------


def _plain_block_widths(desc: ModelDesc) -> tuple[int, ...]:
    return tuple(desc.first_width if i == 0 and desc.first_width else desc.width * 2 ** min(i, 2)
                 for i in range(desc.depth))


def _small_cnn(desc: ModelDesc) -> nn.Module:
    assert desc.is_image, "small_cnn needs image inputs"
    widths = equivariant_block_widths(desc) if _equivariant_blocks(desc) else _plain_block_widths(desc)
    return _small_cnn_of_widths(desc, widths)


def _small_cnn_parameters(desc: ModelDesc, widths: tuple[int, ...]) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation, no draws from the seeded generator
        return count_parameters(_small_cnn_of_widths(desc, widths))


@functools.lru_cache(maxsize=1024)
def equivariant_block_widths(desc: ModelDesc) -> tuple[int, ...]:
    """Channels of each conv block of a ``small_cnn`` with group blocks, parameter-matched to the plain one.

    A group block of c channels holds c maps per group element. Its lifting conv has the parameters of a
    plain conv of c channels, but a ``GroupConv2d`` has |G| times as many, and with ``stem`` and ``early``
    the first ordinary conv reads the last group block's c*|G| folded maps (``GroupFold``), so it has |G|
    times the inputs of its plain counterpart; with ``all`` the invariant head differs too. At the plain
    widths every placement would get up to |G| times the plain model's parameters and compare capacity as
    much as symmetry. So the group blocks' widths are the plain widths times one factor s, each rounded (at
    least 1), with s chosen so that the whole network's parameter count comes closest to that of the plain
    network of the same ``desc`` (``equivariant_layers: none``); ties go to the narrower. One channel of
    the last group block then costs |G| x k x k weights per output channel of the next conv, too coarse a
    step for narrow models, so with ``stem`` and ``early`` the first ordinary block's width is set next,
    to bring the count closest to the plain one (ties: the plain width); the other ordinary blocks keep
    their widths. At depth 2 and 3 the count comes within 2% of the plain one for ``stem`` and ``early``
    at widths 4 to 16, within 2.5% for ``all`` at width 16 and 5% at widths 4-8
    (``tests/test_equivariance.py``). At depth 1 no ordinary conv follows the fold, and the narrowest
    group block can be too wide: one D4 channel is 8 maps, twice a width-4 plain stem's.

    A ``first_width`` (set by the width-matched control, which solves for it) is the first block's
    channels as given, the other blocks as without it: the count then grows steadily with it.

    Example:
        >>> equivariant_block_widths(ModelDesc("small_cnn", (1, 8, 8), 10, depth=2, equivariant_layers="all"))
        (10, 19)
    """
    if desc.first_width:
        return (desc.first_width, *equivariant_block_widths(replace(desc, first_width=0))[1:])
    plain = _plain_block_widths(desc)
    blocks = _equivariant_blocks(desc)
    assert blocks > 0, "only a small_cnn with group blocks has equivariant widths"
    target = _small_cnn_parameters(replace(desc, equivariant_layers="none"), plain)

    def widths_at(scale: Fraction) -> tuple[int, ...]:
        return tuple(max(1, math.floor(scale * w + Fraction(1, 2))) if i < blocks else w for i, w in enumerate(plain))

    def count(scale: Fraction) -> int:
        return _small_cnn_parameters(desc, widths_at(scale))

    high = Fraction(1)
    while count(high) < target:
        high *= 2
    # Every scale at which some group block gains a channel: the count only grows along this list.
    scales = sorted({Fraction(0), high} | {Fraction(2 * c - 1, 2 * w) for w in plain[:blocks]
                                          for c in range(2, math.floor(high * w + Fraction(1, 2)) + 1)})
    low, up = 0, len(scales) - 1  # the first scale whose count reaches the target lies in [low, up]
    while low < up:
        middle = (low + up) // 2
        low, up = (middle + 1, up) if count(scales[middle]) < target else (low, middle)
    nearest = min(scales[max(0, up - 1):up + 1], key=lambda scale: (abs(count(scale) - target), scale))
    widths = widths_at(nearest)
    if blocks == desc.depth:
        return widths
    return _with_nearest_count(desc, widths, blocks, target)


def _with_nearest_count(desc: ModelDesc, widths: tuple[int, ...], block: int, target: int) -> tuple[int, ...]:
    """``widths`` with block ``block``'s width set so that the parameter count comes closest to ``target``.

    The count is linear in one block's width (its weights, bias and norm, and the next layer's inputs),
    so two counts give the slope; neighbours of the solution settle rounding, ties go to the width given.
    """
    def with_width(width: int) -> tuple[int, ...]:
        return (*widths[:block], width, *widths[block + 1:])

    def count(width: int) -> int:
        return _small_cnn_parameters(desc, with_width(width))

    start = widths[block]
    base, slope = count(start), count(start + 1) - count(start)
    guess = max(1, round(start + (target - base) / slope))
    candidates = {start, *range(max(1, guess - 1), guess + 2)}
    return with_width(min(candidates, key=lambda w: (abs(count(w) - target), abs(w - start), w)))


def _small_cnn_of_widths(desc: ModelDesc, widths: tuple[int, ...]) -> nn.Module:
    channels, layers = desc.input_shape[0], []
    block_dropout = desc.dropout_where == "all"
    group_blocks, group = _equivariant_blocks(desc), desc.equivariant_group
    invariant_head = group_blocks == desc.depth > 0 and desc.equivariant_layers == "all"
    for i in range(desc.depth):
        out = widths[i]
        kernel = desc.stem_kernel if i == 0 else desc.kernel_size
        stride = desc.stem_stride if i == 0 else 1
        padding = kernel // 2
        if i < group_blocks and stride > 1:
            kernel, padding = symmetric_strided_stem(stride)  # exact equivariance needs a symmetric grid
        conv_args = (channels, out, kernel)
        conv_kwargs: dict[str, Any] = {"stride": stride, "padding": padding, "bias": desc.norm == "none"}
        if i < group_blocks:
            # (B, C, H, W) -> (B, out, |G|, H', W') for the lifting layer, group maps after it.
            conv: nn.Module = _scaled_if_first(LiftingConv2d if i == 0 else GroupConv2d, desc, i)(
                *conv_args, group, **conv_kwargs)
            layers += [conv, _group_norm_layer(desc.norm, out, group), nn.ReLU()]
            if block_dropout:
                layers.append(_group_dropout_layer(desc))
            channels = out
            if i == group_blocks - 1 and invariant_head:
                layers.append(GroupPool("max", group))  # (B, out, |G|, H', W') -> (B, out, H', W')
            elif i == group_blocks - 1:
                # The ordinary layers see every orientation as a channel of its own; a max over the group
                # would tell them where an edge is but not which way it runs (on turned digits, stem
                # trailed the plain model by 19 points after two epochs with the max, 6 with the fold).
                layers.append(GroupFold(group))  # (B, out, |G|, H', W') -> (B, out*|G|, H', W')
                channels = out * get_group(group).order
        else:
            layers += [_scaled_if_first(nn.Conv2d, desc, i)(*conv_args, **conv_kwargs),
                       _norm_layer(desc.norm, out, image=True), nn.ReLU()]
            if block_dropout:
                layers.append(_dropout_layer(desc, image=True))
            channels = out
    # A 4x4 pooled map keeps coarse layout, which global average pooling would throw away on 8x8 digits.
    head = [nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, C*16)
            nn.Identity() if block_dropout else _dropout_layer(desc, image=False),
            nn.Linear(channels * 16, desc.num_outputs)]
    if invariant_head:
        # The same head, made invariant by a maximum over the group's transforms of its input. A global
        # pool would be invariant too, but it averages away where the features sit: on the digits, two C4
        # blocks with one were at 50% validation accuracy after 8 epochs, where the plain model was at 96%.
        readout = nn.Sequential(*[m for m in head if not isinstance(m, nn.Identity)])
        head = [InvariantReadout(readout, channels, group)]  # (B, C, H', W') -> (B, classes)
    layers += head
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def _mlp(desc: ModelDesc) -> nn.Module:
    features = math.prod(desc.input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    block_dropout = desc.dropout_where == "all"
    for i in range(desc.depth):
        width = desc.first_width if i == 0 and desc.first_width else desc.width
        layers += [_scaled_if_first(nn.Linear, desc, i)(features, width), _norm_layer(desc.norm, width, image=False),
                   nn.Tanh()]
        if block_dropout:
            layers.append(_dropout_layer(desc, image=False))
        features = width
    if not block_dropout:
        layers.append(_dropout_layer(desc, image=False))
    layers.append(nn.Linear(features, desc.num_outputs))
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


# --- resnet9 -------------------------------------------------------------------------------------


class _Residual(nn.Module):
    """``x + body(x)``: an identity shortcut around ``body``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = x + self.body(x)
        return out


class _Scale(nn.Module):
    """Multiplies by a fixed ``factor``: a plain float, which every replica of a stack shares (``_ScaledBias``)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


RESNET9_LOGIT_SCALE = 0.125
"""The fixed factor on resnet9's logits (Page's ``Mul(0.125)``): without it the logits of the wide last
block start large and the softmax saturates in the first steps."""


def _resnet9(desc: ModelDesc) -> nn.Module:
    """The residual network of the DAWNBench CIFAR-10 entries (Myrtle.ai; D. Page, "How to train your ResNet").

    With w = ``width`` (``first_width`` for the prep conv when set), every conv 3x3, stride 1, bias only
    without a norm layer, followed by ``desc.norm`` and a ReLU:

        prep    conv w                                        # (N, w, H, W)
        layer1  conv 2w, max-pool 2, + two convs 2w           # (N, 2w, H/2, W/2)
        layer2  conv 4w, max-pool 2                           # (N, 4w, H/4, W/4)
        layer3  conv 8w, max-pool 2, + two convs 8w           # (N, 8w, H/8, W/8)
        head    global max-pool, dropout, linear to classes without bias, x 0.125

    ``width`` counts the first block's channels, as in ``small_cnn``: Page's network is ``width`` 64 with
    ``norm: batch``. The prep conv takes the input's channels and the expansion's stem adaptation (made
    for a 3x3 stride-1 first conv, which this is) and is the first layer of the bias controls.
    """
    assert desc.is_image, "resnet9 needs image inputs"
    assert desc.dropout_rate == 0 or desc.dropout_where == "head", "resnet9 has dropout only before its classifier"
    w = desc.width

    def conv_block(c_in: int, c_out: int, block: int = 1, kernel: int = 3, stride: int = 1) -> nn.Sequential:
        conv = _scaled_if_first(nn.Conv2d, desc, block)(c_in, c_out, kernel, stride=stride, padding=kernel // 2,
                                                        bias=desc.norm == "none")
        return nn.Sequential(conv, _norm_layer(desc.norm, c_out, image=True), nn.ReLU())

    def pool() -> nn.Module:
        # ceil_mode leaves even sides as Page's floor pooling does, and keeps a 1-pixel map (8x8 digits
        # reach layer3 at 1x1) instead of pooling it to nothing.
        return nn.MaxPool2d(2, ceil_mode=True)

    def residual(channels: int) -> nn.Module:
        return _Residual(nn.Sequential(conv_block(channels, channels), conv_block(channels, channels)))

    prep = desc.first_width or w
    return nn.Sequential(OrderedDict([
        ("prep", conv_block(desc.input_shape[0], prep, block=0, kernel=desc.stem_kernel, stride=desc.stem_stride)),
        ("layer1", nn.Sequential(conv_block(prep, 2 * w), pool(), residual(2 * w))),
        ("layer2", nn.Sequential(conv_block(2 * w, 4 * w), pool())),
        ("layer3", nn.Sequential(conv_block(4 * w, 8 * w), pool(), residual(8 * w))),
        ("pool", nn.AdaptiveMaxPool2d(1)),  # (N, 8w, 1, 1)
        ("flatten", nn.Flatten()),  # (N, 8w)
        ("dropout", _dropout_layer(desc, image=False)),
        ("linear", nn.Linear(8 * w, desc.num_outputs, bias=False)),
        ("scale", _Scale(RESNET9_LOGIT_SCALE)),
    ]))


# --- torchvision classifiers ---------------------------------------------------------------------


@dataclass(frozen=True)
class TorchvisionModel:
    """How to adapt one torchvision classifier.

    ``first_conv``/``stem_pool``/``classifier`` are dotted module paths; ``dropout_arg`` names the
    constructor argument for dropout where torchvision has one (``None``: a dropout layer is put
    before the classifier); ``dropout_where`` is where that built-in dropout acts.
    """

    factory: str
    first_conv: str
    classifier: str
    stem_pool: str | None
    norm_arg: bool
    dropout_arg: str | None
    dropout_where: str = "head"


TORCHVISION_MODELS: dict[str, TorchvisionModel] = {
    "resnet18": TorchvisionModel("resnet18", "conv1", "fc", "maxpool", norm_arg=True, dropout_arg=None),
    # DenseNet's drop_rate is element-wise dropout after every dense layer.
    "densenet121": TorchvisionModel("densenet121", "features.conv0", "classifier", "features.pool0",
                                    norm_arg=False, dropout_arg="drop_rate", dropout_where="all"),
    "mobilenet_v3_small": TorchvisionModel("mobilenet_v3_small", "features.0.0", "classifier.3", None,
                                           norm_arg=True, dropout_arg="dropout"),
}
"""Registered torchvision classifiers and how each is adapted."""


def _torchvision_norm(kind: str) -> Callable[[int], nn.Module]:
    def make(channels: int) -> nn.Module:
        return _norm_layer(kind, channels, image=True)

    return make


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def _adapt_first_conv(model: nn.Module, path: str, desc: ModelDesc) -> None:
    """Give the first conv the data's channels, the cifar stem, and the stem adaptation of expansion.

    The expansion strategy describes its stem adaptation for a 3x3 stride-1 stem (``stem_stride`` K, or
    ``stem_kernel`` 2K+1); for a k x k stride-s stem the same idea is stride s*K, or a (k-1)*K+1 kernel
    that covers the same original pixels.
    """
    old = model.get_submodule(path)
    assert isinstance(old, nn.Conv2d)
    kernel, stride = old.kernel_size[0], old.stride[0]
    if desc.cifar_stem:
        kernel, stride = 3, 1
    kernel_factor = (desc.stem_kernel - 1) // 2
    kernel, stride = (kernel - 1) * kernel_factor + 1, stride * desc.stem_stride
    in_channels = desc.input_shape[0]
    if (in_channels, kernel, stride) == (old.in_channels, old.kernel_size[0], old.stride[0]):
        return
    new = nn.Conv2d(in_channels, old.out_channels, kernel, stride=stride, padding=kernel // 2,
                    bias=old.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # torchvision's own scheme
    _set_module(model, path, new)


def _replace_batch_norms(model: nn.Module, kind: str) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            _set_module(model, name, _norm_layer(kind, module.num_features, image=True))


def _torchvision_builder(name: str) -> Callable[[ModelDesc], nn.Module]:
    info = TORCHVISION_MODELS[name]

    def build(desc: ModelDesc) -> nn.Module:
        import torchvision

        assert desc.is_image, f"{name} needs image inputs"
        kwargs: dict[str, Any] = {"weights": None, "num_classes": desc.num_outputs}
        if info.norm_arg and desc.norm != "batch":
            kwargs["norm_layer"] = _torchvision_norm(desc.norm)
        builtin_dropout = info.dropout_arg is not None and desc.dropout_where == info.dropout_where
        if info.dropout_arg is not None:
            kwargs[info.dropout_arg] = desc.dropout_rate if builtin_dropout else 0.0
        model: nn.Module = getattr(torchvision.models, info.factory)(**kwargs)
        if not info.norm_arg and desc.norm != "batch":
            _replace_batch_norms(model, desc.norm)
        _adapt_first_conv(model, info.first_conv, desc)
        if desc.cifar_stem and info.stem_pool is not None:
            _set_module(model, info.stem_pool, nn.Identity())
        if desc.dropout_rate > 0 and not builtin_dropout:
            assert desc.dropout_where == "head", f"{name} has no dropout of its own at {desc.dropout_where!r}"
            head = model.get_submodule(info.classifier)
            _set_module(model, info.classifier, nn.Sequential(nn.Dropout(desc.dropout_rate), head))
        return model

    return build


# --- the registry --------------------------------------------------------------------------------

Builder = Callable[[ModelDesc], nn.Module]

MODELS: dict[str, Builder] = {
    "small_cnn": _small_cnn,
    "mlp": _mlp,
    "resnet9": _resnet9,
    **{name: _torchvision_builder(name) for name in TORCHVISION_MODELS},
}
"""Registered architectures: name -> builder(desc)."""

INPUT_KINDS: dict[str, tuple[str, ...]] = {
    "small_cnn": ("image",),
    "mlp": ("image", "vector"),
    "resnet9": ("image",),
    **{name: ("image",) for name in TORCHVISION_MODELS},
}
"""Which input kinds each architecture accepts."""


def build_model(desc: ModelDesc, seed: int) -> nn.Module:
    """Build the network a description asks for, initialised from ``seed``.

    With ``desc.frozen_fraction > 0`` every conv/linear weight gets its frozen entries (see
    ``strategies.asymmetry``), drawn from the same seed; the trainer keeps them fixed.

    Example:
        >>> desc = ModelDesc("small_cnn", input_shape=(1, 8, 8), num_outputs=10)
        >>> build_model(desc, seed=0)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MODELS[desc.name](desc)
        if desc.first_bias == "zero":
            bias = getattr(first_layer(model), "bias", None)
            if isinstance(bias, nn.Parameter):  # torchvision stems have no bias: nothing to zero
                with torch.no_grad():
                    bias.zero_()
        layer = first_layer(model)
        if isinstance(layer, _ScaledBias) and isinstance(layer.bias, nn.Parameter):
            # The effective bias s * b starts at the plain model's value: the control changes the step only.
            with torch.no_grad():
                layer.bias.div_(layer.bias_scale)
        if desc.frozen_fraction > 0:
            _freeze_entries(model, desc.frozen_fraction)
        return model


def _freeze_entries(model: nn.Module, fraction: float) -> None:
    """Freeze ``round(fraction * fan_in)`` random entries of each unit's weights at random values."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() < 2:
            continue  # norm layers' scales are vectors, not connections between units
        units, fan_in = weight.shape[0], weight[0].numel()
        frozen_per_unit = round(fraction * fan_in)
        if frozen_per_unit == 0:
            continue
        # A random subset per unit: argsort of uniform noise is a random permutation of each row.
        chosen = torch.rand(units, fan_in).argsort(dim=1)[:, :frozen_per_unit]
        mask = torch.zeros(units, fan_in, dtype=torch.bool).scatter_(1, chosen, True).view_as(weight)
        value = torch.randn_like(weight) * weight.detach().std().clamp_min(1e-8)
        with torch.no_grad():
            weight.copy_(torch.where(mask, value, weight))
        module.register_buffer("weight" + FROZEN_MASK, mask)
        module.register_buffer("weight" + FROZEN_VALUE, value.detach().clone())
        # Frozen entries get no gradient, so no optimiser state builds up for them (this module's own
        # training; the trainer also restores them after every step, which covers weight decay and
        # stacked replicas, whose copied tensors do not carry this hook).
        weight.register_hook(functools.partial(_without_frozen, module))  # type: ignore[no-untyped-call]


def _without_frozen(module: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    return grad.masked_fill(module.get_buffer("weight" + FROZEN_MASK), 0.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the controls --------------------------------------------------------------------------------


def _shape_only(desc: ModelDesc) -> nn.Module:
    """The architecture on the meta device: shapes and parameter counts without memory or init cost."""
    with torch.device("meta"):
        return MODELS[desc.name](desc)


def input_problem(desc: ModelDesc) -> str | None:
    """Why the network cannot take its input, or ``None``: a forward pass on the meta device, which
    checks every shape (a feature map pooled to nothing, say) without memory or compute."""
    model = _shape_only(desc).eval()
    try:
        with torch.no_grad():
            model(torch.empty(2, *desc.input_shape, device="meta"))
    except RuntimeError as err:
        return str(err).strip().splitlines()[0]
    return None


_FIRST_LAYER_TYPES = (nn.Linear, nn.Conv2d, LiftingConv2d)


def first_layer(model: nn.Module) -> nn.Module:
    """The first layer that mixes inputs (a Linear, Conv2d or lifting conv), in registration order."""
    return next(m for m in model.modules() if isinstance(m, _FIRST_LAYER_TYPES))


def first_layer_bias_name(model: nn.Module) -> str | None:
    """The parameter name of the first layer's bias (``0.bias``), or None when it has none."""
    layer = first_layer(model)
    if getattr(layer, "bias", None) is None:
        return None
    return next(f"{name}.bias" for name, m in model.named_modules() if m is layer).lstrip(".")


def constant_bias_energy(desc: ModelDesc, constants: torch.Tensor) -> float:
    """``sum c^2`` over the constants one first-layer unit of ``desc`` sees in one input sample.

    Args:
        desc: the model that gets the expanded input.
        constants: one input sample, shaped like the model's input, holding each constant (in the
            units the model sees) at its position and 0 at the positions of original values.

    Returns:
        For a dense first layer the sum over every position; for a conv the sum inside its window
        (zero padding adds nothing), averaged over the window's output positions.
    """
    return _sum_per_first_unit(desc, constants.double() ** 2)


def constant_bias_mass(desc: ModelDesc, constants: torch.Tensor) -> float:
    """``sum |c|`` over the constants one first-layer unit of ``desc`` sees: ``constant_bias_energy``'s
    counterpart for optimisers that normalise each parameter's step (``controls.bias_scale: auto``)."""
    return _sum_per_first_unit(desc, constants.double().abs())


def _sum_per_first_unit(desc: ModelDesc, values: torch.Tensor) -> float:
    """Sum of ``values`` (shaped like one input) over a first-layer unit's inputs, averaged over a conv's positions."""
    layer = first_layer(_shape_only(desc))
    if isinstance(layer, nn.Linear):
        return float(values.sum())
    kernel, stride, padding = (_first(getattr(layer, a)) for a in ("kernel_size", "stride", "padding"))
    ones = torch.ones(1, values.shape[0], kernel, kernel, dtype=values.dtype)
    return float(F.conv2d(values.unsqueeze(0), ones, stride=stride, padding=padding).mean())


def _first(value: Any) -> int:
    return int(value[0]) if isinstance(value, tuple) else int(value)


def match_first_width(desc: ModelDesc, target: int) -> ModelDesc:
    """``desc`` with the first layer's width whose parameter count is closest to ``target``.

    The count is linear in the first width (its weights, bias and norm, and the next layer's inputs),
    so two counts give the slope; neighbours of the solution settle rounding, ties go to the narrower.
    """
    def count(width: int) -> int:
        return count_parameters(_shape_only(replace(desc, first_width=width)))

    start = desc.first_width or desc.width
    base, slope = count(start), count(start + 1) - count(start)
    assert slope > 0, "the first layer's width must change the parameter count"
    guess = max(1, round(start + (target - base) / slope))
    best = min(range(max(1, guess - 1), guess + 2), key=lambda w: (abs(count(w) - target), w))
    return replace(desc, first_width=best)


def describe_model(plain: ModelDesc, settings: Mapping[str, Mapping[str, object]],
                   constants: torch.Tensor | None = None, optimizer: str | None = None) -> ModelDesc:
    """The model description of one trial: every strategy's edit, with the controls resolved.

    When a control replaces the expansion (``controls.bias_lr_multiplier: auto``, ``controls.bias_scale:
    auto`` or ``controls.width_matched``), the model gets the unexpanded input, and the expanded model it
    stands in for sets the bias multiplier or scale (from ``constants``, see ``constant_bias_energy`` and
    ``constant_bias_mass``) and the width.

    Args:
        plain: the spec's model for the unexpanded data, before any strategy.
        settings: every strategy's knob values, by strategy and knob name.
        constants: one expanded input sample with the constants at their positions and 0 elsewhere;
            needed with ``bias_lr_multiplier: auto`` or ``bias_scale: auto``.
        optimizer: ``train.optimizer``, needed with ``bias_scale: auto`` (its rule depends on it).
    """
    all_settings = {name: dict(values) for name, values in settings.items()}
    expanded = apply_model_edits(plain, all_settings)
    if not replaces_expansion(all_settings["controls"]):
        return expanded
    desc = apply_model_edits(plain, {**all_settings, "expansion": input_expansion(all_settings)})
    # The expanded model that the controls stand in for has none of them itself.
    expanded = replace(expanded, bias_lr_multiplier=1.0, bias_scale=1.0)
    if desc.bias_lr_multiplier == "auto":
        assert constants is not None, "bias_lr_multiplier: auto needs the expansion's constants"
        desc = replace(desc, bias_lr_multiplier=1.0 + constant_bias_energy(expanded, constants))
    if desc.bias_scale == "auto":
        assert constants is not None and optimizer is not None, "bias_scale: auto needs the constants and the optimiser"
        desc = replace(desc, bias_scale=auto_bias_scale(optimizer, constant_bias_energy(expanded, constants),
                                                        constant_bias_mass(expanded, constants)))
    if all_settings["controls"]["width_matched"]:
        desc = match_first_width(desc, count_parameters(_shape_only(expanded)))
    return desc
