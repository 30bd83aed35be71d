"""Input dimension expansion: the original values on a sparse grid, constants everywhere else.

An image (C, N, N) becomes (C, N*K, N*K); a vector of F features becomes F*K long. The constants act
like an external field that picks one of many equivalent minima (Zhang et al., arXiv 2409.06402).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sbsearch.strategies.base import InputTransform, Knob, ModelDesc, Settings, Strategy

__all__ = ["EXPANSION", "expand", "expand_image", "expand_vector"]

IMAGE_LAYOUTS = ("grid", "border", "upsample")
VECTOR_LAYOUTS = ("grid", "border", "upsample", "before", "after")


def expand_image(
    x: torch.Tensor, factor: int, fill: float, layout: str = "grid", offset: str = "start"
) -> torch.Tensor:
    """Expand images (N, C, H, W) to (N, C, H*K, W*K).

    ``grid`` puts the original pixel (i, j) at (i*K + o, j*K + o), with o = 0 (``start``) or K // 2
    (``center``); ``border`` centres the original image inside a constant frame; ``upsample`` is the
    same-size control that repeats each pixel K x K times and adds no constant at all.
    """
    assert x.dim() == 4, f"expected (N, C, H, W), got shape {tuple(x.shape)}"
    if factor == 1:
        return x
    n, c, h, w = x.shape
    if layout == "upsample":
        return F.interpolate(x, scale_factor=factor, mode="nearest")
    out = torch.full((n, c, h * factor, w * factor), float(fill), dtype=x.dtype, device=x.device)
    if layout == "grid":
        o = 0 if offset == "start" else factor // 2
        out[:, :, o::factor, o::factor] = x  # (N, C, H*K, W*K)
    elif layout == "border":
        top, left = (h * factor - h) // 2, (w * factor - w) // 2
        out[:, :, top : top + h, left : left + w] = x
    else:
        raise AssertionError(f"unknown image layout {layout!r}")
    return out


def expand_vector(
    x: torch.Tensor, factor: int, fill: float, layout: str = "border", offset: str = "start"
) -> torch.Tensor:
    """Expand vectors (N, F) to (N, F*K).

    ``border`` surrounds the features with constants (``[c, c, x, c, c]`` for F = 1, K = 5),
    ``before``/``after`` put all constants on one side, ``grid`` follows each feature with K - 1
    constants (the feature first, or in the middle with ``center``), ``upsample`` repeats each feature
    K times (the same-size control without constants).
    """
    assert x.dim() == 2, f"expected (N, F), got shape {tuple(x.shape)}"
    if factor == 1:
        return x
    n, f = x.shape
    extra = f * (factor - 1)
    if layout == "upsample":
        return x.repeat_interleave(factor, dim=1)
    const = torch.full((n, extra), float(fill), dtype=x.dtype, device=x.device)
    if layout == "before":
        return torch.cat([const, x], dim=1)
    if layout == "after":
        return torch.cat([x, const], dim=1)
    if layout == "border":
        left = extra // 2
        return torch.cat([const[:, :left], x, const[:, left:]], dim=1)
    if layout == "grid":
        out = torch.full((n, f, factor), float(fill), dtype=x.dtype, device=x.device)
        out[:, :, 0 if offset == "start" else factor // 2] = x
        return out.reshape(n, f * factor)
    raise AssertionError(f"unknown vector layout {layout!r}")


def why_not_rotation_symmetric(layout: str, factor: int, offset: str, side: int) -> str | None:
    """Why expanding a square ``side`` x ``side`` image moves the constants under a 90-degree rotation or a
    flip (so that ``expand(g.x) != g.expand(x)``), or None when the expansion commutes with them.

    Rotations and flips map position p of an axis of length L to L - 1 - p. ``upsample`` always
    commutes; ``grid`` puts pixel i at i*K + o, which maps onto the grid only when o = K - 1 - o, i.e.
    offset ``center`` with an odd K; ``border`` commutes when its margin (side*K - side) is even.
    """
    if factor == 1 or layout == "upsample":
        return None
    if layout == "grid":
        if offset == "center" and factor % 2 == 1:
            return None
        where = "the first position" if offset == "start" else f"position {factor // 2}"
        return (f"grid layout with factor {factor} puts each pixel at {where} of its {factor}x{factor} cell, "
                "which a rotation moves to another position (only offset: center with an odd factor keeps it)")
    if layout == "border":
        margin = side * factor - side
        if margin % 2 == 0:
            return None
        return f"border layout with factor {factor} on {side}x{side} images leaves an odd margin ({margin}) that a rotation moves"
    return None


def expand(x: torch.Tensor, settings: Settings) -> torch.Tensor:
    """Apply the expansion described by ``settings`` to a batch of images or vectors."""
    factor, fill = int(settings["factor"]), float(settings["fill"])  # type: ignore[call-overload,arg-type]
    layout, offset = str(settings["layout"]), str(settings["offset"])
    if x.dim() == 4:
        return expand_image(x, factor, fill, layout, offset)
    return expand_vector(x, factor, fill, layout, offset)


def _transform_input(settings: Settings, input_kind: str) -> InputTransform | None:
    """The expansion's step: in raw input units for images with ``fill_space: raw`` (the constant is then
    normalised with the original pixels' statistics, as a data pipeline that expands before ``Normalize``
    does), on normalised inputs otherwise. Vector features have per-feature statistics that the added
    constants do not share, so vectors are always normalised first (the spec refuses ``fill_space: raw``
    for normalised vector data)."""
    if int(settings["factor"]) == 1:  # type: ignore[call-overload]
        return None
    raw = settings["fill_space"] == "raw" and input_kind == "image"
    return InputTransform("raw" if raw else "normalized", lambda x, _: expand(x, settings))


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    factor = int(settings["factor"])  # type: ignore[call-overload]
    if desc.is_image:
        c, h, w = desc.input_shape
        shape: tuple[int, ...] = (c, h * factor, w * factor)
    else:
        shape = (desc.input_shape[0] * factor,)
    desc = _replace(desc, input_shape=shape)
    stem = settings["stem"]
    if factor == 1 or stem == "none" or not desc.is_image:
        return desc
    if stem == "stride":
        # Strided by K, the first conv sees each original pixel once with its constant neighbours,
        # and later feature maps keep the unexpanded size (and cost).
        return _replace(desc, stem_stride=factor)
    # A (2K+1)-wide kernel always covers three original pixels per axis.
    return _replace(desc, stem_kernel=2 * factor + 1)


def _replace(desc: ModelDesc, **changes: object) -> ModelDesc:
    from dataclasses import replace

    return replace(desc, **changes)  # type: ignore[arg-type]


def _incompatible(settings: Settings, model: str, input_kind: str) -> str | None:
    layout = settings["layout"]
    if input_kind == "image" and layout not in IMAGE_LAYOUTS:
        return f"layout {layout!r} is for vector inputs; images allow " + ", ".join(IMAGE_LAYOUTS)
    if input_kind == "vector" and settings["stem"] != "none" and int(settings["factor"]) > 1:  # type: ignore[call-overload]
        return "stem adaptation applies to image models only; use stem: none for vector inputs"
    return None


EXPANSION = Strategy(
    name="expansion",
    doc="input dimension expansion: original values on a sparse grid, a constant elsewhere",
    knobs=(
        Knob("factor", "int", 1, "expansion factor K (1 = off): N x N images become NK x NK", low=1, high=8),
        Knob("fill", "float", 0.5, "the constant at every added position (specs may write pi, 2pi, pi/2: "
             "pi was the best constant for 1-D function fits)"),
        Knob("layout", "choice", "grid", "where the original values go. Images: grid (pixel (i, j) at (iK+o, jK+o)), "
             "border (the image centred in a constant frame), upsample (each pixel repeated KxK: the same-size "
             "control without constants). Vectors: grid (each feature in its own K-cell: [c, c, x, c, c] for "
             "K = 5 with offset center), border (constants around all features: [c, c, x1, x2, c, c]), before / "
             "after (every constant on one side), upsample (each feature repeated K times)", choices=VECTOR_LAYOUTS),
        Knob("offset", "choice", "start", "grid position of the original value in each K-cell: the first (start) or "
             "the middle one, K // 2 (center); vectors default to center, the centred [c, c, x, c, c] of the "
             "1-D study", choices=("start", "center"), vector_default="center"),
        Knob("fill_space", "choice", "raw", "fill in raw input units (then normalised with the original pixels' "
             "statistics) or after normalisation; vectors default to normalized, and raw is refused for "
             "normalised vector data (its features are standardised one by one, and an added position has no "
             "feature of its own)", choices=("raw", "normalized"), vector_default="normalized"),
        Knob("stem", "choice", "none", "how the first layer meets the larger input: unchanged, "
             "strided by K, or a (2K+1) kernel", choices=("none", "stride", "kernel")),
    ),
    transform_input=_transform_input,
    edit_model=_edit_model,
    incompatible=_incompatible,
)
