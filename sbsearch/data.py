"""Data sets and the input side of the strategies: load, split by seed, expand, normalise.

Every loader returns raw inputs (images in [0, 1], vectors in their own units, function inputs on the
spec's domain) with a fixed train/validation/test split; ``prepare_inputs`` then runs the trial's input
pipeline: the strategies' steps (``strategies.InputTransform``) and the normalisation, by stage.
The data's own augmentation of training images (``augment_crop``, ``augment_flip``: ``augmentation``)
joins the ``symmetry`` stage, ahead of the strategies' steps, so it acts on the images as loaded.

Folder and torchvision image sets are decoded once into a uint8 cache file (``data.cache``,
``image_cache_folder``), keyed by the source files' sizes and times; later trials and worker processes
read that file instead of decoding every image again.

The test split is held out of the search: the trainer measures it once, at the end of a trial that
ran every epoch, and only the configurations chosen on validation are ever shown with it. Built-in
and scikit-learn sets carve it out by ``test_fraction`` (stratified, fixed by the seed, disjoint from
train and validation); torchvision sets use their official test split; function and PDE sets use a
dense grid of their own, offset from the validation grid.

Registered data sets (``DATASETS``):

- ``digits``: scikit-learn's 1797 8x8 handwritten digits, (1, 8, 8) images, 10 classes.
- ``digits_c4``, ``digits_d4``: the same digits, labels and split, with every image (train, validation
  and test) turned by a random multiple of 90 degrees (``digits_d4``: and mirrored left-right at random),
  one element of C4 (D4) per image fixed by the seed: data that carries the symmetry an equivariant
  network builds in. 6 and 9 (and 2 and 5) keep their own classes: a strong classifier still tells them
  apart (see ``_load_turned_digits``).
- ``iris``, ``wine``, ``breast_cancer``: scikit-learn's tabular sets as vectors of 4, 13 and 30
  features (standardised per feature by ``prepare``), 3, 3 and 2 classes.
- ``fn_smooth``, ``fn_highfreq``, ``fn_step``, ``fn_abs``: 1-D function approximation (regression,
  mean squared error) on ``domain``; see ``FUNCTIONS``.
- ``pde_poisson``, ``pde_heat``: physics-informed networks (``sbsearch.pde``): the 1-D Poisson equation
  on ``domain`` and the heat equation on ``domain`` squared, inputs x or (x, t). Trained on the PDE's
  residual and its boundary and initial conditions only (``Split.train_objective``), never on the
  solution; validated and tested, as regression, by the mean squared error against the exact solution.
- ``cifar10``, ``cifar100``, ``fgvc_aircraft``, ``dtd``: torchvision sets from a local ``root``
  (downloaded there only when asked), images resized to ``image_size``.
- ``imagefolder``: one sub-folder of images per class under ``root``.
- ``fakedata``: torchvision's FakeData, random images and labels of configurable size (tests and
  benchmarks of big models).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

from sbsearch.errors import spec_field as _f  # short: every field of DataSpec is declared with it
from sbsearch.group_conv import act_on_image_batch, get_group
from sbsearch.pde import PROBLEMS, Objective, collocation_points, evaluation_points, pinn_objective
from sbsearch.strategies import InputTransform, Settings, input_transforms

__all__ = ["DATASETS", "FUNCTIONS", "OBJECTIVES", "DataSpec", "DatasetInfo", "Split", "augmentation", "input_pipeline",
           "load_dataset", "prepare", "prepare_inputs", "random_crop", "random_flip", "task_objective"]

Task = Literal["classification", "regression"]
Direction = Literal["maximize", "minimize"]

OBJECTIVES: dict[Task, tuple[str, Direction]] = {
    "classification": ("accuracy", "maximize"),
    "regression": ("mse", "minimize"),
}
"""Each task's headline metric and which way is better. A trial reports it on validation as ``val_<metric>``
(``task_objective``: what a sweep optimises) and on the held-out test split as ``test_<metric>``."""


def task_objective(task: Task) -> tuple[str, Direction]:
    """The metric a sweep optimises on ``task`` (``val_accuracy``: the headline metric on validation) and its
    direction; ``DatasetInfo.objective`` and the trainer's reports both name it so."""
    metric, direction = OBJECTIVES[task]
    return f"val_{metric}", direction


@dataclass(frozen=True)
class Split:
    """A train/validation/test split, ready for a model.

    Images are (N, C, H, W) float32, vectors (N, F); targets are class indices (int64) or (N, 1) values.
    ``mean``/``std`` are per-channel (or per-feature) statistics of the raw training inputs.

    ``x_test``/``y_test`` are ``None`` when the data has no test split (``test_fraction: 0``).
    ``train_pipeline``, when set, is the input pipeline still owed to the training inputs: ``x_train``
    then holds the raw inputs, so that the trainer can apply the ``symmetry`` stage of the pipeline
    (and the loss terms that read the image) first and the rest (expansion, normalisation) after it.
    ``augment`` holds the data's own augmentation (``augmentation``): ``symmetry`` steps the trainer runs
    on every training batch before the strategies' (set only together with ``train_pipeline``).
    Validation and test inputs are always fully prepared.

    ``train_objective``, when set, is the data's own training loss, used in place of the task loss:
    ``train_objective(net, x, pipeline)`` gets the replicas (R, B, out), a batch of raw training inputs and
    the pipeline still owed to them (it differentiates through it: the PDE sets' residuals), and returns
    the loss summed over replicas. It reads no target, and ``y_train`` holds none (zeros, the residual's
    aim); ``prepare_inputs`` then always leaves the training inputs raw.
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
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    train_pipeline: Callable[[torch.Tensor], torch.Tensor] | None = None
    augment: tuple[InputTransform, ...] = ()
    train_objective: Objective | None = None

    @property
    def input_kind(self) -> str:
        return "image" if self.x_train.dim() == 4 else "vector"

    @property
    def metric(self) -> str:
        """The task's headline metric (``OBJECTIVES``), logged as ``val_<metric>`` and ``test_<metric>``."""
        return OBJECTIVES[self.task][0]


