"""Data sets: documented shapes and targets, splits fixed by the seed, root checks, and the expansion rules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sbsearch.cli import main
from sbsearch.data import DATASETS, FUNCTIONS, DataSpec, load_dataset, prepare
from sbsearch.errors import SpecError
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES
from sbsearch.strategies.expansion import VECTOR_LAYOUTS, expand, expand_image, expand_vector

# name -> (input shape, task, outputs): what the data module's docstring promises.
DOCUMENTED = {
    "digits": ((1, 8, 8), "classification", 10),
    "digits_c4": ((1, 8, 8), "classification", 10),
    "digits_d4": ((1, 8, 8), "classification", 10),
    "iris": ((4,), "classification", 3),
    "wine": ((13,), "classification", 3),
    "breast_cancer": ((30,), "classification", 2),
    **{name: ((1,), "regression", 1) for name in FUNCTIONS},
    "pde_poisson": ((1,), "regression", 1),
    "pde_heat": ((2,), "regression", 1),
    "fakedata": ((3, 32, 32), "classification", 10),
}
NEEDS_ROOT = ("cifar10", "cifar100", "fgvc_aircraft", "dtd", "imagefolder")
SMALL = DataSpec(fake_samples=40)  # FakeData makes PIL images one by one: keep it small


def test_every_registered_data_set_is_documented_here() -> None:
    assert sorted(DATASETS) == sorted([*DOCUMENTED, *NEEDS_ROOT])
    assert all(DATASETS[name].needs_root for name in NEEDS_ROOT)
    assert not any(DATASETS[name].needs_root for name in DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_data_sets_without_download_load_with_the_documented_shapes(name: str) -> None:
    shape, task, outputs = DOCUMENTED[name]
    split = load_dataset(name, 0.25, seed=0, options=SMALL)
    info = DATASETS[name]
    assert split.task == info.task == task and split.num_outputs == outputs
    assert tuple(split.x_train.shape[1:]) == tuple(split.x_val.shape[1:]) == shape
    assert split.input_kind == info.input_kind and split.x_train.dtype == torch.float32
    assert split.mean.shape == split.std.shape == (shape[0],)
    if task == "classification":
        assert split.y_train.dtype == torch.int64 and split.y_train.dim() == 1
        assert int(split.y_train.min()) >= 0 and int(split.y_train.max()) < outputs
        assert info.objective == ("val_accuracy", "maximize") and split.metric == "accuracy"
    else:
        assert split.y_train.shape == (split.x_train.shape[0], 1) and split.y_train.dtype == torch.float32
        assert split.y_val.shape == ((1000 if split.x_val.shape[1] == 1 else 64 * 64), 1)  # pde_heat: a 64 x 64 grid
        assert info.objective == ("val_mse", "minimize") and split.metric == "mse"
    assert split.x_train.shape[0] == split.y_train.shape[0] and split.x_val.shape[0] == split.y_val.shape[0]


@pytest.mark.parametrize("name", ["digits", "wine", "breast_cancer", "fakedata"])
def test_splits_are_fixed_by_the_seed_and_stratified(name: str) -> None:
    a, b = load_dataset(name, 0.25, 3, SMALL), load_dataset(name, 0.25, 3, SMALL)
    assert a.x_test is not None and a.y_test is not None and b.y_test is not None
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val) and torch.equal(a.y_test, b.y_test)
    other = load_dataset(name, 0.25, 4, SMALL)
    assert not torch.equal(a.y_val, other.y_val) or not torch.equal(a.x_val, other.x_val)
    n_total = a.x_train.shape[0] + a.x_val.shape[0] + a.x_test.shape[0]
    classes = len(torch.unique(a.y_train))
    assert abs(a.x_val.shape[0] - 0.25 * n_total) <= classes  # rounding per class
    assert abs(a.x_test.shape[0] - SMALL.test_fraction * n_total) <= classes
    if name != "fakedata":  # FakeData's random labels give classes of a handful of images
        counts = torch.bincount(a.y_train, minlength=a.num_outputs).clamp_min(1)
        for held in (a.y_val, a.y_test):
            share = torch.bincount(held, minlength=a.num_outputs) / counts
            assert torch.all((share > 0.2) & (share < 0.6))


@pytest.mark.parametrize("name", ["digits", "wine", "fakedata"])
def test_the_test_split_is_disjoint_from_train_and_validation(name: str) -> None:
    # The rows of every split are distinct samples: no sample of the test split is also trained or validated on.
    split = load_dataset(name, 0.25, 0, SMALL)
    assert split.x_test is not None
    rows = {part: {tuple(x.flatten().tolist()) for x in xs}
            for part, xs in (("train", split.x_train), ("val", split.x_val), ("test", split.x_test))}
    assert rows["test"] and not rows["test"] & rows["train"] and not rows["test"] & rows["val"]
    assert not rows["val"] & rows["train"]
    none = load_dataset(name, 0.25, 0, DataSpec(fake_samples=40, test_fraction=0.0))
    assert none.x_test is None and none.x_val.shape[0] == split.x_val.shape[0]  # validation unchanged by the test split


def test_function_sets_test_between_their_validation_points() -> None:
    split = load_dataset("fn_smooth", 0.25, 0)
    assert split.x_test is not None and split.y_test is not None and split.x_test.shape == (999, 1)
    val, test = split.x_val[:, 0], split.x_test[:, 0]
    assert torch.all((test > val[:-1]) & (test < val[1:]))  # strictly between neighbours: a grid of its own
    assert torch.allclose(split.y_test[:, 0], torch.sin(2 * math.pi * (test + 1) / 2), atol=1e-5)


def test_tabular_features_are_standardised_per_feature() -> None:
    base = load_dataset("wine", 0.25, 0)
    split = prepare(base, STRATEGIES["expansion"].defaults())
    assert torch.allclose(split.x_train.mean(dim=0), torch.zeros(13), atol=1e-5)
    assert torch.allclose(split.x_train.std(dim=0), torch.ones(13), atol=1e-4)
    assert base.x_train.std(dim=0).max() > 10  # raw wine features differ in scale by orders of magnitude


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_function_sets_keep_their_domain_and_curve(name: str) -> None:
    wide = load_dataset(name, 0.25, 0, DataSpec(domain=(0.0, 2 * math.pi), points=50))
    narrow = load_dataset(name, 0.25, 0, DataSpec(domain=(-1.0, 1.0), points=50))
    assert wide.x_train.shape == (50, 1)
    assert float(wide.x_train.min()) == pytest.approx(0.0) and float(wide.x_train.max()) == pytest.approx(2 * math.pi)
    assert float(narrow.x_val.min()) == pytest.approx(-1.0) and float(narrow.x_val.max()) == pytest.approx(1.0)
    # The same curve whatever the domain: the domain changes only what the network sees as input.
    assert torch.equal(wide.y_train, narrow.y_train) and torch.equal(wide.y_val, narrow.y_val)
    assert float(wide.y_val.std()) > 0.1
    # Normalisation must not undo the domain, which is what the task studies.
    prepared = prepare(wide, {**STRATEGIES["expansion"].defaults()}, normalize=True)
    assert torch.equal(prepared.x_train, wide.x_train)


def test_function_grid_and_random_sampling() -> None:
    grid = load_dataset("fn_smooth", 0.25, 0, DataSpec(points=11))
    assert torch.allclose(grid.x_train[:, 0], torch.linspace(-1, 1, 11), atol=1e-6)
    random_a = load_dataset("fn_smooth", 0.25, 0, DataSpec(sampling="random", points=30))
    random_b = load_dataset("fn_smooth", 0.25, 0, DataSpec(sampling="random", points=30))
    random_c = load_dataset("fn_smooth", 0.25, 1, DataSpec(sampling="random", points=30))
    assert torch.equal(random_a.x_train, random_b.x_train) and not torch.equal(random_a.x_train, random_c.x_train)
    assert bool(torch.all(random_a.x_train.diff(dim=0) >= 0)) and float(random_a.x_train.abs().max()) <= 1.0


def test_function_kinds_are_what_their_names_say() -> None:
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    jumps = {name: float(f(t).diff().abs().max()) for name, (f, _) in FUNCTIONS.items()}
    assert jumps["fn_step"] > 0.9 and max(jumps["fn_smooth"], jumps["fn_abs"]) < 0.01  # only the step jumps
    slopes = {name: f(t).diff() / t.diff() for name, (f, _) in FUNCTIONS.items()}
    kink = slopes["fn_abs"][999:1001]
    assert float(kink[0]) == pytest.approx(-4) and float(kink[1]) == pytest.approx(4)  # a kink, no derivative
    assert float(slopes["fn_highfreq"].abs().max()) > 5 * float(slopes["fn_smooth"].abs().max())


def test_images_resize_to_the_asked_size() -> None:
    split = load_dataset("digits", 0.25, 0, DataSpec(image_size=16))
    assert split.x_train.shape[1:] == (1, 16, 16) and 0 <= float(split.x_train.min()) <= float(split.x_train.max()) <= 1
    fake = load_dataset("fakedata", 0.25, 0, DataSpec(image_size=12, fake_samples=20, fake_classes=3))
    assert fake.x_train.shape[1:] == (3, 12, 12) and fake.num_outputs == 3


def write_image_folder(root: Path, classes: int = 2, per_class: int = 6, size: tuple[int, int] = (20, 14)) -> None:
    """``classes`` folders ``class<c>`` of ``per_class`` random PNGs ``<i>.png`` of ``size`` (width, height)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_imagefolder_loads_from_root(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "images")
    split = load_dataset("imagefolder", 0.5, 0, DataSpec(root=str(tmp_path / "images"), image_size=8,
                                                            test_fraction=0.0))
    assert split.x_train.shape == (6, 3, 8, 8) and split.x_val.shape == (6, 3, 8, 8) and split.num_outputs == 2
    assert DATASETS["imagefolder"].missing(DataSpec(root=str(tmp_path / "images"))) is None  # type: ignore[misc]
    assert "no images" in str(DATASETS["imagefolder"].missing(DataSpec(root=str(tmp_path))))  # type: ignore[misc]
    (tmp_path / "empty").mkdir()
    assert "no class sub-folders" in str(DATASETS["imagefolder"].missing(DataSpec(root=str(tmp_path / "empty"))))  # type: ignore[misc]


