"""What a study says before and after it runs: every shipped study's cells pass the checks made before the first
cell runs, and a study stopped by Ctrl-C names the cell it interrupted (and only counts that are not zero)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdcli.study.grid import Cell, Study
from kdcli.study.runner import stopped_message


@pytest.mark.parametrize("recipe, cells", [("study/synthetic", 40), ("study/synthetic_gpu", 24),
                                           ("study/synthetic_unlabeled", 8), ("study/synthetic_unlabeled_same", 8)])
def test_every_shipped_study_passes_the_cell_checks(recipe: str, cells: int, tmp_path: Path):
    assert Study.open(recipe, tmp_path / "s").check_recipes() == cells


def test_a_stopped_study_names_the_interrupted_cell_and_no_zero_count():
    t, h, p = Cell("teacher", 1, 0), Cell("hard", 1, 0), Cell("hard+pdf", 1, 0)
    assert stopped_message([t], []) == "study stopped: teacher/f1/s0 interrupted (rerunning resumes it from last.pt)"
    assert stopped_message([h, p], [Cell("soft", 1, 0)]) == (
        "study stopped: hard/f1/s0, hard+pdf/f1/s0 interrupted (rerunning resumes them from last.pt); 1 cell not "
        "started")
    assert stopped_message([], [h, p]) == "study stopped: 2 cells not started"
    assert "0 cells" not in stopped_message([], []) and "0 cells" not in stopped_message([t], [])