@dataclass(frozen=True)
class DataSpec:
    """The spec's ``data`` section, validated: what to train on and how to load and split it.

    The loaders take it as it is; each data set reads only the options that concern it: ``root``/``download``
    the torchvision sets and ``imagefolder``; ``image_size`` every image set; ``domain``/``sampling``/``points``
    the function sets; ``fake_samples``/``fake_classes`` ``fakedata``. (``batch_size`` is the trainer's, and
    ``normalize`` the input pipeline's.) Declared here, where the loaders can import it; ``sbsearch.spec``
    validates it by the rules on its fields, and checks there the rules that span fields or need the files.
    """

    dataset: str = _f("digits", "registered data set", choices=lambda: DATASETS)
    val_fraction: float = _f(0.25, "share of the data held out for validation (stratified, fixed by seed); the "
                                   "sweep chooses on it", ("must be in (0, 1)", lambda x: 0 < x < 1))
    test_fraction: float = _f(0.2, "share of the data held out as the test split (stratified, fixed by seed, disjoint "
                                   "from train and validation), which only measures the configurations chosen on "
                                   "validation; torchvision sets use their official test split and fn_* and pde_* sets "
                                   "a dense grid of their own (0 = no test split)",
                              ("must be in [0, 1)", lambda x: 0 <= x < 1))
    batch_size: int = _f(64, "training batch size", ("must be >= 1", lambda x: x >= 1))
    normalize: bool = _f(True, "standardise inputs with the training set's per-channel mean and std")
    root: Union[str, None] = _f(None, "folder with the data set's files (cifar10, cifar100, fgvc_aircraft, dtd, "
                                      "imagefolder); resolved to an absolute path")
    download: bool = _f(False, "fetch a torchvision data set into data.root when its files are not there")
    image_size: Union[int, None] = _f(None, "resize images to this side length (null = the data set's own size; "
                                            "64 for fgvc_aircraft, dtd and imagefolder, 32 for fakedata)",
                                      ("must be >= 4", lambda x: x >= 4))
    domain: tuple[float, float] = _f((-1.0, 1.0), "input interval [low, high] of the fn_* function data sets "
                                                  "and of every coordinate of the pde_* sets (pi, 2pi, pi/2 "
                                                  "allowed)",
                                     ("must have low < high", lambda x: x[0] < x[1]))
    sampling: str = _f("grid", "training points of the fn_* data sets and interior collocation points of the "
                               "pde_* sets: evenly spaced (grid) or uniformly random",
                       choices=lambda: ("grid", "random"))
    points: int = _f(100, "training points of the fn_* data sets (they validate on 1000 points across the "
                          "domain); interior collocation points of the pde_* sets (pde_heat: the nearest square "
                          "grid under sampling: grid, and grid side + 2 points on each edge)",
                     ("must be >= 2", lambda x: x >= 2))
    fake_samples: int = _f(512, "images of the fakedata set", ("must be >= 2", lambda x: x >= 2))
    fake_classes: int = _f(10, "classes of the fakedata set", ("must be >= 2", lambda x: x >= 2))
    augment_crop: int = _f(0, "random crop of every training image: pad each side with this many zero pixels, then "
                              "crop back to the image's size at a random offset per image (the CIFAR recipe uses 4; "
                              "0 = off); image data sets only, before the expansion, not with train.optimizer lbfgs",
                           ("must be >= 0", lambda x: x >= 0))
    augment_flip: bool = _f(False, "flip every training image left-right with probability 0.5; image data sets only, "
                                   "before the expansion, not with train.optimizer lbfgs")
    cache: Union[str, None] = _f(None, "folder for the decoded images of folder and torchvision data sets (uint8 "
                                       "files keyed by data set, part, image size and the source files' sizes and "
                                       "times), so later trials and workers skip decoding; null = "
                                       "<data.root>/.sbsearch-cache when writable, else ~/.cache/sbsearch; "
                                       "'off' = decode every time",
                                 ("must be 'off' or an absolute folder path (~ allowed)",
                                  lambda x: x == "off" or Path(x).expanduser().is_absolute()))


Loader = Callable[[float, int, DataSpec], Split]
Availability = Callable[[DataSpec], "str | None"]


