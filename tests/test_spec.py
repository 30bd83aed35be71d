"""Spec validation: every kind of mistake is one line naming the key, the rule and the value."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sbsearch.data import DATASETS, DataSpec
from sbsearch.errors import SpecError
from sbsearch.spec import (MAX_SPEC_BYTES, check_sweep, load_spec, parse_spec, read_spec_yaml, spec_reference,
                           spec_to_dict, with_overrides)
from tests.conftest import ROOT, tiny_spec_dict


def problems(raw: Any) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    return [str(p) for p in info.value.problems]


def test_defaults_fill_every_key() -> None:
    spec = parse_spec({})
    resolved = spec_to_dict(spec)
    assert resolved["data"]["dataset"] == "digits"
    assert resolved["space"]["expansion"]["factor"] == 1
    assert parse_spec(resolved) == spec  # the resolved spec parses back to the same spec


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"nmae": "x"}, "nmae: is not a known section, but got 'x' (did you mean 'name'?)"),
        ({"data": {"datset": "digits"}}, "data.datset: is not a known key, but got 'digits' (did you mean 'dataset'?)"),
        ({"data": {"dataset": "digit"}}, "data.dataset: must be a registered name, but got 'digit' (did you mean 'digits'?)"),
        ({"model": {"name": "resnet"}}, "model.name: must be a registered name, but got 'resnet'"),
        ({"train": {"epochs": "ten"}}, "train.epochs: must be an integer, but got 'ten'"),
        ({"train": {"epochs": 0}}, "train.epochs: must be >= 1, but got 0"),
        ({"train": {"lr": -1}}, "train.lr: must be > 0, but got -1.0"),
        ({"train": {"lr": float("nan")}}, "train.lr: must be a finite number, but got nan"),
        ({"search": {"sampler": "tpee"}}, "search.sampler: must be a registered name, but got 'tpee' (did you mean 'tpe'?)"),
        ({"search": {"trials": True}}, "search.trials: must be an integer, but got True"),
        ({"space": {"expansoin": {}}}, "space.expansoin: is not a registered strategy, but got {} (did you mean 'expansion'?)"),
        ({"space": {"expansion": {"factr": 2}}}, "space.expansion.factr: is not a knob of this strategy, but got 2 (did you mean 'factor'?)"),
        ({"space": {"expansion": {"factor": 0}}}, "space.expansion.factor: must be an integer in [1, 8], but got 0"),
        ({"space": {"expansion": {"factor": [1, 0]}}}, "space.expansion.factor[1]: must be an integer in [1, 8], but got 0"),
        ({"space": {"expansion": {"fill": float("inf")}}}, "space.expansion.fill: must be a finite number, but got inf"),
        ({"space": {"expansion": {"fill": []}}}, "space.expansion.fill: must list at least one value, but got []"),
        ({"space": {"expansion": {"fill": [0.5, 0.5]}}}, "space.expansion.fill: must not repeat a value, but got [0.5, 0.5]"),
        ({"space": {"dropout": {"rate": 1.0}}}, "space.dropout.rate: must be a finite number in [0, 1), but got 1.0"),
        ({"space": {"dropout": {"rate": {"low": 0.3, "high": 0.1}}}}, "space.dropout.rate.high: must be greater than low=0.3, but got 0.1"),
        ({"space": {"dropout": {"rate": {"low": 0.0, "hi": 0.1}}}}, "space.dropout.rate.hi: is not a known key, but got 0.1 (did you mean 'high'?)"),
        ({"space": {"norm": {"kind": ["batch", "btch"]}}}, "space.norm.kind[1]: must be one of 'none', 'batch', 'group', 'layer', but got 'btch' (did you mean 'batch'?)"),
        ({"space": {"norm": {"kind": {"low": 0, "high": 1}}}}, "space.norm.kind: a range {low, high} needs a numeric knob; give a list of choices"),
        ({"space": "expansion"}, "space: must be a mapping of strategy names to knobs, but got 'expansion'"),
        ({"data": ["digits"]}, "data: must be a mapping of keys to values, but got ['digits']"),
        ({"name": "my sweep/1"}, "name: must be 1-100 letters, digits"),
        (["name"], "<spec>: a spec must be a mapping"),
    ],
)
def test_each_mistake_is_one_clear_line(raw: Any, expected: str) -> None:
    found = problems(raw)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"data": {"batch_size": 0}, "train": {"epochs": -1}, "space": {"expansion": {"factor": 9}}})
    assert [p.split(":")[0] for p in found] == ["data.batch_size", "train.epochs", "space.expansion.factor"]


def test_incompatible_combinations_are_caught_before_running() -> None:
    found = problems({"model": {"name": "mlp"}, "space": {"dropout": {"kind": "channel", "rate": 0.1}}})
    assert found == ["space.dropout.kind: channel dropout needs feature maps; the mlp has none (use kind: element), but got 'channel'"]
    found = problems({"space": {"expansion": {"layout": "before"}}})
    assert found[0].startswith("space.expansion.layout: layout 'before' is for vector inputs")
    found = problems({"search": {"sampler": "grid"}, "space": {"dropout": {"rate": {"low": 0.0, "high": 0.2}}}})
    assert found[0].startswith("space.dropout.rate: the grid sampler needs a list of values or a range with a step")


def test_space_size_and_kinds() -> None:
    spec = parse_spec(tiny_spec_dict())
    assert spec.space_size() == 8
    assert [p.name for p in spec.searched] == ["expansion.factor", "expansion.fill", "norm.kind"]
    spec = parse_spec({"space": {"dropout": {"rate": {"low": 0.0, "high": 0.5, "step": 0.1}}, "expansion": {"factor": {"low": 1, "high": 3}}}})
    assert spec.param("dropout.rate").size() == 6
    assert spec.param("expansion.factor").size() == 3
    assert math.isinf(parse_spec({"space": {"dropout": {"rate": {"low": 0.0, "high": 0.5}}}}).space_size())


def test_integers_are_accepted_for_float_knobs() -> None:
    spec = parse_spec({"space": {"expansion": {"fill": [0, 1]}}})
    assert spec.param("expansion.fill").values == (0.0, 1.0)


def test_overrides_are_validated() -> None:
    spec = parse_spec(tiny_spec_dict())
    assert with_overrides(spec, {"search.trials": 7, "seed": 3}).search.trials == 7
    with pytest.raises(SpecError, match="search.trials: must be >= 1, but got 0"):
        with_overrides(spec, {"search.trials": 0})


def test_yaml_errors_name_the_file_and_place(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nspace: [unclosed\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(bad)
    assert str(info.value).startswith("spec: must be valid YAML (")
    with pytest.raises(SpecError, match="spec: must be an existing file"):
        load_spec(tmp_path / "missing.yaml")


def test_yaml_tags_that_would_run_code_are_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo pwned']\n", encoding="utf-8")
    with pytest.raises(SpecError, match="must be valid YAML"):
        load_spec(evil)


def test_shipped_specs_are_valid() -> None:
    paths = sorted((ROOT / "search_spaces").glob("*.yaml"))
    assert len(paths) >= 5
    for path in paths:
        try:
            check_sweep(load_spec(path))
        except SpecError as exc:  # a spec for data that is not on this machine may only lack the data
            assert all(p.path == "data.root" for p in exc.problems), f"{path.name}: {exc}"
            # ... and every other key holds on stand-in images of the same shape (a missing root can
            # hide nothing: the checks after it ran, and they run again here on data that exists).
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            data = {k: v for k, v in raw["data"].items() if k not in ("root", "download", "dataset")}
            shape = DATASETS[raw["data"]["dataset"]].image_shape(DataSpec(image_size=data.get("image_size")))
            assert shape is not None, path.name
            raw["data"] = {**data, "dataset": "fakedata", "image_size": shape[-1], "fake_samples": 64}
            check_sweep(parse_spec(raw))


def test_reference_covers_every_key_and_readme_lists_it() -> None:
    keys = [row[0] for row in spec_reference()]
    assert "data.dataset" in keys and "space.expansion.factor" in keys and "search.trials" in keys
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"README's spec reference lacks {missing}; regenerate it with `python -m sbsearch.docs`"


def test_resolved_spec_round_trips_through_yaml() -> None:
    spec = parse_spec(tiny_spec_dict())
    assert parse_spec(yaml.safe_load(yaml.safe_dump(spec_to_dict(spec)))) == spec


def test_vectors_default_to_the_centred_expansion_and_images_keep_theirs() -> None:
    import torch

    from sbsearch.strategies import expand

    vector = parse_spec({"data": {"dataset": "fn_smooth"}, "model": {"name": "mlp"}, "space": {"expansion": {"factor": 5}}})
    image = parse_spec({"space": {"expansion": {"factor": 2}}})
    settings = {p.knob: p.values[0] for p in vector.space if p.strategy == "expansion"}
    assert (settings["layout"], settings["offset"], settings["fill_space"]) == ("grid", "center", "normalized")
    c = float(settings["fill"])
    assert expand(torch.tensor([[7.0]]), settings).tolist() == [[c, c, 7.0, c, c]]  # the 1-D study's [c, c, x, c, c]
    assert (image.param("expansion.offset").values[0], image.param("expansion.fill_space").values[0]) == ("start", "raw")


def test_raw_fill_space_is_refused_for_normalised_vector_data() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"data": {"dataset": "wine"}, "model": {"name": "mlp"},
                    "space": {"expansion": {"factor": 2, "fill_space": "raw"}}})
    assert [str(p) for p in err.value.problems] == [
        "space.expansion.fill_space: raw places the constant in raw input units, which normalised vector data does not "
        "have (each feature is standardised on its own); use normalized, or data.normalize: false, but got 'raw'"]
    parse_spec({"data": {"dataset": "wine", "normalize": False}, "model": {"name": "mlp"},
                "space": {"expansion": {"factor": 2, "fill_space": "raw"}}})


def test_val_and_test_fractions_must_leave_training_data() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({"data": {"val_fraction": 0.5, "test_fraction": 0.5}})
    assert str(err.value.problems[0]).startswith("data.test_fraction: must leave training data")
    parse_spec({"data": {"dataset": "fn_smooth", "val_fraction": 0.5, "test_fraction": 0.5}, "model": {"name": "mlp"}})


def test_validate_notes_an_expansion_that_breaks_the_invariance_of_all_group_layers(capsys: pytest.CaptureFixture[str],
                                                                                    tmp_path: Any) -> None:
    import yaml

    from sbsearch.cli import main

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"space": {"expansion": {"factor": [1, 2]}, "equivariance": {"how": "layers"}}}))
    assert main(["validate", str(path)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: space.equivariance.where: all makes the logits invariant to rotating the expanded input, "
                     "not the original image, when grid layout with factor 2 puts each pixel at the first position of "
                     "its 2x2 cell, which a rotation moves to another position (only offset: center with an odd factor "
                     "keeps it) (the constants then break the symmetry the layers build)"]
    path.write_text(yaml.safe_dump({"space": {"expansion": {"factor": [1, 3], "offset": "center"},
                                              "equivariance": {"how": "layers"}}}))
    assert main(["validate", str(path)]) == 0
    assert "note:" not in capsys.readouterr().err


def test_schedule_is_fixed_with_optuna_free_with_ray_and_lag_needs_the_fixed_one() -> None:
    spec = parse_spec(tiny_spec_dict(search__parallel=3))
    assert spec.search.fixed_schedule and spec.search.schedule_lag == 3
    assert parse_spec(tiny_spec_dict(search__parallel=3, search__lag=1)).search.schedule_lag == 1
    assert not parse_spec(tiny_spec_dict(search__schedule="free")).search.fixed_schedule
    assert not parse_spec(tiny_spec_dict(search__backend="ray")).search.fixed_schedule
    assert problems(tiny_spec_dict(search__backend="ray", search__schedule="fixed")) == [
        ("search.schedule: needs search.backend: optuna; Ray Tune starts each trial as a slot frees up, so the ray "
         "backend runs free (leave it null or set free), but got 'fixed'")]
    assert problems(tiny_spec_dict(search__schedule="free", search__lag=2)) == [
        "search.lag: applies to the fixed schedule only (search.schedule: fixed, the optuna backend), but got 2"]
    assert problems(tiny_spec_dict(search__schedule="fixd", search__lag=0)) == [
        "search.schedule: must be fixed, free or null, but got 'fixd'", "search.lag: must be >= 1, but got 0"]


# --- hostile input: every answer is one short line -------------------------------------------------

def _bomb(levels: int, width: int = 9) -> str:
    """YAML whose last alias expands to width**levels strings (the "billion laughs")."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


