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
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sbsearch.cli import main
from sbsearch.spec import MAX_SPEC_BYTES, MAX_SPEC_DEPTH, MAX_SPEC_VALUES
from tests.conftest import tiny_spec_dict

TRIED = {"count": 0}
LINE = re.compile(r"^error: .+: .+, but got .+$")
LONGEST_LINE = 1000  # whatever the spec holds, an error line stays short
PLACEHOLDER = "value-put-here-by-the-test"

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


def _check(text: str) -> str:
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
        assert code == 2, (code, stderr[:3000])
        assert lines and all(LINE.match(line) for line in lines), [line[:3000] for line in lines]
        assert all(len(line) < LONGEST_LINE for line in lines), [line[:3000] for line in lines]
    return stderr


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


def _with_yaml_at(path: tuple[str, ...], yaml_text: str) -> str:
    """The tiny spec with ``yaml_text`` (flow style, one line) as the value at ``path``."""
    raw = copy.deepcopy(tiny_spec_dict())
    _set(raw, path, PLACEHOLDER)
    return yaml.safe_dump(raw, width=10**9).replace(PLACEHOLDER, yaml_text)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), size=st.integers(1_000, 1_100_000), char=st.sampled_from(list("a7~é' ")),
       as_key=st.booleans())
@example(path=("name",), size=1_100_000, char="a", as_key=False)  # over the size limit
@example(path=("data", "root"), size=900_000, char="~", as_key=True)  # a key of 900 000 characters
@example(path=("name",), size=900_000, char="é", as_key=False)  # under the limit in characters, over it in bytes
@example(path=("space", "expansion", "fill"), size=900_000, char="7", as_key=False)  # once minutes in the pi pattern
@example(path=("space", "expansion", "fill"), size=900_000, char=" ", as_key=False)
def test_huge_values_and_keys_give_a_spec_or_short_lines(path: tuple[str, ...], size: int, char: str,
                                                         as_key: bool) -> None:
    raw = copy.deepcopy(tiny_spec_dict())
    if as_key:
        _set(raw, (*path, char * size), 1)
    else:
        _set(raw, path, char * size)
    text = yaml.safe_dump(raw, allow_unicode=True, width=10**9)
    stderr = _check(text)
    if len(text.encode("utf-8")) > MAX_SPEC_BYTES:
        assert stderr.startswith(f"error: spec: must be at most {MAX_SPEC_BYTES} bytes"), stderr[:3000]


@settings(max_examples=30, deadline=None)
@given(path=st.sampled_from(PATHS), depth=st.integers(1, 6000), mapping=st.booleans())
@example(path=("space",), depth=5000, mapping=False)
def test_deep_nesting_gives_a_spec_or_one_short_line(path: tuple[str, ...], depth: int, mapping: bool) -> None:
    nested = "{a: " * depth + "1" + "}" * depth if mapping else "[" * depth + "]" * depth
    stderr = _check(_with_yaml_at(path, nested))
    if depth + len(path) > MAX_SPEC_DEPTH:
        assert f"must nest lists and mappings at most {MAX_SPEC_DEPTH} deep, but got {MAX_SPEC_DEPTH + 1}" in stderr, \
            stderr[:3000]


@settings(max_examples=30, deadline=None)
@given(path=st.sampled_from(PATHS), levels=st.integers(1, 12), width=st.integers(1, 12))
@example(path=("space",), levels=9, width=9)  # the billion laughs
def test_aliases_that_expand_past_the_bound_are_refused_in_one_line(path: tuple[str, ...], levels: int,
                                                                     width: int) -> None:
    # [&a0 [x, x, ...], &a1 [*a0, *a0, ...], ...]: the last list expands to width**levels values.
    chain = [f"&a0 [{', '.join(['x'] * width)}]"]
    chain += [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    stderr = _check(_with_yaml_at(path, "[" + ", ".join(chain) + "]"))
    if width ** levels > MAX_SPEC_VALUES:
        assert f"must not expand the spec past {MAX_SPEC_VALUES} values" in stderr, stderr[:3000]


def _key_path(lines: list[str], index: int) -> str:
    """The dotted key path of the block-style ``key:`` line ``lines[index]``."""
    stack: list[tuple[int, str]] = []
    for line in lines[: index + 1]:
        if line.lstrip().startswith("-") or ":" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, line.strip().split(":")[0]))
    return ".".join(key for _, key in stack)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_a_key_given_twice_at_any_level_is_refused_with_both_lines(data: st.DataObject) -> None:
    lines = yaml.safe_dump(tiny_spec_dict(), default_flow_style=False).splitlines()
    keys = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("-")]
    i = data.draw(st.sampled_from(keys))
    stderr = _check("\n".join(lines[: i + 1] + [lines[i]] + lines[i + 1:]) + "\n")
    path = _key_path(lines, i)
    assert stderr == (f"error: {path}: must appear only once in its mapping (YAML would keep the last value without "
                      f"a word), but got '{path.split('.')[-1]}' (at line {i + 1} and again at line {i + 2})\n")
