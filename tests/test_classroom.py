"""The classroom (`exercises = true`): the student's copy fails each exercise by name, the teacher's code passes it.

For every exercise: its tests fail on the student's copy naming the
exercise; the teacher's functions put into the student's copy pass them; a
solution written the way the blog articles do it (the trap's habit) fails
them with a message that says what went wrong.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from scaffold.matrix import run_tests
from scaffold.render import render
from tests.conftest import ROOT
from tests.test_render import actionlint

# Each exercise's functions, by file: what the student writes.
FUNCTIONS = {
    1: {"freeze.py": ["match"]},
    2: {"freeze.py": ["make_optimizer", "release_stage"]},
    3: {"freeze.py": ["FixedStats.train", "FrozenBatchNorm.forward"]},
    4: {"checkpoint.py": ["load_matching"]},
    5: {"train.py": ["restore"]},
}

# Each exercise solved as the articles do it, and what its tests must then say.
HABITS = {
    1: (
        {"match": "return {name for name, _ in model.named_parameters() if name == selector}"},
        "a typo must be refused",
    ),
    2: (
        {
            "make_optimizer": "return torch.optim.AdamW(model.parameters(), lr=config.train.lr)",
            "release_stage": "return param_groups(model, config, k + 1)[-1]",
        },
        "frozen tensors: weight decay and Adam would move them",
    ),
    3: (
        {"FixedStats.train": "return super().train(mode)"},
        "moved after model.train()",
    ),
    4: (
        {
            "load_matching": "model.load_state_dict(source, strict=False)\n"
            'return {"loaded": list(source), "wrong shape": [], "wrong dtype": [], "missing": [], "unused": []}'
        },
        "every tensor but the head must load",
    ),
    5: (
        {"restore": 'model.load_state_dict(state["model"])\nreturn state["history"], state["best"]'},
        "put back the optimizer and every RNG",
    ),
}


@pytest.fixture(scope="module")
def copies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("classroom")
    answers = {"project_name": "hw", "profile": "teaching"}
    return {
        copy: render(root / copy, {**answers, "exercises": copy == "student"}, src=ROOT)
        for copy in ("teacher", "student")
    }


def function_node(tree: ast.Module, qualified: str) -> ast.FunctionDef:
    owner, _, name = qualified.rpartition(".")
    scope = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner) if owner else tree
    return next(n for n in scope.body if isinstance(n, ast.FunctionDef) and n.name == name)


def replace_function(path: Path, qualified: str, new_lines: list[str]) -> None:
    """Put `new_lines` (a whole def, indented as it stands) where the function `qualified` is in `path`."""
    lines = path.read_text().splitlines()
    node = function_node(ast.parse("\n".join(lines)), qualified)
    lines[node.lineno - 1 : node.end_lineno] = new_lines
    path.write_text("\n".join(lines) + "\n")


def teachers_function(teacher: Path, file: str, qualified: str) -> list[str]:
    lines = (teacher / "src" / "hw" / file).read_text().splitlines()
    node = function_node(ast.parse("\n".join(lines)), qualified)
    return lines[node.lineno - 1 : node.end_lineno]


def habit_function(student: Path, file: str, qualified: str, body: str) -> list[str]:
    """The student's def line, then `body` in place of the task and the raise."""
    lines = (student / "src" / "hw" / file).read_text().splitlines()
    node = function_node(ast.parse("\n".join(lines)), qualified)
    indent = " " * (node.col_offset + 4)
    return [*lines[node.lineno - 1 : node.body[0].lineno - 1], *(indent + line for line in body.splitlines())]


def grade(project: Path, number: int) -> subprocess.CompletedProcess:
    return run_tests(project, ["-m", f"exercise{number}"])


@pytest.mark.slow
@pytest.mark.parametrize("number", sorted(FUNCTIONS))
def test_an_exercise_fails_by_name_then_passes_with_the_teachers_code_and_fails_the_habit(copies, tmp_path, number):
    student = shutil.copytree(copies["student"], tmp_path / "student")
    proc = grade(student, number)
    assert proc.returncode == 1 and f"exercise {number}: failing: NotImplementedError: exercise {number}" in proc.stdout

    habits, explanation = HABITS[number]
    for file, names in FUNCTIONS[number].items():
        for name in names:
            if name in habits:
                replace_function(student / "src/hw" / file, name, habit_function(student, file, name, habits[name]))
            else:
                replace_function(student / "src/hw" / file, name, teachers_function(copies["teacher"], file, name))
    proc = grade(student, number)
    assert proc.returncode == 1 and explanation in proc.stdout, proc.stdout[-3000:]

    for file, names in FUNCTIONS[number].items():
        for name in names:
            replace_function(student / "src/hw" / file, name, teachers_function(copies["teacher"], file, name))
    proc = grade(student, number)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"exercise {number}: passing" in proc.stdout


@pytest.mark.slow
def test_the_student_copy_fails_the_five_exercises_and_nothing_else_until_they_are_written(copies, tmp_path):
    student = copies["student"]
    proc = run_tests(student)
    for number in FUNCTIONS:
        assert f"exercise {number}: failing: NotImplementedError: exercise {number}" in proc.stdout
    others = run_tests(student, ["-m", "not (" + " or ".join(f"exercise{n}" for n in FUNCTIONS) + ")"])
    assert others.returncode == 0, others.stdout[-3000:]
    assert "waits for exercise 1: freeze.match is not written yet" in others.stdout

    # Every exercise written: the whole suite passes, and `traps` shows each habit failing beside the student's code.
    solved = shutil.copytree(student, tmp_path / "solved")
    for functions in FUNCTIONS.values():
        for file, names in functions.items():
            for name in names:
                replace_function(solved / "src/hw" / file, name, teachers_function(copies["teacher"], file, name))
    proc = run_tests(solved)
    assert proc.returncode == 0 and "waits for" not in proc.stdout, proc.stdout[-3000:]
    traps = [sys.executable, "-m", "hw.train", "traps"]
    before = subprocess.run(traps, cwd=student, env={"PYTHONPATH": "src"}, capture_output=True, text=True).stdout
    after = subprocess.run(traps, cwd=solved, env={"PYTHONPATH": "src"}, capture_output=True, text=True).stdout
    assert "typo           waits for exercise 1: freeze.match is not written yet" in before
    assert "waits for" not in after and "not shown here" not in after, after


def test_the_student_copy_is_smaller_and_ruff_clean_and_its_grader_passes_actionlint(copies):
    sizes = {
        copy: sum(len(p.read_text().splitlines()) for p in (path / "src").rglob("*.py"))
        for copy, path in copies.items()
    }
    assert sizes["student"] < sizes["teacher"], sizes
    student = copies["student"]
    ruff = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=student, capture_output=True, text=True)
    assert ruff.returncode == 0, ruff.stdout
    workflows = sorted((student / ".github" / "workflows").glob("*.yml"))
    assert [p.name for p in workflows] == ["ci.yml", "classroom.yml"]
    assert actionlint(workflows) == []
    grader = (student / ".github/workflows/classroom.yml").read_text()
    assert [f"pytest -m exercise{n} " in grader for n in FUNCTIONS] == [True] * 5
    assert not (copies["teacher"] / ".github/workflows/classroom.yml").exists()