def write_dtd_copy(root: Path, per_class: int, parts: dict[str, list[str]]) -> None:
    """A local copy of DTD under ``root`` (as torchvision finds it): two classes of ``per_class`` images and
    partition 1's lists, ``parts`` by split (train, val, test) naming ``class<c>/<i>.png`` files."""
    data = root / "dtd" / "dtd"
    write_image_folder(data / "images", classes=2, per_class=per_class)
    (data / "labels").mkdir()
    for split, files in parts.items():
        (data / "labels" / f"{split}1.txt").write_text("".join(f + "\n" for f in files))


def test_dtd_loads_train_and_val_from_a_local_copy(tmp_path: Path) -> None:
    write_dtd_copy(tmp_path, 6, {"train": ["class0/0.png", "class0/1.png", "class1/0.png", "class1/1.png"],
                                 "val": ["class0/2.png", "class0/3.png", "class1/2.png", "class1/3.png"],
                                 "test": ["class0/4.png", "class0/5.png", "class1/4.png", "class1/5.png", "class1/3.png"]})
    split = load_dataset("dtd", 0.5, 0, DataSpec(root=str(tmp_path), image_size=8))
    assert split.x_train.shape == (4, 3, 8, 8) and split.num_outputs == 2
    # The official test split, not a share of train and val: its own five images.
    assert split.x_test is not None and split.y_test is not None and split.x_test.shape == (5, 3, 8, 8)
    assert split.y_test.tolist() == [0, 0, 1, 1, 1]


