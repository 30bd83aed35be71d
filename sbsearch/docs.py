"""Regenerate the README's reference sections from the code: ``python -m sbsearch.docs --write README.md``.

The spec reference comes from the spec's field declarations and the strategy registry, the CLI
reference from the argument parser, so the README cannot drift from what the tool accepts.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["spec_reference_markdown", "cli_reference_markdown", "update_readme"]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def spec_reference_markdown() -> str:
    from sbsearch.spec import spec_reference

    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default, meaning in spec_reference():
        lines.append(f"| `{key}` | {kind} | `{_cell(default)}` | {_cell(meaning)} |")
    return "\n".join(lines)


def cli_reference_markdown() -> str:
    import os

    from sbsearch.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the README must not depend on it
    parser = build_parser()
    blocks = ["```text", parser.format_help().rstrip(), "```"]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        blocks += ["", f"`sbsearch {name}`:", "", "```text", p.format_help().rstrip(), "```"]
    return "\n".join(blocks)


def update_readme(path: Path) -> bool:
    """Replace the text between the reference markers; returns True when the file changed."""
    text = path.read_text(encoding="utf-8")
    new = text
    for tag, body in (("spec-reference", spec_reference_markdown()), ("cli-reference", cli_reference_markdown())):
        pattern = re.compile(rf"(<!-- {tag}:start -->\n).*?(<!-- {tag}:end -->)", re.S)
        assert pattern.search(new), f"README lacks the {tag} markers"
        new = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), new)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write":
        print("updated" if update_readme(Path(sys.argv[2])) else "already up to date")
    else:
        print(spec_reference_markdown())
        print()
        print(cli_reference_markdown())
