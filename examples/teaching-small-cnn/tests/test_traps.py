"""`traps`: on this model, every habit of the articles fails where this project's code holds."""

from __future__ import annotations

from teaching_small_cnn.train import fit
from teaching_small_cnn.traps import print_traps

# Rows with nothing to show here: a model without BatchNorm, a render without last.ckpt.
NOTHING_TO_SHOW = []


def test_every_habit_fails_and_this_project_holds(config, capsys):
    print_traps(config, fit)
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 6
    assert [row.split()[0] for row in rows if row.endswith("(not shown here)")] == NOTHING_TO_SHOW, rows
