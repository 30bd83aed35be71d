"""Data sets and the input side of the strategies: load, split by seed, expand, normalise.

Every loader returns raw inputs (images in [0, 1], vectors in their own units, function inputs on the
spec's domain) with a fixed train/validation/test split; ``prepare_inputs`` then runs the trial's input
pipeline: the strategies' steps (``strategies.InputTransform``) and the normalisation, by stage.

The test split is held out of the search: the trainer measures it once, at the end of a trial that
ran every epoch, and only the configurations chosen on validation are ever shown with it. Built-in
and scikit-learn sets carve it out by ``test_fraction`` (stratified, fixed by the seed, disjoint from
train and validation); torchvision sets use their official test split; function sets use a dense grid
of their own, offset from the validation grid.

Registered data sets (``DATASETS``):

- ``digits``: scikit-learn's 1797 8x8 handwritten digits, (1, 8, 8) images, 10 classes.
- ``iris``, ``wine``, ``breast_cancer``: scikit-learn's tabular sets as vectors of 4, 13 and 30
  features (standardised per feature by ``prepare``), 3, 3 and 2 classes.
- ``fn_smooth``, ``fn_highfreq``, ``fn_step``, ``fn_abs``: 1-D function approximation (regression,
  mean squared error) on ``domain``; see ``FUNCTIONS``.
- ``cifar10``, ``cifar100``, ``fgvc_aircraft``, ``dtd``: torchvision sets from a local ``root``
  (downloaded there only when asked), images resized to ``image_size``.
- ``imagefolder``: one sub-folder of images per class under ``root``.
- ``fakedata``: torchvision's FakeData, random images and labels of configurable size (tests and
  benchmarks of big models).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F

from sbsearch.errors import spec_field as _f  # short: every field of DataSpec is declared with it
from sbsearch.strategies import InputTransform, Settings, input_transforms

__all__ = ["DATASETS", "FUNCTIONS", "OBJECTIVES", "DataSpec", "DatasetInfo", "Split", "input_pipeline", "load_dataset",
           "prepare", "prepare_inputs", "task_objective"]

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
    Validation and test inputs are always fully prepared.
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
                                   "validation; torchvision sets use their official test split and fn_* sets a dense "
                                   "grid of their own (0 = no test split)",
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
                                                  "(pi, 2pi, pi/2 allowed)",
                                     ("must have low < high", lambda x: x[0] < x[1]))
    sampling: str = _f("grid", "training points of the fn_* data sets: evenly spaced (grid) or uniformly random",
                       choices=lambda: ("grid", "random"))
    points: int = _f(100, "training points of the fn_* data sets (they validate on 1000 points across the domain)",
                     ("must be >= 2", lambda x: x >= 2))
    fake_samples: int = _f(512, "images of the fakedata set", ("must be >= 2", lambda x: x >= 2))
    fake_classes: int = _f(10, "classes of the fakedata set", ("must be >= 2", lambda x: x >= 2))


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


def _load_digits(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    return _classification_split("digits", _resize(x, options.image_size), np.asarray(bunch.target), 10,
                                 val_fraction, seed, options.test_fraction)


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
points halfway between them (a grid of its own: no test point is a validation or grid training point)."""


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


