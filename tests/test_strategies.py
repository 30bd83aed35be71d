"""Every strategy's knobs, as help text and error messages spell their values: the way a spec writes them."""

from __future__ import annotations

import re

import pytest

from sbsearch.cli import main
from sbsearch.errors import SpecError
from sbsearch.spec import parse_spec
from sbsearch.strategies import STRATEGIES
from tests.conftest import tiny_spec_dict

_PYTHON_WORDS = re.compile(r"\b(True|False|None)\b")


def test_defaults_and_allowed_values_are_spelled_as_yaml() -> None:
    for strategy in STRATEGIES.values():
        for knob in strategy.knobs:
            for words in (knob.default_words(), knob.rule()):
                assert not _PYTHON_WORDS.search(words), f"{strategy.name}.{knob.name}: {words}"
    width_matched = STRATEGIES["controls"].knob_by_name["width_matched"]
    assert width_matched.default_words() == "false"


def test_the_strategies_command_shows_yaml_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "controls.width_matched" in line)
    assert re.search(r"│ bool +│ false +│ true or false +│", row), row


def test_a_wrong_value_is_told_the_rule_the_table_shows() -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(tiny_spec_dict(space__controls__width_matched="yes", space__norm__kind="batchnorm"))
    text = str(caught.value)
    assert "space.controls.width_matched: must be true or false" in text
    assert "space.norm.kind: must be one of 'none', 'batch', 'group', 'layer'" in text


def test_input_steps_run_by_stage_symmetry_first_and_controls_can_drop_the_expansion() -> None:
    from sbsearch.strategies import input_transforms
    from tests.conftest import strategy_settings

    def stages(**knobs: object) -> list[str]:
        return [step.stage for step in input_transforms(strategy_settings(**knobs), "image")]

    # Registry order puts the expansion first; the stage puts the augmentation before it.
    assert stages(expansion__factor=2, equivariance__how="augment") == ["symmetry", "raw"]
    assert stages(expansion__factor=2, expansion__fill_space="normalized", equivariance__how="augment") == [
        "symmetry", "normalized"]
    assert stages(expansion__factor=2, controls__width_matched=True) == []  # the control stands in for it
    assert stages() == []


def test_a_trial_defers_its_training_inputs_only_for_hooks_that_need_the_image() -> None:
    from sbsearch.strategies import defers_training_inputs
    from tests.conftest import strategy_settings

    assert defers_training_inputs(strategy_settings(equivariance__how="augment"), "image")
    assert defers_training_inputs(strategy_settings(equivariance__how="penalty"), "image")
    assert not defers_training_inputs(strategy_settings(equivariance__how="penalty", equivariance__penalty_weight=0.0),
                                      "image")
    assert not defers_training_inputs(strategy_settings(syre__gamma=0.1, expansion__factor=2), "image")