def test_a_data_set_that_needs_a_root_gets_one_spec_line_naming_data_root(tmp_path: Path) -> None:
    cases = [
        ({"dataset": "cifar10"}, "must name the folder"),
        ({"dataset": "cifar10", "root": str(tmp_path / "nowhere")}, "must be an existing folder"),
        ({"dataset": "cifar100", "root": str(tmp_path)}, "cifar-100-python is missing"),
        ({"dataset": "dtd", "root": str(tmp_path)}, "set data.download: true"),
        ({"dataset": "imagefolder", "root": str(tmp_path)}, "no class sub-folders"),
    ]
    for data, words in cases:
        with pytest.raises(SpecError) as info:
            parse_spec({"data": data})
        assert [p.path for p in info.value.problems] == ["data.root"] and words in str(info.value)
    # With download asked for, a missing folder is where the files will go.
    spec = parse_spec({"data": {"dataset": "cifar10", "root": "relative/dir", "download": True}})
    assert spec.data.root == str(Path("relative/dir").resolve())


def test_cli_validate_reports_missing_data_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"data:\n  dataset: fgvc_aircraft\n  root: {tmp_path}\n", encoding="utf-8")
    assert main(["validate", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.root" in err[0] and "fgvc-aircraft-2013b is missing" in err[0]


# --- expansion properties ----------------------------------------------------------------------

fills = st.floats(min_value=-10, max_value=10, allow_nan=False, width=32)


def _vector_positions(f: int, k: int, layout: str, offset: str) -> torch.Tensor:
    """Where feature i must land, as the expansion's docstring states it."""
    extra = f * (k - 1)
    if layout == "border":
        return torch.arange(f) + extra // 2
    if layout == "before":
        return torch.arange(f) + extra
    if layout == "after":
        return torch.arange(f)
    assert layout == "grid"
    return torch.arange(f) * k + (0 if offset == "start" else k // 2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3), f=st.integers(1, 6), k=st.integers(1, 6), fill=fills,
       layout=st.sampled_from([v for v in VECTOR_LAYOUTS if v != "upsample"]), offset=st.sampled_from(["start", "center"]),
       seed=st.integers(0, 2**16))
def test_expand_vector_keeps_every_feature_in_place_and_fills_the_rest(n: int, f: int, k: int, fill: float, layout: str,
                                                                       offset: str, seed: int) -> None:
    x = torch.randn(n, f, generator=torch.Generator().manual_seed(seed))
    out = expand_vector(x, k, fill, layout, offset)
    assert out.shape == (n, f * k)
    if k == 1:
        assert torch.equal(out, x)
        return
    places = _vector_positions(f, k, layout, offset)
    assert torch.equal(out[:, places], x)
    rest = torch.ones(f * k, dtype=torch.bool)
    rest[places] = False
    assert bool(torch.all(out[:, rest] == torch.tensor(fill, dtype=torch.float32)))


def test_the_border_vector_of_the_study() -> None:
    out = expand_vector(torch.tensor([[0.25]]), 5, math.pi, "border")
    assert out.tolist() == [[pytest.approx(math.pi), pytest.approx(math.pi), 0.25, pytest.approx(math.pi),
                             pytest.approx(math.pi)]]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), k=st.integers(1, 4),
       fill=fills, layout=st.sampled_from(["grid", "border"]), offset=st.sampled_from(["start", "center"]),
       seed=st.integers(0, 2**16))