@dataclass(frozen=True)
class DatasetInfo:
    """A registered data set: how to load it, and what is known before loading it.

    ``needs_root`` data sets read their files from ``DataSpec.root``; ``missing(options)`` says,
    without loading anything, which files are absent (``None`` when the data set can load).
    """

    loader: Loader
    task: Task
    input_kind: Literal["image", "vector"]
    doc: str = ""
    needs_root: bool = False
    missing: Availability | None = None
    image_side: int | None = None  # the side of its square images when ``image_size`` is unset
    channels: int = 3
    own_test_split: bool = False  # an official test split (or a grid of its own), not ``test_fraction`` of the data
    # Trains on a PDE's residual (``Split.train_objective``): second derivatives of the network with respect to
    # its inputs, then their gradient, which no layer may couple across a batch or lack (batch normalisation).
    physics_informed: bool = False

    def image_shape(self, options: DataSpec) -> tuple[int, int, int] | None:
        """(channels, height, width) of one input image, known without loading (``None`` for vectors)."""
        if self.input_kind != "image":
            return None
        side = options.image_size or self.image_side or DEFAULT_VARIABLE_IMAGE_SIZE
        return (self.channels, side, side)

    @property
    def objective(self) -> tuple[str, Direction]:
        """The metric a sweep optimises on this data set (``val_accuracy``) and its direction."""
        return task_objective(self.task)


# --- classification sets ---------------------------------------------------------------------


