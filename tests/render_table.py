"""docs/editions.md's table of renders, computed from examples/: `python -m tests.render_table`.

examples/ is kept identical to fresh renders by tests/test_examples.py, so
the counts are the generated code's own; the last row is a fresh render of
the smallest teaching project (small_cnn, no features, every format), which
no example holds. A second table lists that render's modules, each with the
first line of its docstring. A test checks that docs/editions.md holds exactly these
tables.
"""

from __future__ import annotations

import ast
import io
import tempfile
import tokenize
from pathlib import Path

import yaml

from scaffold.matrix import RESEARCH_FEATURES
from scaffold.render import render
from tests.conftest import ROOT
from tests.regen_examples import EXAMPLES

BEGIN, END = "<!-- render-table:begin -->", "<!-- render-table:end -->"
MODULES_BEGIN, MODULES_END = "<!-- module-table:begin -->", "<!-- module-table:end -->"


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def code_lines(path: Path) -> int:
    """Lines that hold code: not blank, not only a comment, not part of a docstring."""
    text = path.read_text()
    docstrings = set()
    documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, documented) and ast.get_docstring(node):
            first = node.body[0]
            docstrings.update(range(first.lineno, first.end_lineno + 1))
    code = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type not in skip:
            code.update(range(token.start[0], token.end[0] + 1))
    return len(code - docstrings)


def longest_function(paths: list[Path]) -> tuple[int, str]:
    longest = (0, "")
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                longest = max(longest, (node.end_lineno - node.lineno + 1, f"{path.stem}.{node.name}"))
    return longest


def row(project: Path, name: str) -> str:
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    src = sorted((project / "src").rglob("*.py"))
    tests = sorted((project / "tests").glob("test_*.py"))
    length, where = longest_function(src)
    research = tuple(answers["features"]) == RESEARCH_FEATURES
    features = f"the research default ({len(RESEARCH_FEATURES)})" if research else ", ".join(answers["features"])
    train = next(p for p in src if p.name == "train.py")
    return (
        f"| {name} | {answers['profile']} | {features or 'none'} | {len(src)} "
        f"| {sum(map(lines, src)):,} ({sum(map(code_lines, src)):,}) | {lines(train)} ({code_lines(train)}) "
        f"| {length} (`{where}`) | {len(tests)} |"
    )


def bare(tmp: str, profile: str) -> Path:
    """A fresh small_cnn render of `profile` with no features and every checkpoint format."""
    answers = {"project_name": f"{profile}-bare", "profile": profile, "backbone": "small_cnn", "features": []}
    answers["checkpoint_formats"] = ["state_dict", "safetensors", "full"]
    return render(Path(tmp) / f"{profile}-bare", answers, src=ROOT)


# The modules that hold only the core every render keeps, whatever the answers (docs/editions.md).
CORE = ("freeze", "checkpoint", "config", "weights", "batchnorm", "optim", "integrity", "runfolder", "rng", "run")
CORE += ("train", "saving", "model")


def module_table(project: Path) -> str:
    """Each module of `project` by size, with its docstring's first line; then the core's total."""
    rows = ["| module | core | lines (code) | what it holds |", "|---|---|---:|---|"]
    src = sorted((project / "src").rglob("*.py"), key=lambda path: (-code_lines(path), path.name))
    for path in src:
        if code_lines(path) == 0:
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or "-"
        core = "yes" if path.stem in CORE else ""
        rows.append(f"| `{path.name}` | {core} | {lines(path)} ({code_lines(path)}) | {doc.splitlines()[0]} |")
    core = [path for path in src if path.stem in CORE]
    total = f"{sum(map(lines, core)):,} ({sum(map(code_lines, core)):,})"
    rows.append(f"| the {len(core)} core modules | | {total} | |")
    return "\n".join(rows)


def tables() -> tuple[str, str]:
    """The table of renders, and the module table of a fresh research render with no features."""
    header = [
        "| example | profile | features | modules | lines in `src/` (code) | `train.py` (code) | longest function "
        "| test files |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    examples = [row(ROOT / "examples" / name, f"`{name}`") for name in EXAMPLES]
    with tempfile.TemporaryDirectory() as tmp:
        fresh = [row(bare(tmp, profile), f"a fresh {profile} render") for profile in ("teaching", "research")]
        return "\n".join([*header, *examples, *fresh]), module_table(bare(tmp, "research"))


def readme_table(text: str, begin: str = BEGIN, end: str = END) -> str:
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def replace_table(text: str, fresh: str, begin: str, end: str) -> str:
    before, rest = text.split(begin, 1)
    return f"{before}{begin}\n{fresh}\n{end}{rest.split(end, 1)[1]}"


if __name__ == "__main__":
    readme = ROOT / "docs" / "editions.md"
    renders, modules = tables()
    text = replace_table(readme.read_text(), renders, BEGIN, END)
    readme.write_text(replace_table(text, modules, MODULES_BEGIN, MODULES_END))
    print(renders)
    print(modules)
