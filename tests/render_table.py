"""The README's table of renders, computed from examples/: `python -m tests.render_table`.

examples/ is kept identical to fresh renders by tests/test_examples.py, so
the counts are the generated code's own. A test checks that README.md holds
exactly this table.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from scaffold.matrix import RESEARCH_FEATURES
from tests.conftest import ROOT
from tests.regen_examples import EXAMPLES

BEGIN, END = "<!-- render-table:begin -->", "<!-- render-table:end -->"


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def longest_function(paths: list[Path]) -> tuple[int, str]:
    longest = (0, "")
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{path.stem}.{node.name}"))
    return longest


def row(name: str) -> str:
    project = ROOT / "examples" / name
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    src = sorted((project / "src").rglob("*.py"))
    tests = sorted((project / "tests").glob("test_*.py"))
    length, where = longest_function(src)
    research = tuple(answers["features"]) == RESEARCH_FEATURES
    features = "the research default (9)" if research else ", ".join(answers["features"])
    return (
        f"| `{name}` | {answers['profile']} | {features or 'none'} | {len(src)} | {sum(map(lines, src)):,} "
        f"| {lines(next(p for p in src if p.name == 'train.py'))} | {length} (`{where}`) | {len(tests)} |"
    )


def table() -> str:
    header = [
        "| example | profile | features | modules | lines in `src/` | `train.py` | longest function | test files |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    return "\n".join(header + [row(name) for name in EXAMPLES])


def readme_table(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    readme = ROOT / "README.md"
    before, rest = readme.read_text().split(BEGIN, 1)
    fresh = table()
    readme.write_text(f"{before}{BEGIN}\n{fresh}\n{END}{rest.split(END, 1)[1]}")
    print(fresh)
