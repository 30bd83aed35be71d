"""Property-based fuzzing of the spec loader: whatever the input, the answer is a resolved spec or one
line per problem with exit code 2 — never a traceback."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import re
import tempfile
import traceback
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sbsearch.cli import main
from tests.conftest import tiny_spec_dict

TRIED = {"count": 0}
LINE = re.compile(r"^error: .+: .+, but got .+$")

WEIRD = st.one_of(
    st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.just(""), st.just("pi"), st.just("digits"), st.just("../../etc/passwd"),
    st.lists(st.integers(-3, 10), max_size=4), st.lists(st.text(max_size=5), max_size=3), st.just([]),
    st.just({}), st.dictionaries(st.text(max_size=6), st.integers(), max_size=3),
    st.fixed_dictionaries({"low": st.floats(allow_nan=True), "high": st.floats(allow_nan=True)}),
    st.just({"low": 1, "high": 0, "log": True, "step": -1}),
)
PATHS = [
    ("name",), ("seed",), ("data",), ("data", "dataset"), ("data", "val_fraction"), ("data", "batch_size"),
    ("model",), ("model", "name"), ("model", "width"), ("model", "depth"), ("train", "epochs"), ("train", "lr"),
    ("train", "optimizer"), ("train", "replicas"), ("search", "sampler"), ("search", "trials"), ("search", "pruner"),
    ("search", "parallel"), ("search", "timeout"), ("tracking", "uri"), ("space",), ("space", "expansion"),
    ("space", "expansion", "factor"), ("space", "expansion", "fill"), ("space", "expansion", "layout"),
    ("space", "expansion", "stem"), ("space", "dropout", "rate"), ("space", "dropout", "kind"), ("space", "norm", "kind"),
    ("space", "no_such_strategy"), ("space", "expansion", "no_such_knob"), ("no_such_section",), ("data", "no_such_key"),
]


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def _as_console_script(argv: list[str]) -> tuple[int, str, str]:
    """What ``sbsearch <argv>`` gives a user: (exit code, stdout, stderr).

    The console script is ``sys.exit(main())``, so an exception that escapes ``main`` reaches the
    interpreter, which prints its traceback and exits 1; this prints it the same way, so that the
    traceback is what the checks below see (``main`` itself never prints one).
    """
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own exits print their message, no traceback
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001 - any exception that escapes is what the user would see
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def _check(text: str) -> None:
    TRIED["count"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        code, stdout, stderr = _as_console_script(["validate", str(path)])
    assert "Traceback" not in stderr, f"{text!r} gives a traceback:\n{stderr}"
    lines = stderr.splitlines()
    if code == 0:
        assert not lines and "# search space:" in stdout
    else:
        assert code == 2, (code, stderr)
        assert lines and all(LINE.match(line) for line in lines), lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), WEIRD), min_size=1, max_size=4))
def test_mutated_specs_give_a_spec_or_one_line_errors(mutations: list[tuple[tuple[str, ...], Any]]) -> None:
    raw = copy.deepcopy(tiny_spec_dict())
    for path, value in mutations:
        _set(raw, path, value)
    _check(yaml.safe_dump(raw, allow_unicode=True))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("abcdefg:-[]{}\n #!&*'\"0123456789.,|>%@`\t")), max_size=120))
def test_malformed_yaml_gives_one_line(text: str) -> None:
    _check(text)


@settings(max_examples=100, deadline=None)
@given(value=st.floats(allow_nan=True, allow_infinity=True))
def test_non_finite_numbers_are_refused_everywhere(value: float) -> None:
    raw = tiny_spec_dict(space__expansion__fill=value, train__lr=value)
    TRIED["count"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        code, _, stderr = _as_console_script(["validate", str(path)])
    if math.isfinite(value) and value > 0:
        assert code == 0, stderr
    else:
        assert code == 2 and "error: train.lr:" in stderr, stderr
