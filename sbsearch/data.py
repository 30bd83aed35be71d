"""Data sets and the input side of the strategies: load, split by seed, expand, normalise.

Every loader returns raw inputs (images in [0, 1]) with a fixed train/validation split; ``prepare``
then applies the trial's expansion and the normalisation, in the order the spec asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch

from sbsearch.strategies import Settings, expand

__all__ = ["Split", "DatasetInfo", "DATASETS", "load_dataset", "prepare"]

Task = Literal["classification", "regression"]


@dataclass(frozen=True)
class Split:
    """A train/validation split, ready for a model.

    Images are (N, C, H, W) float32, vectors (N, F); targets are class indices (int64) or (N, 1) values.
    ``mean``/``std`` are per-channel (or per-feature) statistics of the raw training inputs.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    task: Task
    num_outputs: int
    mean: torch.Tensor
    std: torch.Tensor

    @property
    def input_kind(self) -> str:
        return "image" if self.x_train.dim() == 4 else "vector"

    @property
    def metric(self) -> str:
        """The task's headline metric, logged as ``val_<metric>``."""
        return "accuracy" if self.task == "classification" else "mse"

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        return "maximize" if self.task == "classification" else "minimize"


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_val = int(round(len(idx) * val_fraction))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))


def _load_digits(val_fraction: float, seed: int) -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = np.asarray(bunch.target)
    train, val = _stratified_split(y, val_fraction, seed)
    x_train = x[train]
    return Split(
        name="digits",
        x_train=x_train,
        y_train=torch.as_tensor(y[train], dtype=torch.int64),
        x_val=x[val],
        y_val=torch.as_tensor(y[val], dtype=torch.int64),
        task="classification",
        num_outputs=10,
        mean=x_train.mean(dim=(0, 2, 3)),
        std=x_train.std(dim=(0, 2, 3)),
    )


Loader = Callable[[float, int], Split]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: how to load it, and what is known before loading it."""

    loader: Loader
    task: Task
    input_kind: Literal["image", "vector"]

    @property
    def objective(self) -> tuple[str, Literal["maximize", "minimize"]]:
        """The metric a sweep optimises (``val_accuracy``) and its direction."""
        if self.task == "classification":
            return "val_accuracy", "maximize"
        return "val_mse", "minimize"


DATASETS: dict[str, DatasetInfo] = {"digits": DatasetInfo(_load_digits, "classification", "image")}
"""Registered data sets by name."""


def load_dataset(name: str, val_fraction: float, seed: int) -> Split:
    """Load a registered data set with a train/validation split fixed by ``seed``.

    Example:
        >>> split = load_dataset("digits", val_fraction=0.25, seed=0)
        >>> split.x_train.shape[1:]
        torch.Size([1, 8, 8])
    """
    return DATASETS[name].loader(val_fraction, seed)


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    return (x - mean.view(shape)) / std.clamp_min(1e-6).view(shape)


def prepare(split: Split, expansion: Settings, normalize: bool = True) -> Split:
    """Expand and normalise a split as one trial asks.

    With ``fill_space: raw`` the constant is placed in raw input units and normalised with the
    original pixels' statistics (what a data pipeline that expands before ``Normalize`` does);
    with ``normalized`` the constant is placed as-is into already normalised inputs.
    """
    # Vector features have per-feature statistics that the added constants do not share, so vectors
    # are always normalised first and the constant is placed as given.
    raw_first = expansion["fill_space"] == "raw" and split.input_kind == "image"

    def one(x: torch.Tensor) -> torch.Tensor:
        if raw_first:
            x = expand(x, expansion)
            return _normalise(x, split.mean, split.std) if normalize else x
        x = _normalise(x, split.mean, split.std) if normalize else x
        return expand(x, expansion)

    return replace(split, x_train=one(split.x_train).contiguous(), x_val=one(split.x_val).contiguous())