HOSTILE = {
    "long_value": ("name: " + "a" * 900_000 + "\n",
                   "error: name: must be 1-100 letters, digits, '_', '.', '-', starting with a letter or digit, but got "
                   "'aaaa", "…' (900000 characters)"),
    "long_key": ("data:\n  ? " + "k" * 900_000 + "\n  : 1\n", "error: data.kkkk", "… (900005 characters): is not a "
                 "known key, but got 1 (allowed: "),
    "over_the_limit": ("[" * (MAX_SPEC_BYTES + 1),  # would be a YAML error, were it parsed
                       "error: spec: must be at most 1000000 bytes (1 MB; real specs are a few kB), but got '",
                       "' (1000001 bytes)"),
    "alias_bomb": (_bomb(9), "error: a4[1]: must not expand the spec past 20000 values (scalars, lists and mappings, "
                   "each YAML alias counted in full; a guard against alias bombs), but got '*a3' (line 5, column 15, "
                   "where the count reaches 23071)", ""),
    "alias_inside_its_node": ("space: &s {expansion: *s}\n", "error: space.expansion: must not be a YAML alias to a "
                              "list or mapping that holds it, but got '*s' (line 1, column 23)", ""),
    "deep_nesting": ("space: " + "[" * 5000 + "]" * 5000 + "\n", "error: space" + "[0]" * 19 + ": must nest lists and "
                     "mappings at most 20 deep, but got 21 (line 1, column 27)", ""),
    "many_values": ("space: [" + ", ".join(["0"] * 25_000) + "]\n", "error: <spec>: must hold at most 20000 values "
                    "(scalars, lists and mappings, each YAML alias counted in full), but got 20001 (counting stopped "
                    "at space[19997], line 1, column 60000)", ""),
    "repeated_top_key": ("name: x\nseed: 1\nname: y\n", "error: name: must appear only once in its mapping (YAML "
                         "would keep the last value without a word), but got 'name' (at line 1 and again at line 3)", ""),
    "repeated_nested_key": ("space:\n  expansion:\n    factor: [1, 2]\n    fill: 0.5\n    'factor': 3\n",
                            "error: space.expansion.factor: must appear only once in its mapping (YAML would keep the "
                            "last value without a word), but got 'factor' (at line 3 and again at line 5)", ""),
    "long_integer": ("seed: " + "1" * 5000 + "\n", "error: spec: must be valid YAML (cannot read this int: 5000 "
                     "characters are too many to read at line 1, column 7), but got '", ""),
    "impossible_date": ("name: 2024-02-30\n", "error: spec: must be valid YAML (cannot read this timestamp: day is "
                        "out of range for month at line 1, column 7), but got '", ""),
    "integer_past_float": ("train:\n  lr: 1" + "0" * 400 + "\n", "error: train.lr: must be a finite number, but got "
                           "1000", "… (401 characters)"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_spec_files_give_one_short_line_and_exit_2(case: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from sbsearch.cli import main

    text, start, end = HOSTILE[case]
    path = tmp_path / "spec.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("\n"), err[:2000]
    line = err[:-1]
    assert len(line) < 1000 and line.startswith(start) and end in line, line


def test_no_more_of_a_file_is_read_than_the_limit() -> None:
    with pytest.raises(SpecError) as info:  # endless: reading it all would never finish
        load_spec("/dev/zero")
    assert str(info.value) == ("spec: must be at most 1000000 bytes (1 MB; real specs are a few kB), but got "
                               "'/dev/zero' (more than 1000000 bytes)")


def test_yaml_text_is_read_within_the_same_bounds_as_a_file() -> None:
    with pytest.raises(SpecError) as info:
        read_spec_yaml("name: " + "é" * MAX_SPEC_BYTES)  # half as many characters as bytes
    assert str(info.value) == ("spec: must be at most 1000000 bytes (1 MB; real specs are a few kB), but got '<text>' "
                               "(2000006 bytes)")
    with pytest.raises(SpecError, match=r"^a4\[1\]: must not expand the spec past 20000 values"):
        read_spec_yaml(_bomb(9))
    assert read_spec_yaml(_bomb(3))["a2"][8][8] == ["lol"] * 9  # 9 * 9 * 9 laughs are within bounds


def test_values_and_keys_of_any_size_are_echoed_as_an_excerpt() -> None:
    nested: list[Any] = [0]
    for _ in range(5000):
        nested = [nested]
    itself: list[Any] = []
    itself.append(itself)
    for raw, start, end in [
        ({"name": "a" * 10_000_000}, "name: must be 1-100 letters", "…' (10000000 characters)"),
        ({"data": {"k" * 1_000_000: 1}}, "data.kkk", "… (1000005 characters): is not a known key, but got 1"),
        ({"name": nested}, "name: must be a string, but got [[[[", "… (1 item)"),
        ({"name": itself}, "name: must be a string, but got [[[[", "… (1 item)"),
    ]:
        found = problems(raw)
        assert len(found) == 1 and "\n" not in found[0] and len(found[0]) < 1000, found[0][:2000]
        assert found[0].startswith(start) and end in found[0], found[0]
    assert problems({"train": {"epochs": -10 ** 5000}}) == ["train.epochs: must be >= 1, but got <an integer of about "
                                                           "5001 digits>"]


def test_an_ordinary_spec_with_anchors_and_merges_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text("""\
name: anchored
train: &train {epochs: 2, lr: 0.01}
space:
  expansion:
    factor: &factors [1, 2]
    fill: [0.0, 0.5]
  controls: {bias_scale: &one 1.0}
  norm: &norm {kind: [none, batch]}
search:
  <<: {sampler: random, trials: 3}
  trials: 4  # a merged key may be given again: that is what a merge is for
""", encoding="utf-8")
    spec = load_spec(path)
    assert (spec.train.epochs, spec.search.trials, spec.search.sampler) == (2, 4, "random")
    assert [p.name for p in spec.searched] == ["expansion.factor", "expansion.fill", "norm.kind"]
    data = read_spec_yaml("base: &b {a: [1, 2]}\nuse: {<<: *b, c: *b}\nagain: [*b, *b]\n")
    assert data["use"] == {"a": [1, 2], "c": {"a": [1, 2]}} and data["again"] == [{"a": [1, 2]}] * 2


# --- a spec that searches nothing -------------------------------------------------------------------

def test_a_spec_that_searches_nothing_is_refused_unless_it_asks_for_it() -> None:
    rule = ("search.trials: must be 1 when the space searches nothing (no knob lists values or a range), as every "
            "trial would train the same configuration; list values or a range for a knob under space, or set "
            "search.repeat: true to repeat it on purpose, but got ")
    for raw in ({}, {"space": {"expansion": {"factor": 2}, "norm": {"kind": ["batch"]}}}):
        with pytest.raises(SpecError) as info:
            check_sweep(parse_spec(raw))
        assert [str(p) for p in info.value.problems] == [rule + "20"]
    with pytest.raises(SpecError, match="^" + re.escape(rule + "5") + "$"):
        check_sweep(parse_spec({"search": {"trials": 5, "sampler": "grid"}}))
    check_sweep(parse_spec({"search": {"trials": 1}}))  # one run of one configuration, on purpose
    check_sweep(parse_spec({"search": {"repeat": True}}))  # twenty of them, on purpose
    check_sweep(with_overrides(parse_spec({}), {"search.trials": 1}))  # what --trials 1 does
    check_sweep(parse_spec(tiny_spec_dict()))
    assert problems(tiny_spec_dict(search__repeat=True)) == [
        "search.repeat: applies to a space that searches no knob (this one searches expansion.factor, expansion.fill, "
        "norm.kind), but got True"]
    assert problems({"search": {"repeat": True, "sampler": "grid"}}) == [
        "search.repeat: needs a sampler that can repeat a configuration (random or tpe); the grid sampler runs each "
        "one once, but got True"]


# --- what a model cannot take: one line per problem, before anything runs ------------------------


@pytest.mark.parametrize("changes, path", [
    ({"model__name": "resnet18", "space": {"controls": {"width_matched": True}}}, "space.controls.width_matched"),
    ({"model__name": "densenet121", "space": {"controls": {"bias_lr_multiplier": 2.0}}},
     "space.controls.bias_lr_multiplier"),
    ({"space": {"norm": {"kind": ["none", "batch"]}, "controls": {"bias_lr_multiplier": "auto"}}},
     "space.controls.bias_lr_multiplier"),
    ({"model__name": "densenet121", "space": {"equivariance": {"how": "layers"}}}, "space.equivariance.how"),
    ({"model__name": "mlp", "space": {"dropout": {"rate": 0.2, "kind": "channel"}}}, "space.dropout.kind"),
    ({"model__name": "resnet18", "space": {"dropout": {"rate": 0.2}}}, "space.dropout.rate"),  # where: all
    ({"model__cifar_stem": True}, "model.cifar_stem"),
    ({"train__optimizer": "lbfgs", "space": {"equivariance": {"how": "augment"}}}, "space.equivariance.how"),
    ({"space": {"controls": {"bias_lr_multiplier": {"low": "auto", "high": 3.0}}}},
     "space.controls.bias_lr_multiplier.low"),
    ({"space": {"controls": {"bias_lr_multiplier": 0.0}}}, "space.controls.bias_lr_multiplier"),
])
def test_validation_says_what_cannot_apply_in_one_line(changes: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(**changes))
    lines = str(caught.value).strip().splitlines()
    assert any(line.strip().startswith(f"{path}:") and "but got" in line for line in lines), lines


def test_an_image_too_small_for_the_network_is_caught_before_running() -> None:
    # DenseNet pools an 8x8 digit to nothing; validation runs the network on shapes alone to find out.
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(model__name="densenet121"))
    assert ("model.name: densenet121 needs images of at least 29x29, and data set 'digits' gives 8x8: "
            "set data.image_size, or model.cifar_stem: true, but got 'densenet121'") in str(caught.value).splitlines()
    # Expanded but strided back by the stem, the first feature map is as small as the digit's own.
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(model__name="densenet121",
                                  space={"expansion": {"factor": [2, 3], "stem": "stride"}}))
    [line] = str(caught.value).strip().splitlines()
    assert line.startswith("space.expansion.factor: densenet121 at expansion.factor 2 (stem stride) needs images "
                           "of at least"), line


@pytest.mark.parametrize("changes", [
    {"model__name": "resnet18", "model__cifar_stem": True, "space": {"equivariance": {"how": "augment"}}},
    {"model__name": "densenet121", "data__image_size": 32, "space": {"dropout": {"rate": 0.2, "where": "all"}}},
    {"model__name": "densenet121", "model__cifar_stem": True, "space": {"expansion": {"factor": [1, 3]}}},
    {"space": {"controls": {"bias_lr_multiplier": [1.0, "auto"], "width_matched": [False, True]}}},
    {"model__name": "mlp", "space": {"asymmetry": {"fraction": {"low": 0.0, "high": 0.5}}}},
])
def test_validation_accepts_what_applies(changes: dict[str, Any]) -> None:
    parse_spec(tiny_spec_dict(**changes))


def test_spec_names_cannot_escape_the_output_folder() -> None:
    for name in ("..", "../x", "/etc", "a/b", ".hidden"):
        with pytest.raises(SpecError, match="^name: must be 1-100 letters"):
            parse_spec({"name": name})
