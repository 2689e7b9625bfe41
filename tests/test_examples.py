"""examples/ is what a fresh render gives, byte for byte."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold.matrix import ALL_FEATURES
from scaffold.render import render
from tests.conftest import ROOT
from tests.regen_examples import EXAMPLES, render_example
from tests.render_table import MODULES_BEGIN, MODULES_END, readme_table, tables


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_equals_a_fresh_render(tmp_path, name):
    fresh = tree(render_example(name, tmp_path))
    committed = tree(ROOT / "examples" / name)
    assert committed.keys() == fresh.keys(), "run `python -m tests.regen_examples`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale files {stale}; run `python -m tests.regen_examples`"


def test_examples_are_ruff_clean():
    """Their package names are longer than the matrix's finetune_demo, so lines wrap elsewhere.

    The teaching edition passes `ruff check` but is laid out by hand for
    reading (a record dict on one line, not one key a line): `ruff format`
    would spread train.fit over 70 lines, past the one-screen limit.
    """
    for command in (["check"], ["format", "--check"]):
        for example in EXAMPLES:
            if command[0] == "format" and EXAMPLES[example].get("profile") == "teaching":
                continue
            proc = subprocess.run(
                [sys.executable, "-m", "ruff", *command, "--no-cache", "."],
                cwd=ROOT / "examples" / example,
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, f"{example}: {proc.stdout}{proc.stderr}"


def test_the_readme_tables_of_renders_and_modules_match_fresh_code():
    readme = (ROOT / "docs" / "editions.md").read_text()
    renders, modules = tables()
    assert readme_table(readme) == renders, "run `python -m tests.render_table`"
    assert readme_table(readme, MODULES_BEGIN, MODULES_END) == modules, "run `python -m tests.render_table`"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(pages: list[Path]) -> list[str]:
    """Each relative link of `pages` whose file or heading does not exist, as "page: target"."""
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.is_file():
                broken.append(f"{page.name}: {target}")
            elif anchor and anchor not in {slug(h) for h in re.findall(r"(?m)^#+ (.*)$", linked.read_text())}:
                broken.append(f"{page.name}: {target}")
    return broken


def test_the_readme_is_short_and_every_link_in_it_and_docs_resolves():
    """The README leads (at most 250 lines); the longer material is in docs/, and no link points nowhere."""
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    assert not broken_links([readme, *sorted((ROOT / "docs").glob("*.md"))])


# The longest research READMEs: every feature, an unfreeze stage, every
# checkpoint format, with the freezing that adds the most text (LoRA) and
# the custom model (its data paragraph).
LARGEST_RENDERS = {
    "pattern": {"backbone": "resnet18", "freeze_by": "pattern"},
    "lora": {"backbone": "resnet18", "freeze_by": "lora"},
    "custom": {"backbone": "custom", "freeze_by": "name"},
}


@pytest.mark.parametrize("name", list(LARGEST_RENDERS))
def test_a_research_readme_is_short_and_its_links_and_docs_resolve(tmp_path, name):
    """At most 300 lines with every feature chosen: a few lines per capability, the rest in the render's docs/."""
    answers = {"project_name": "everything", "features": list(ALL_FEATURES), "unfreeze_at_epoch": 2}
    answers["checkpoint_formats"] = ["state_dict", "safetensors", "full"]
    project = render(tmp_path / name, {**answers, **LARGEST_RENDERS[name]}, src=ROOT)
    readme = project / "README.md"
    assert len(readme.read_text().splitlines()) <= 300
    docs = sorted((project / "docs").glob("*.md"))
    assert docs, "the longer material is in docs/"
    assert not broken_links([readme, *docs])
    linked = set(re.findall(r"\]\(docs/([^)#\s]+)", readme.read_text()))
    assert linked == {doc.name for doc in docs}, "the README links every docs file"