def _stratified_split(y: np.ndarray, val_fraction: float, seed: int,
                      test_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test indices: per class, a seeded permutation gives the first
    ``test_fraction`` of the class to test, the next ``val_fraction`` to validation, the rest to train.

    Both fractions are shares of the whole class, so with ``test_fraction`` 0 the validation part is
    exactly what it was before there was a test split.
    """
    rng = np.random.default_rng(seed)
    train_idx, val_idx, test_idx = [], [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = round(len(idx) * test_fraction)
        n_val = round(len(idx) * val_fraction)
        test_idx.append(idx[:n_test])
        val_idx.append(idx[n_test : n_test + n_val])
        train_idx.append(idx[n_test + n_val :])
    return tuple(np.sort(np.concatenate(part)) for part in (train_idx, val_idx, test_idx))  # type: ignore[return-value]


def _classification_split(name: str, x: torch.Tensor, y: np.ndarray, num_classes: int, val_fraction: float,
                          seed: int, test_fraction: float = 0.0,
                          official_test: tuple[torch.Tensor, np.ndarray] | None = None) -> Split:
    """Split (N, C, H, W) images or (N, F) vectors by class, with statistics of the training part.

    ``official_test`` (inputs, labels) is a data set's own test split; otherwise ``test_fraction``
    of every class is held out as the test split.
    """
    train, val, test = _stratified_split(y, val_fraction, seed, 0.0 if official_test is not None else test_fraction)
    x_train = x[train]
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    x_test: torch.Tensor | None
    y_test: torch.Tensor | None
    if official_test is not None:
        x_test, y_test = official_test[0], torch.as_tensor(official_test[1], dtype=torch.int64)
    elif len(test):
        x_test, y_test = x[test], torch.as_tensor(y[test], dtype=torch.int64)
    else:
        x_test = y_test = None
    return Split(
        name=name,
        x_train=x_train,
        y_train=torch.as_tensor(y[train], dtype=torch.int64),
        x_val=x[val],
        y_val=torch.as_tensor(y[val], dtype=torch.int64),
        task="classification",
        num_outputs=num_classes,
        mean=x_train.mean(dim=dims),
        std=x_train.std(dim=dims),
        x_test=x_test,
        y_test=y_test,
    )


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or (x.shape[-2], x.shape[-1]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _digits() -> tuple[torch.Tensor, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    return x, np.asarray(bunch.target)


def _load_digits(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    x, digit = _digits()
    return _classification_split("digits", _resize(x, options.image_size), digit, 10, val_fraction, seed,
                                 options.test_fraction)


def _load_turned_digits(group: Literal["c4", "d4"]) -> Loader:
    """``digits_c4`` / ``digits_d4``: the digits with every image (train, validation and test) transformed by
    a random element of ``group``, so that the data carries the symmetry an equivariant network builds in.

    The labels stay the ten digits, although a 6 turned by 180 degrees looks like a 9 (and, mirrored, a 2
    like a 5): in these digits the turned 6s and 9s are still told apart by their strokes. An RBF SVM
    trained on every group transform of the training images (C=10, validation 25%, seeds 0-4, 2250
    validation images in all) confused 6 and 9 on 2 of 450 (0.4%) of digits_c4, where merging them would
    have raised accuracy from 98.6% to 98.7% only (the same SVM on plain digits: 99.2%); its most confused
    pair under C4 was 5 and 9 (9 of 455, 2.0%). Under D4 the most confused pair is 2 and 5, 12 of 450
    (2.7%; accuracy 97.4%, 98.0% with them merged): not indistinguishable either. Merging would remove a
    distinction the data does make, and the labels would no longer be plain digits'; kept, the two sets
    have the same labels and, for a seed, the same split as ``digits``, so results compare image for image.
    """

    def load(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
        x, digit = _digits()
        # One group element per image, in load_digits' order, from a generator of the loader's own: the
        # same seed turns every image the same way, whatever the fractions, and draws nothing globally.
        generator = torch.Generator().manual_seed(seed)
        elements = torch.randint(get_group(group).order, (len(x),), generator=generator)  # (1797,)
        x = act_on_image_batch(group, elements, x)  # rot90 (after a left-right mirror, for d4) of 8x8: exact
        # Turned at 8x8, then resized: the square resize commutes with the turns, so this order only saves work.
        # Stratified by digit with the same seed as plain digits: the same images are held out.
        return _classification_split(f"digits_{group}", _resize(x, options.image_size), digit, 10, val_fraction,
                                     seed, options.test_fraction)

    return load


def _tabular(name: str) -> Loader:
    def load(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, f"load_{name}")()
        x = torch.tensor(bunch.data, dtype=torch.float32)  # (N, F), raw units; prepare standardises
        y = np.asarray(bunch.target)
        return _classification_split(name, x, y, int(y.max()) + 1, val_fraction, seed, options.test_fraction)

    return load


# --- 1-D function approximation --------------------------------------------------------------

FunctionOnUnit = Callable[[torch.Tensor], torch.Tensor]


def _smooth(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * t)


def _highfreq(t: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * t) + 0.5 * torch.sin(20 * math.pi * t)


def _step(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t < 0.5, -0.5, 0.5) + 0.5 * torch.sin(2 * math.pi * t)


def _abs(t: torch.Tensor) -> torch.Tensor:
    return (4 * t - 2).abs() - 1


FUNCTIONS: dict[str, tuple[FunctionOnUnit, str]] = {
    "fn_smooth": (_smooth, "sin(2 pi t): smooth, one period"),
    "fn_highfreq": (_highfreq, "sin(2 pi t) + 0.5 sin(20 pi t): a slow wave plus ten fast periods"),
    "fn_step": (_step, "a jump of 1 at t = 0.5 on top of 0.5 sin(2 pi t): discontinuous"),
    "fn_abs": (_abs, "|4t - 2| - 1: a V with a kink at t = 0.5, not differentiable there"),
}
"""The function data sets: f(t) on t in [0, 1], with t = (x - low) / (high - low) for x in the domain.

The target curve is the same whatever the domain, so changing ``domain`` changes only the scale and
offset of the input the network sees, which is what decides whether constant inputs help.
"""

VALIDATION_POINTS = 1000
"""Function sets validate on this many evenly spaced points across the whole domain, and test on as many
points halfway between them (a grid of its own: no test point is a validation point; a grid of training
points that includes t = 0.5, an odd ``points``, shares that one point with it, of 999)."""


def _function(name: str) -> Loader:
    f = FUNCTIONS[name][0]

    def load(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
        # val_fraction is not used: the fit is judged on a dense grid over the domain, so the metric
        # measures the whole curve, between training points too.
        low, high = options.domain
        if options.sampling == "grid":
            t_train = torch.linspace(0, 1, options.points, dtype=torch.float64)
        else:
            assert options.sampling == "random", options.sampling
            rng = np.random.default_rng(seed)
            t_train = torch.as_tensor(np.sort(rng.uniform(0, 1, options.points)))
        t_val = torch.linspace(0, 1, VALIDATION_POINTS, dtype=torch.float64)
        t_test = (t_val[:-1] + t_val[1:]) / 2

        def inputs(t: torch.Tensor) -> torch.Tensor:
            return (low + (high - low) * t).to(torch.float32).unsqueeze(1)  # (N, 1)

        return Split(
            name=name,
            x_train=inputs(t_train),
            y_train=f(t_train).to(torch.float32).unsqueeze(1),  # (N, 1)
            x_val=inputs(t_val),
            y_val=f(t_val).to(torch.float32).unsqueeze(1),
            task="regression",
            num_outputs=1,
            # The domain is the point of these tasks: standardising the input would erase it.
            mean=torch.zeros(1),
            std=torch.ones(1),
            x_test=inputs(t_test) if options.test_fraction > 0 else None,
            y_test=f(t_test).to(torch.float32).unsqueeze(1) if options.test_fraction > 0 else None,
        )

    return load


def _pde(name: str) -> Loader:
    problem = PROBLEMS[name]

    def load(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
        # As for the function sets, val_fraction is not used: validation and test are dense grids of their own.
        low, high = options.domain
        t_train = collocation_points(problem, options.points, options.sampling, seed)  # (N, D) in [0, 1]^D
        t_val, t_test = evaluation_points(problem)

        def inputs(t: torch.Tensor) -> torch.Tensor:
            return (low + (high - low) * t).to(torch.float32)  # (N, D)

        def solution(t: torch.Tensor) -> torch.Tensor:
            return problem.solution(t).to(torch.float32).unsqueeze(1)  # (N, 1)

        test = options.test_fraction > 0
        return Split(
            name=name,
            x_train=inputs(t_train),
            # The residual's aim, 0 at every collocation point: the objective reads no target, and the
            # exact solution, which nothing may train on, is not here to leak.
            y_train=torch.zeros(t_train.shape[0], 1),
            x_val=inputs(t_val),
            y_val=solution(t_val),
            task="regression",
            num_outputs=1,
            mean=torch.zeros(problem.dims),  # the domain is the point, as for the function sets
            std=torch.ones(problem.dims),
            x_test=inputs(t_test) if test else None,
            y_test=solution(t_test) if test else None,
            train_objective=pinn_objective(problem, (low, high), options.points),
        )

    return load


# --- torchvision sets ------------------------------------------------------------------------

DEFAULT_VARIABLE_IMAGE_SIZE = 64
"""Side length for sets whose images vary in size (FGVC-Aircraft, DTD, imagefolder) when none is given."""

_TORCHVISION_FILES = {
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
    "fgvc_aircraft": "fgvc-aircraft-2013b",
    "dtd": os.path.join("dtd", "dtd"),
}


def _torchvision_missing(name: str) -> Availability:
    def missing(options: DataSpec) -> str | None:
        if options.root is None:
            return "needs data.root"
        folder = Path(options.root) / _TORCHVISION_FILES[name]
        if options.download or folder.is_dir():
            return None
        return f"{folder} is missing; set data.download: true to fetch it there"

    return missing


Decoded = tuple[torch.Tensor, np.ndarray, list[str]]
"""A decoded part of an image data set: (N, C, H, W) uint8 images, their labels and the class names."""


def _decode_images(dataset: Any, size: int) -> Decoded:
    """Decode a torchvision data set of PIL images: (N, 3, size, size) uint8 images (RGB, the shorter side
    resized to ``size``, then centre-cropped), their labels and the class names. The slow part of loading a
    folder of JPEGs, which ``_decoded_once`` does once per source."""
    from torchvision import transforms

    dataset.transform = transforms.Compose([
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize(size),  # the shorter side, keeping the aspect ratio
        transforms.CenterCrop(size),
        transforms.PILToTensor(),
    ])
    import multiprocessing

    # Decoding JPEGs dominates; worker processes help, except inside a daemonic sweep worker,
    # which may not have children.
    workers = 0 if multiprocessing.current_process().daemon else min(4, os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=128, num_workers=workers)
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys).numpy(), list(dataset.classes)


# --- decoded images, cached --------------------------------------------------------------------

IMAGE_CACHE_FORMAT = 1
"""Part of every cache key: raise it when what a cache file holds, or how images are decoded, changes."""


def image_cache_folder(options: DataSpec) -> Path | None:
    """Where the decoded images of a folder or torchvision data set are kept (``data.cache``); None when off.

    ``data.cache`` null means ``<data.root>/.sbsearch-cache`` when the root is writable (next to the files it
    was decoded from, shared by every machine that shares them), else ``$XDG_CACHE_HOME/sbsearch``
    (``~/.cache/sbsearch``).
    """
    if options.cache == "off":
        return None
    if options.cache is not None:
        return Path(options.cache).expanduser()
    if options.root is not None and os.access(options.root, os.W_OK):
        return Path(options.root) / ".sbsearch-cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sbsearch"


def _source_fingerprint(folders: Sequence[Path]) -> str | None:
    """A digest of every file under ``folders``: its path, size and modification time. None when a folder is
    missing (a download is still to come) or none is given: there is nothing to key a cache file by."""
    if not folders or not all(folder.is_dir() for folder in folders):
        return None
    entries = []
    try:
        for folder in folders:
            for directory, subfolders, files in os.walk(folder, followlinks=True):
                subfolders.sort()
                for name in sorted(files):
                    path = Path(directory, name)
                    stat = path.stat()
                    entries.append(f"{path.relative_to(folder.parent)}\0{stat.st_size}\0{stat.st_mtime_ns}")
    except OSError:  # a file that vanished or a broken link: no key to trust, so no cache this time
        return None
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()


def _cache_file(folder: Path, options: DataSpec, part: str, size: int, sources: Sequence[Path]) -> Path | None:
    """The cache file of one part of a data set, decoded at ``size``, from the files under ``sources`` as they
    are now; None while they are missing. Files of the same data set, part, size and source location share a
    prefix, so that a new file replaces the stale ones (``_write_cache``)."""
    fingerprint = _source_fingerprint(sources)
    if fingerprint is None:
        return None
    where = hashlib.sha256("\0".join(str(s.resolve()) for s in sources).encode()).hexdigest()[:8]
    key = hashlib.sha256(f"{IMAGE_CACHE_FORMAT}\0{options.dataset}\0{part}\0{size}\0{fingerprint}".encode())
    return folder / f"{options.dataset}-{part}-{size}px-{where}-{key.hexdigest()[:16]}.pt"


def _read_cache(path: Path) -> Decoded | None:
    """The decoded images stored at ``path``, or None when there are none to trust."""
    try:
        stored = torch.load(path, weights_only=True)
        images, labels, classes = stored["images"], stored["labels"], stored["classes"]
    except Exception:  # missing, truncated or corrupt (torch.load has no one error for it): decoded (again)
        return None
    if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.dim() == 4
            and isinstance(labels, torch.Tensor) and labels.shape == images.shape[:1] and isinstance(classes, list)):
        return None
    return images, labels.numpy(), [str(c) for c in classes]


def _write_cache(path: Path, decoded: Decoded) -> None:
    """Store ``decoded`` at ``path`` atomically (a temporary file, then ``os.replace``): a process that
    loads the same data set meanwhile finds the whole file or none. Removes the stale files it replaces.
    A cache that cannot be written (read-only, full) costs only the decoding next time."""
    images, labels, classes = decoded
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save({"images": images.contiguous(), "labels": torch.as_tensor(labels, dtype=torch.int64),
                            "classes": list(classes)}, file)
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep the cache from others who share the data
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        stale_prefix = path.name.rpartition("-")[0] + "-"
        for stale in path.parent.glob(stale_prefix + "*.pt"):
            if stale != path:
                with contextlib.suppress(OSError):
                    stale.unlink()
    except (OSError, RuntimeError):  # torch.save reports a failed write as either
        pass


def _decoded_once(options: DataSpec, part: str, size: int, sources: Callable[[], Sequence[Path]],
                  decode: Callable[[], Decoded]) -> tuple[torch.Tensor, np.ndarray, int]:
    """One part of a folder or torchvision data set: (N, C, H, W) float32 images in [0, 1], labels and the
    number of classes. Read from the image cache (``image_cache_folder``) when it holds this part decoded
    from the files under ``sources()`` as they are now; otherwise ``decode()``, stored there for the next
    trial and the next worker process.

    ``sources`` is asked again after decoding, which may have downloaded the files. The images come out of
    the same uint8 tensor either way, so a cache hit returns exactly what decoding returned.
    """
    folder = image_cache_folder(options)
    path = None if folder is None else _cache_file(folder, options, part, size, sources())
    decoded = None if path is None else _read_cache(path)
    if decoded is None:
        decoded = decode()
        path = None if folder is None else _cache_file(folder, options, part, size, sources())
        if path is not None:
            _write_cache(path, decoded)
    images, labels, classes = decoded
    return images.float() / 255.0, labels, len(classes)


def _torchvision_sources(name: str, options: DataSpec) -> Callable[[], Sequence[Path]]:
    assert options.root is not None, "checked by the spec"
    folder = Path(options.root) / _TORCHVISION_FILES[name]
    return lambda: [folder]


def _load_cifar(name: str) -> Loader:
    def load(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
        from torchvision import datasets

        assert options.root is not None, "checked by the spec"
        root = options.root
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100

        def decode(train: bool) -> Callable[[], Decoded]:
            def read() -> Decoded:
                ds = cls(root, train=train, download=options.download)  # checks every file's MD5 first
                return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), np.asarray(ds.targets), ds.classes

            return read

        # Cached at the data set's own 32x32 and resized after: a resized image is no longer uint8.
        sources = _torchvision_sources(name, options)
        # Validation is held out of the official training set; the official test set is the test split.
        x, y, classes = _decoded_once(options, "train", 32, sources, decode(True))  # (50000, 3, 32, 32)
        test = None
        if options.test_fraction > 0:
            x_test, y_test, _ = _decoded_once(options, "test", 32, sources, decode(False))  # (10000, 3, 32, 32)
            test = (_resize(x_test, options.image_size), y_test)
        return _classification_split(name, _resize(x, options.image_size), y, classes, val_fraction, seed,
                                     official_test=test)

    return load


def _load_fgvc_aircraft(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    from torchvision import datasets

    assert options.root is not None, "checked by the spec"
    root, size = options.root, options.image_size or DEFAULT_VARIABLE_IMAGE_SIZE

    def decode(split: str) -> Callable[[], Decoded]:
        return lambda: _decode_images(datasets.FGVCAircraft(root, split=split, download=options.download), size)

    sources = _torchvision_sources("fgvc_aircraft", options)
    x, y, classes = _decoded_once(options, "trainval", size, sources, decode("trainval"))
    test = None
    if options.test_fraction > 0:
        test = _decoded_once(options, "test", size, sources, decode("test"))[:2]
    return _classification_split("fgvc_aircraft", x, y, classes, val_fraction, seed, official_test=test)


def _load_dtd(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    from torchvision import datasets

    assert options.root is not None, "checked by the spec"
    root, size = options.root, options.image_size or DEFAULT_VARIABLE_IMAGE_SIZE

    def decode_trainval() -> Decoded:
        parts = [_decode_images(datasets.DTD(root, split=s, partition=1, download=options.download), size)
                 for s in ("train", "val")]
        return torch.cat([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), parts[0][2]

    def decode_test() -> Decoded:
        return _decode_images(datasets.DTD(root, split="test", partition=1, download=options.download), size)

    sources = _torchvision_sources("dtd", options)
    x, y, classes = _decoded_once(options, "trainval", size, sources, decode_trainval)
    test = None
    if options.test_fraction > 0:
        test = _decoded_once(options, "test", size, sources, decode_test)[:2]
    return _classification_split("dtd", x, y, classes, val_fraction, seed, official_test=test)


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_folders(root: Path) -> list[Path]:
    """The class sub-folders of an ``imagefolder`` root, by name; hidden ones (the image cache's own
    ``.sbsearch-cache``, ``.ipynb_checkpoints``) are not classes."""
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def _imagefolder_missing(options: DataSpec) -> str | None:
    if options.root is None:
        return "needs data.root"
    root = Path(options.root)
    if not root.is_dir():
        return f"{root} is not a folder"
    classes = _class_folders(root)
    if not classes:
        return f"{root} has no class sub-folders (one folder of images per class)"
    if not any(f.suffix.lower() in _IMAGE_SUFFIXES for d in classes for f in d.iterdir()):
        return f"{root} has no images in its class sub-folders"
    return None


def _image_folder(root: Path) -> Any:
    """torchvision's ImageFolder over the class folders of ``_class_folders``."""
    from torchvision import datasets

    class VisibleClassesImageFolder(datasets.ImageFolder):  # type: ignore[misc]  # torchvision has no types
        def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
            classes = [d.name for d in _class_folders(Path(directory))]
            return classes, {name: i for i, name in enumerate(classes)}

    return VisibleClassesImageFolder(str(root))


def _load_imagefolder(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    assert options.root is not None, "checked by the spec"
    root, size = Path(options.root), options.image_size or DEFAULT_VARIABLE_IMAGE_SIZE
    x, y, classes = _decoded_once(options, "all", size, lambda: _class_folders(root),
                                  lambda: _decode_images(_image_folder(root), size))
    return _classification_split("imagefolder", x, y, classes, val_fraction, seed, options.test_fraction)


def _load_fakedata(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    from torchvision import datasets, transforms

    size = options.image_size or 32
    # random_offset ties the images to the seed: the same seed gives the same images.
    ds = datasets.FakeData(options.fake_samples, (3, size, size), options.fake_classes,
                           transform=transforms.ToTensor(), random_offset=seed * options.fake_samples)
    x = torch.stack([ds[i][0] for i in range(len(ds))])  # (N, 3, size, size) in [0, 1]
    y = np.array([ds[i][1] for i in range(len(ds))])
    return _classification_split("fakedata", x, y, options.fake_classes, val_fraction, seed, options.test_fraction)


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(_load_digits, "classification", "image", "scikit-learn 8x8 digits, 10 classes",
                          image_side=8, channels=1),
    "digits_c4": DatasetInfo(_load_turned_digits("c4"), "classification", "image",
                             "scikit-learn 8x8 digits, each turned by a random multiple of 90 degrees (fixed by the "
                             "seed); 10 classes: turned 6s and 9s stay apart (0.4% confused by a strong classifier)",
                             image_side=8, channels=1),
    "digits_d4": DatasetInfo(_load_turned_digits("d4"), "classification", "image",
                             "scikit-learn 8x8 digits, each mirrored at random and turned by a random multiple of 90 "
                             "degrees (fixed by the seed); 10 classes (2 and 5, the closest pair, 2.7% confused)",
                             image_side=8, channels=1),
    "iris": DatasetInfo(_tabular("iris"), "classification", "vector", "scikit-learn iris: 4 features, 3 classes"),
    "wine": DatasetInfo(_tabular("wine"), "classification", "vector", "scikit-learn wine: 13 features, 3 classes"),
    "breast_cancer": DatasetInfo(_tabular("breast_cancer"), "classification", "vector",
                                 "scikit-learn breast cancer: 30 features, 2 classes"),
    **{name: DatasetInfo(_function(name), "regression", "vector", doc, own_test_split=True)
       for name, (_, doc) in FUNCTIONS.items()},
    **{name: DatasetInfo(_pde(name), "regression", "vector", problem.doc, own_test_split=True, physics_informed=True)
       for name, problem in PROBLEMS.items()},
    "cifar10": DatasetInfo(_load_cifar("cifar10"), "classification", "image", "CIFAR-10 from data.root",
                           needs_root=True, missing=_torchvision_missing("cifar10"), image_side=32, own_test_split=True),
    "cifar100": DatasetInfo(_load_cifar("cifar100"), "classification", "image", "CIFAR-100 from data.root",
                            needs_root=True, missing=_torchvision_missing("cifar100"), image_side=32, own_test_split=True),
    "fgvc_aircraft": DatasetInfo(_load_fgvc_aircraft, "classification", "image",
                                 "FGVC-Aircraft (100 variants) from data.root", needs_root=True,
                                 missing=_torchvision_missing("fgvc_aircraft"), own_test_split=True),
    "dtd": DatasetInfo(_load_dtd, "classification", "image", "Describable Textures (47 classes) from data.root",
                       needs_root=True, missing=_torchvision_missing("dtd"), own_test_split=True),
    "imagefolder": DatasetInfo(_load_imagefolder, "classification", "image",
                               "one sub-folder of images per class under data.root", needs_root=True,
                               missing=_imagefolder_missing),
    "fakedata": DatasetInfo(_load_fakedata, "classification", "image",
                            "torchvision FakeData: random images and labels", image_side=32),
}
"""Registered data sets by name."""


def load_dataset(name: str, val_fraction: float, seed: int, options: DataSpec | None = None) -> Split:
    """Load a registered data set with a train/validation split fixed by ``seed``.

    ``options`` says how to load it (a spec's data section passes itself: ``load_dataset(data.dataset,
    data.val_fraction, seed, data)``); the data set and validation share are the arguments.

    Example:
        >>> split = load_dataset("digits", val_fraction=0.25, seed=0)
        >>> split.x_train.shape[1:]
        torch.Size([1, 8, 8])
    """
    return DATASETS[name].loader(val_fraction, seed, options or DataSpec())


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Standardise ``x`` per channel (images) or feature (vectors) with statistics on ``x``'s device."""
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    return (x - mean.view(shape)) / std.clamp_min(1e-6).view(shape)


# --- augmentation of training images ---------------------------------------------------------


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad every image of ``x`` (N, C, H, W) with ``padding`` zeros on each side and crop it back to H x W
    at an offset of its own. The offsets are drawn from ``generator`` on the CPU, so a seed gives the same
    crops on any device."""
    n, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)  # (N, C, H+2p, W+2p)
    top, left = torch.randint(2 * padding + 1, (2, n), generator=generator).to(x.device)  # (N,), (N,)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (N, H, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (N, 1, W)
    images = torch.arange(n, device=x.device)[:, None, None]  # (N, 1, 1)
    crops = padded.permute(0, 2, 3, 1)[images, rows, cols]  # (N, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip every image of ``x`` (N, C, H, W) left-right with probability 0.5, drawn from ``generator`` on the CPU."""
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)  # (N,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augmentation(options: DataSpec) -> tuple[InputTransform, ...]:
    """The data's own augmentation of training images (``augment_crop``, then ``augment_flip``), as
    ``symmetry`` steps: the trainer runs them on each training batch, on the images as loaded and before
    the strategies' symmetry steps and the rest of the pipeline, so the expansion's constants never move.
    Empty when both are off."""
    steps = []
    if options.augment_crop > 0:
        padding = options.augment_crop

        def crop(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            assert generator is not None, "a symmetry-stage step: the trainer gives it its generator"
            return random_crop(x, padding, generator)

        steps.append(InputTransform("symmetry", crop))
    if options.augment_flip:

        def flip(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
            assert generator is not None, "a symmetry-stage step: the trainer gives it its generator"
            return random_flip(x, generator)

        steps.append(InputTransform("symmetry", flip))
    return tuple(steps)


Pipeline = Callable[[torch.Tensor], torch.Tensor]


def input_pipeline(split: Split, steps: Sequence[InputTransform], normalize: bool = True) -> Pipeline:
    """The deterministic part of a trial's input pipeline for raw inputs of ``split``: the ``raw`` steps,
    the normalisation with the training inputs' statistics, then the ``normalized`` steps.

    ``symmetry`` steps are random and for training batches only: the trainer runs them, before this.
    """
    raw = [step for step in steps if step.stage == "raw"]
    normalized = [step for step in steps if step.stage == "normalized"]
    # The split keeps its statistics on the CPU; a deferred pipeline runs on training batches already on
    # the GPU. Copied to a device once, not per batch (a copy from the host would wait for the GPU each step).
    statistics: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def pipeline(x: torch.Tensor) -> torch.Tensor:
        for step in raw:
            x = step.apply(x, None)
        if normalize:
            if x.device not in statistics:
                statistics[x.device] = (split.mean.to(x.device), split.std.to(x.device))
            x = _normalise(x, *statistics[x.device])
        for step in normalized:
            x = step.apply(x, None)
        return x

    return pipeline


def prepare_inputs(split: Split, steps: Sequence[InputTransform], normalize: bool = True,
                   defer_train: bool = False, augment: Sequence[InputTransform] = ()) -> Split:
    """Run the deterministic input pipeline (``input_pipeline``) over a split.

    Args:
        split: raw inputs, as a loader returns them.
        steps: the trial's input steps (``strategies.input_transforms``).
        normalize: standardise with the training inputs' statistics.
        defer_train: leave the training inputs raw and hand the pipeline to the trainer
            (``Split.train_pipeline``), which applies it to each batch after the ``symmetry`` steps
            (augmentation) and lets loss terms see the batch before it (the invariance penalty's group
            action): a rotation then turns the image, never the expanded canvas and its constants.
            Validation and test inputs are prepared here either way.
        augment: the data's own augmentation (``augmentation``), kept in ``Split.augment`` for the trainer
            to run first on each training batch; it defers the training inputs, so it sees them raw.

    A split with a training objective of its own (``Split.train_objective``) always defers its training
    inputs: the objective differentiates through the pipeline with respect to the raw inputs.
    """
    pipeline = input_pipeline(split, steps, normalize)
    test = None if split.x_test is None else pipeline(split.x_test).contiguous()
    if defer_train or augment or split.train_objective is not None:
        return replace(split, x_val=pipeline(split.x_val).contiguous(), x_test=test, train_pipeline=pipeline,
                       augment=tuple(augment))
    return replace(split, x_train=pipeline(split.x_train).contiguous(), x_val=pipeline(split.x_val).contiguous(),
                   x_test=test)


def prepare(split: Split, expansion: Settings, normalize: bool = True, defer_train: bool = False) -> Split:
    """``prepare_inputs`` with the expansion as the only strategy: the data a plain model is trained on
    in tests and benchmarks. A trial's inputs come from every strategy (``trial.build_trial``).

    Example:
        >>> split = prepare(load_dataset("digits", 0.25, 0), {**expansion_defaults, "factor": 2})
        >>> split.x_train.shape[1:]
        torch.Size([1, 16, 16])
    """
    return prepare_inputs(split, input_transforms({"expansion": expansion}, split.input_kind), normalize, defer_train)