def _images_to_tensor(dataset: Any, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """Decode a torchvision data set of PIL images into (N, 3, size, size) in [0, 1] and its labels."""
    from torchvision import transforms

    dataset.transform = transforms.Compose([
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.Resize(size),  # the shorter side, keeping the aspect ratio
        transforms.CenterCrop(size),
        transforms.ToTensor(),
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
    return torch.cat(xs), torch.cat(ys).numpy()


def _load_cifar(name: str) -> Loader:
    def load(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
        from torchvision import datasets

        assert options.root is not None, "checked by the spec"
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        # Validation is held out of the official training set; the official test set is the test split.
        ds = cls(options.root, train=True, download=options.download)
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0  # (50000, 3, 32, 32)
        y = np.asarray(ds.targets)
        test = None
        if options.test_fraction > 0:
            official = cls(options.root, train=False, download=options.download)
            x_test = torch.from_numpy(official.data).permute(0, 3, 1, 2).float() / 255.0  # (10000, 3, 32, 32)
            test = (_resize(x_test, options.image_size), np.asarray(official.targets))
        return _classification_split(name, _resize(x, options.image_size), y, len(ds.classes), val_fraction, seed,
                                     official_test=test)

    return load


def _load_fgvc_aircraft(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    from torchvision import datasets

    assert options.root is not None, "checked by the spec"
    size = options.image_size or DEFAULT_VARIABLE_IMAGE_SIZE
    ds = datasets.FGVCAircraft(options.root, split="trainval", download=options.download)
    x, y = _images_to_tensor(ds, size)
    test = None
    if options.test_fraction > 0:
        test = _images_to_tensor(datasets.FGVCAircraft(options.root, split="test", download=options.download), size)
    return _classification_split("fgvc_aircraft", x, y, len(ds.classes), val_fraction, seed, official_test=test)


def _load_dtd(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    from torchvision import datasets

    assert options.root is not None, "checked by the spec"
    parts = [datasets.DTD(options.root, split=s, partition=1, download=options.download) for s in ("train", "val")]
    size = options.image_size or DEFAULT_VARIABLE_IMAGE_SIZE
    decoded = [_images_to_tensor(p, size) for p in parts]
    x, y = torch.cat([d[0] for d in decoded]), np.concatenate([d[1] for d in decoded])
    test = None
    if options.test_fraction > 0:
        test = _images_to_tensor(datasets.DTD(options.root, split="test", partition=1, download=options.download), size)
    return _classification_split("dtd", x, y, len(parts[0].classes), val_fraction, seed, official_test=test)


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _imagefolder_missing(options: DataSpec) -> str | None:
    if options.root is None:
        return "needs data.root"
    root = Path(options.root)
    if not root.is_dir():
        return f"{root} is not a folder"
    classes = [d for d in root.iterdir() if d.is_dir()]
    if not classes:
        return f"{root} has no class sub-folders (one folder of images per class)"
    if not any(f.suffix.lower() in _IMAGE_SUFFIXES for d in classes for f in d.iterdir()):
        return f"{root} has no images in its class sub-folders"
    return None


def _load_imagefolder(val_fraction: float, seed: int, options: DataSpec = DataSpec()) -> Split:
    from torchvision import datasets

    assert options.root is not None, "checked by the spec"
    ds = datasets.ImageFolder(options.root)
    x, y = _images_to_tensor(ds, options.image_size or DEFAULT_VARIABLE_IMAGE_SIZE)
    return _classification_split("imagefolder", x, y, len(ds.classes), val_fraction, seed, options.test_fraction)


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
    "iris": DatasetInfo(_tabular("iris"), "classification", "vector", "scikit-learn iris: 4 features, 3 classes"),
    "wine": DatasetInfo(_tabular("wine"), "classification", "vector", "scikit-learn wine: 13 features, 3 classes"),
    "breast_cancer": DatasetInfo(_tabular("breast_cancer"), "classification", "vector",
                                 "scikit-learn breast cancer: 30 features, 2 classes"),
    **{name: DatasetInfo(_function(name), "regression", "vector", doc, own_test_split=True)
       for name, (_, doc) in FUNCTIONS.items()},
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
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    return (x - mean.view(shape)) / std.clamp_min(1e-6).view(shape)


Pipeline = Callable[[torch.Tensor], torch.Tensor]


def input_pipeline(split: Split, steps: Sequence[InputTransform], normalize: bool = True) -> Pipeline:
    """The deterministic part of a trial's input pipeline for raw inputs of ``split``: the ``raw`` steps,
    the normalisation with the training inputs' statistics, then the ``normalized`` steps.

    ``symmetry`` steps are random and for training batches only: the trainer runs them, before this.
    """
    raw = [step for step in steps if step.stage == "raw"]
    normalized = [step for step in steps if step.stage == "normalized"]

    def pipeline(x: torch.Tensor) -> torch.Tensor:
        for step in raw:
            x = step.apply(x, None)
        x = _normalise(x, split.mean, split.std) if normalize else x
        for step in normalized:
            x = step.apply(x, None)
        return x

    return pipeline


def prepare_inputs(split: Split, steps: Sequence[InputTransform], normalize: bool = True,
                   defer_train: bool = False) -> Split:
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
    """
    pipeline = input_pipeline(split, steps, normalize)
    test = None if split.x_test is None else pipeline(split.x_test).contiguous()
    if defer_train:
        return replace(split, x_val=pipeline(split.x_val).contiguous(), x_test=test, train_pipeline=pipeline)
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
