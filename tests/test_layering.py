"""The tree shows the architecture: each module imports only the stages before it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sbsearch"

# The data flow of DESIGN.md, with the registries the spec validates against below the spec.
ORDER = [
    "logs", "errors", "strategies", "group_conv", "data", "models", "spec", "space", "metrics", "score", "replicas",
    "trainer", "pruning", "tracking", "trial", "backends", "progress", "sweep", "report", "rank", "cli", "docs",
]
# Heavy or optional frameworks may be imported only by their own module.
ONLY_IN = {"mlflow": {"tracking"}, "optuna": {"backends", "report", "rank"}, "ray": {"backends"}}


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_module_has_a_place_in_the_order() -> None:
    stages = {p.stem if p.parent == PACKAGE else p.parent.name for p in PACKAGE.rglob("*.py")}
    stages -= {"__init__", "__main__"}
    assert stages <= set(ORDER), f"add {sorted(stages - set(ORDER))} to ORDER"


def test_modules_import_only_earlier_stages_and_frameworks_only_where_allowed() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        own = path.stem if path.parent == PACKAGE else path.parent.name
        if own in ("__init__", "__main__"):
            continue
        for module in _imports(path):
            if module.startswith("sbsearch."):
                other = _stage(module)
                if other != own and ORDER.index(other) > ORDER.index(own):
                    problems.append(f"{path.relative_to(PACKAGE)} imports later stage {module}")
            root = module.split(".")[0]
            if root in ONLY_IN and own not in ONLY_IN[root]:
                problems.append(f"{path.relative_to(PACKAGE)} imports {root}")
    assert not problems, "\n".join(problems)


def test_trainer_knows_no_search_or_tracking_framework() -> None:
    imports = _imports(PACKAGE / "trainer.py")
    assert not {m for m in imports if m.split(".")[0] in ("optuna", "ray", "mlflow")}
