"""Dropout: random masks break the symmetry between units that would otherwise co-adapt."""

from __future__ import annotations

from dataclasses import replace

from sbsearch.strategies.base import Knob, ModelDesc, Settings, Strategy

__all__ = ["DROPOUT"]


def _edit_model(desc: ModelDesc, settings: Settings) -> ModelDesc:
    return replace(
        desc,
        dropout_rate=float(settings["rate"]),  # type: ignore[arg-type]
        dropout_kind=str(settings["kind"]),
        dropout_where=str(settings["where"]),
    )


# Models with dropout between their blocks (where: all); torchvision's ResNets and MobileNets have
# dropout only before their classifier, and DenseNet's own dropout is element-wise.
BLOCK_DROPOUT_MODELS = ("mlp", "small_cnn", "densenet121")
CHANNEL_DROPOUT_MODELS = ("small_cnn",)


def _incompatible(settings: Settings, model: str, input_kind: str) -> str | None:
    if float(settings["rate"]) == 0:  # type: ignore[arg-type]
        return None
    if settings["kind"] == "channel" and model == "mlp":
        return "channel dropout needs feature maps; the mlp has none (use kind: element)"
    if settings["where"] == "all" and model not in BLOCK_DROPOUT_MODELS:
        return f"{model} has dropout only before its classifier (use where: head)"
    if settings["kind"] == "channel" and model not in CHANNEL_DROPOUT_MODELS:
        return f"{model} has element-wise dropout only (use kind: element)"
    return None


DROPOUT = Strategy(
    name="dropout",
    doc="dropout after hidden blocks",
    knobs=(
        Knob("rate", "float", 0.0, "probability of dropping a unit (0 = off)", low=0.0, high=1.0, high_open=True),
        Knob("kind", "choice", "element", "drop single units or whole channels", choices=("element", "channel")),
        Knob("where", "choice", "all", "after every block, or only before the head",
             choices=("all", "head")),
    ),
    edit_model=_edit_model,
    incompatible=_incompatible,
)
