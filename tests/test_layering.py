"""The tree shows the architecture: each module imports only the stages before it."""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sbsearch"

# The data flow of DESIGN.md, with the registries the spec validates against below the spec.
ORDER = [
    "logs", "errors", "group_conv", "strategies", "pde", "data", "models", "spec", "space", "metrics", "score",
    "replicas", "trainer", "pruning", "tracking", "trial", "study", "backends", "progress", "sweep",
    "report.load", "report.stats", "report.controls", "report.plots", "report.page", "report",
    "rank", "cli", "docs",
]
# A package is one stage, unless ORDER lists its modules ("report.load"): then each module is its own stage,
# and the package itself (its __init__, what `from sbsearch.report import ...` runs) comes after them.
# Heavy or optional frameworks may be imported only by their own module.
ONLY_IN = {"mlflow": {"tracking"}, "optuna": {"study", "backends", "rank"}, "ray": {"backends"}}


def _stage(parts: Sequence[str]) -> str:
    """The stage of a module given by its parts below ``sbsearch`` (``("report", "load")``)."""
    if len(parts) > 1 and parts[1] != "__init__" and any(s.startswith(parts[0] + ".") for s in ORDER):
        return f"{parts[0]}.{parts[1]}"
    return parts[0] if parts else ""


def _stage_of_file(path: Path) -> str:
    return _stage(path.relative_to(PACKAGE).with_suffix("").parts)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_module_has_a_place_in_the_order() -> None:
    stages = {_stage_of_file(p) for p in PACKAGE.rglob("*.py")}
    stages -= {"__init__", "__main__"}
    assert stages <= set(ORDER), f"add {sorted(stages - set(ORDER))} to ORDER"


def test_modules_import_only_earlier_stages_and_frameworks_only_where_allowed() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        own = _stage_of_file(path)
        if own in ("__init__", "__main__"):
            continue
        for module in _imports(path):
            if module.startswith("sbsearch."):
                other = _stage(module.split(".")[1:])
                if other != own and ORDER.index(other) > ORDER.index(own):
                    problems.append(f"{path.relative_to(PACKAGE)} imports later stage {module}")
            root = module.split(".")[0]
            if root in ONLY_IN and own.split(".")[0] not in ONLY_IN[root]:
                problems.append(f"{path.relative_to(PACKAGE)} imports {root}")
    assert not problems, "\n".join(problems)


def test_trainer_knows_no_search_or_tracking_framework() -> None:
    imports = _imports(PACKAGE / "trainer.py")
    assert not {m for m in imports if m.split(".")[0] in ("optuna", "ray", "mlflow")}
