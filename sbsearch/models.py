"""The model builder: the only place that turns a plain ``ModelDesc`` into ``nn.Module``s."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sbsearch.strategies import ModelDesc

__all__ = ["MODELS", "build_model", "count_parameters"]


def _norm_layer(kind: str, channels: int, image: bool) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels) if image else nn.BatchNorm1d(channels)
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
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


def _small_cnn(desc: ModelDesc) -> nn.Module:
    assert desc.is_image, "small_cnn needs image inputs"
    channels, layers = desc.input_shape[0], []
    block_dropout = desc.dropout_where == "all"
    for i in range(desc.depth):
        out = desc.width * 2 ** min(i, 2)
        kernel = desc.stem_kernel if i == 0 else desc.kernel_size
        stride = desc.stem_stride if i == 0 else 1
        layers += [
            nn.Conv2d(channels, out, kernel, stride=stride, padding=kernel // 2, bias=desc.norm == "none"),
            _norm_layer(desc.norm, out, image=True),
            nn.ReLU(),
        ]
        if block_dropout:
            layers.append(_dropout_layer(desc, image=True))
        channels = out
    # A 4x4 pooled map keeps coarse layout, which global average pooling would throw away on 8x8 digits.
    layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten()]  # (B, C*16)
    if not block_dropout:
        layers.append(_dropout_layer(desc, image=False))
    layers.append(nn.Linear(channels * 16, desc.num_outputs))
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


def _mlp(desc: ModelDesc) -> nn.Module:
    features = 1
    for d in desc.input_shape:
        features *= d
    layers: list[nn.Module] = [nn.Flatten()]
    block_dropout = desc.dropout_where == "all"
    for _ in range(desc.depth):
        layers += [nn.Linear(features, desc.width), _norm_layer(desc.norm, desc.width, image=False), nn.Tanh()]
        if block_dropout:
            layers.append(_dropout_layer(desc, image=False))
        features = desc.width
    if not block_dropout:
        layers.append(_dropout_layer(desc, image=False))
    layers.append(nn.Linear(features, desc.num_outputs))
    return nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])


Builder = Callable[[ModelDesc], nn.Module]

MODELS: dict[str, Builder] = {"small_cnn": _small_cnn, "mlp": _mlp}
"""Registered architectures: name -> builder(desc)."""

INPUT_KINDS: dict[str, tuple[str, ...]] = {"small_cnn": ("image",), "mlp": ("image", "vector")}
"""Which input kinds each architecture accepts."""


def build_model(desc: ModelDesc, seed: int) -> nn.Module:
    """Build the network a description asks for, initialised from ``seed``.

    Example:
        >>> desc = ModelDesc("small_cnn", input_shape=(1, 8, 8), num_outputs=10)
        >>> build_model(desc, seed=0)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[desc.arch](desc)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