def test_expand_image_keeps_every_pixel_in_place_and_fills_the_rest(n: int, c: int, h: int, w: int, k: int, fill: float,
                                                                    layout: str, offset: str, seed: int) -> None:
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    out = expand_image(x, k, fill, layout, offset)
    assert out.shape == (n, c, h * k, w * k)
    if k == 1:
        assert torch.equal(out, x)
        return
    if layout == "grid":
        o = 0 if offset == "start" else k // 2
        rows, cols = torch.arange(h) * k + o, torch.arange(w) * k + o
    else:
        rows, cols = torch.arange(h) + (h * k - h) // 2, torch.arange(w) + (w * k - w) // 2
    assert torch.equal(out[:, :, rows][:, :, :, cols], x)
    rest = torch.ones(h * k, w * k, dtype=torch.bool)
    rest[rows.unsqueeze(1), cols.unsqueeze(0)] = False
    assert bool(torch.all(out[:, :, rest] == torch.tensor(fill, dtype=torch.float32)))


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 5), k=st.integers(1, 4), f=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_upsample_adds_no_constant(h: int, k: int, f: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(2, 3, h, h + 1, generator=gen)
    up = expand_image(image, k, 123.0, "upsample")
    rows, cols = torch.arange(h * k) // k, torch.arange((h + 1) * k) // k
    assert torch.equal(up, image[:, :, rows][:, :, :, cols])  # every position holds its source pixel
    vector = torch.randn(2, f, generator=gen)
    assert torch.equal(expand_vector(vector, k, 123.0, "upsample"), vector[:, torch.arange(f * k) // k])


@pytest.mark.parametrize("layout", next(k for k in STRATEGIES["expansion"].knobs if k.name == "layout").choices)
def test_every_layout_choice_expands_images_or_is_refused_for_them_and_expands_vectors(layout: str) -> None:
    expansion = STRATEGIES["expansion"]
    settings = {**expansion.defaults(), "factor": 2, "layout": layout, "fill_space": "normalized"}
    refusal = expansion.incompatible(settings, "small_cnn", "image")
    if refusal is None:  # accepted for images: it must expand one
        assert expand(torch.randn(2, 1, 3, 3), settings).shape == (2, 1, 6, 6)
    else:  # refused in one line, and only because images really have no such layout
        assert repr(layout) in refusal and "\n" not in refusal
        with pytest.raises(AssertionError, match="unknown image layout"):
            expand(torch.randn(2, 1, 3, 3), settings)
    assert expansion.incompatible(settings, "mlp", "vector") is None
    assert expand(torch.randn(2, 3), settings).shape == (2, 6)
