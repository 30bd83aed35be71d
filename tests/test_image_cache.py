"""Folder and torchvision image sets are decoded once: later loads read a uint8 cache file (``data.cache``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sbsearch.data
from sbsearch.data import DataSpec, Split, load_dataset
from sbsearch.errors import SpecError
from sbsearch.spec import parse_spec
from tests.test_data import write_dtd_copy, write_image_folder


def _write_folder(root: Path, classes: int = 3, per_class: int = 10) -> None:
    write_image_folder(root, classes, per_class, size=(12, 10))


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the loaders decoded images, call by call."""
    calls: list[int] = []
    decode = sbsearch.data._decode_images

    def counted(dataset: Any, size: int) -> Any:
        calls.append(len(dataset))
        return decode(dataset, size)

    monkeypatch.setattr(sbsearch.data, "_decode_images", counted)
    return calls


def _load(root: Path, **options: Any) -> Split:
    return load_dataset("imagefolder", 0.25, 0, DataSpec(root=str(root), image_size=8, **options))


def _same(a: Split, b: Split) -> bool:
    assert a.x_test is not None and b.x_test is not None and a.y_test is not None and b.y_test is not None
    return (torch.equal(a.x_train, b.x_train) and torch.equal(a.x_val, b.x_val) and torch.equal(a.x_test, b.x_test)
            and torch.equal(a.y_train, b.y_train) and torch.equal(a.y_test, b.y_test) and a.num_outputs == b.num_outputs)


def _cache_files(root: Path) -> list[Path]:
    return sorted((root / ".sbsearch-cache").glob("*"))


def test_the_first_load_writes_the_cache_and_the_second_does_not_decode(tmp_path: Path, decodes: list[int]) -> None:
    _write_folder(tmp_path)
    first = _load(tmp_path)
    assert decodes == [30] and [f.suffix for f in _cache_files(tmp_path)] == [".pt"]
    second = _load(tmp_path)
    assert decodes == [30], "the second load decoded again"
    # The cache's own folder is no class, and the images are exactly what decoding gave.
    assert second.num_outputs == 3 and _same(first, second)
    uncached = _load(tmp_path, cache="off")
    assert decodes == [30, 30] and _same(first, uncached)
    stored = torch.load(_cache_files(tmp_path)[0], weights_only=True)
    assert stored["images"].dtype == torch.uint8 and stored["images"].shape == (30, 3, 8, 8)


def test_each_image_size_has_its_own_cache_file(tmp_path: Path, decodes: list[int]) -> None:
    _write_folder(tmp_path)
    _load(tmp_path)
    small = load_dataset("imagefolder", 0.25, 0, DataSpec(root=str(tmp_path), image_size=6))
    assert decodes == [30, 30] and small.x_train.shape[-1] == 6 and len(_cache_files(tmp_path)) == 2


def test_changing_a_file_invalidates_the_cache(tmp_path: Path, decodes: list[int]) -> None:
    from PIL import Image

    _write_folder(tmp_path)
    before = _load(tmp_path)
    changed = tmp_path / "class1" / "3.png"
    Image.fromarray(np.zeros((10, 12, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    after = _load(tmp_path)
    assert decodes == [30, 30] and not _same(before, after)
    assert len(_cache_files(tmp_path)) == 1  # the stale file is gone
    assert _same(after, _load(tmp_path)) and decodes == [30, 30]
    (tmp_path / "class1" / "3.png").unlink()  # a removed file too
    assert _load(tmp_path).x_train.shape[0] + _load(tmp_path).x_val.shape[0] < after.x_train.shape[0] + after.x_val.shape[0]
    assert decodes == [30, 30, 29]


def test_a_truncated_cache_file_is_rebuilt(tmp_path: Path, decodes: list[int]) -> None:
    _write_folder(tmp_path)
    first = _load(tmp_path)
    [cache] = _cache_files(tmp_path)
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    assert _same(first, _load(tmp_path)) and decodes == [30, 30]
    assert _same(first, _load(tmp_path)) and decodes == [30, 30]  # rewritten whole


def test_a_write_that_fails_midway_leaves_no_cache_file(tmp_path: Path, decodes: list[int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Parallel workers must never read half a file: it is written aside and moved into place whole.
    _write_folder(tmp_path)
    save = torch.save
    visible_while_writing: list[list[Path]] = []

    def crash(obj: Any, file: Any) -> None:
        file.write(b"PK half a file")
        file.flush()
        visible_while_writing.append(list((tmp_path / ".sbsearch-cache").glob("*.pt")))
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    first = _load(tmp_path)  # the data set loads all the same
    assert visible_while_writing == [[]], "a reader could have found the half-written file"
    assert _cache_files(tmp_path) == []
    monkeypatch.setattr(torch, "save", save)
    assert _same(first, _load(tmp_path)) and [f.suffix for f in _cache_files(tmp_path)] == [".pt"]


def test_data_cache_names_the_folder_or_turns_the_cache_off(tmp_path: Path, decodes: list[int]) -> None:
    _write_folder(tmp_path / "images")
    _load(tmp_path / "images", cache=str(tmp_path / "elsewhere"))
    _load(tmp_path / "images", cache=str(tmp_path / "elsewhere"))
    assert decodes == [30] and len(list((tmp_path / "elsewhere").glob("*.pt"))) == 1
    _load(tmp_path / "images", cache="off")
    assert decodes == [30, 30] and not (tmp_path / "images" / ".sbsearch-cache").exists()


def test_a_read_only_root_caches_under_the_user_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert sbsearch.data.image_cache_folder(DataSpec(root=str(tmp_path))) == tmp_path / "user-cache" / "sbsearch"
    monkeypatch.undo()
    assert sbsearch.data.image_cache_folder(DataSpec(root=str(tmp_path))) == tmp_path / ".sbsearch-cache"


def test_a_torchvision_set_from_a_local_copy_is_decoded_once(tmp_path: Path, decodes: list[int]) -> None:
    write_dtd_copy(tmp_path, 4, {"train": ["class0/0.png", "class1/0.png"], "val": ["class0/1.png", "class1/1.png"],
                                 "test": ["class0/2.png", "class1/2.png", "class1/3.png"]})
    first = load_dataset("dtd", 0.5, 0, DataSpec(root=str(tmp_path), image_size=8))
    assert decodes == [2, 2, 3]  # train, val, test
    second = load_dataset("dtd", 0.5, 0, DataSpec(root=str(tmp_path), image_size=8))
    assert decodes == [2, 2, 3] and _same(first, second) and second.num_outputs == 2


def test_data_cache_must_be_off_or_an_absolute_folder() -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({"data": {"cache": "relative/folder"}})
    assert [str(p) for p in info.value.problems] == [
        "data.cache: must be 'off' or an absolute folder path (~ allowed), but got 'relative/folder'"]
    assert parse_spec({"data": {"cache": "~/caches"}}).data.cache == "~/caches"
