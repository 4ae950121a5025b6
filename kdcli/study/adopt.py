"""Teachers shared between studies: a study of other students (another input size, method or label share) takes
the teachers another study has already trained instead of training them again, when their recipes are the same.

Only an exact match is taken: the two studies' resolved teacher recipes for the same fold and seed must be equal
in every field, else the study stops naming the first field that differs. An adopted teacher is an ordinary ok
record in this study's ledger (its weights, test metrics and detections stay where the source study keeps them),
marked with `adopted_from`, so `kdcli report` reads it as any other row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdcli.config import load
from kdcli.errors import KdcliError
from kdcli.study.grid import STUDY_FILE, Cell, Study
from kdcli.study.ledger import Ledger, study_records


def first_difference(a: Any, b: Any, where: str = "") -> str | None:
    """The dotted key of the first field where two dumped recipes differ, with both values; None if equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
            if found:
                return found
        return None
    return None if a == b else f"{where or 'recipe'} ({a!r} here, {b!r} there)"


def adopt_teachers(study: Study, source: Path, write: bool = True) -> list[tuple[Cell, dict[str, Any]]]:
    """The teacher cells of `study` not finished here that `source` (a study dir) has finished with the same
    recipe, each with the record to append; appended to the study's ledger when `write`."""
    if not (Path(source) / STUDY_FILE).is_file():
        raise KdcliError(f"--teachers-from {source}: not a study directory (no {STUDY_FILE})",
                         hint="give the --out directory of a study that has trained its teachers")
    other = Study.open(source)
    if other.dir.resolve() == study.dir.resolve():
        raise KdcliError(f"--teachers-from {source}: that is this study", hint="name another study's directory")
    mine, theirs = study_records(study.dir), study_records(other.dir)
    taken = []
    for cell in study.cells():
        rec = theirs.get(cell.key)
        if not cell.is_teacher or (mine.get(cell.key) or {}).get("status") == "ok" or not rec \
                or rec.get("status") != "ok":
            continue
        diff = first_difference(load.dump(study.teacher_recipe(cell)), load.dump(other.teacher_recipe(cell)))
        if diff:
            raise KdcliError(f"--teachers-from {source}: {cell.id} was trained with another recipe: {diff}",
                             hint="only an identical teacher recipe can be shared; drop --teachers-from to "
                                  "train this study's own")
        if not Path(rec.get("weights", "")).is_file():
            raise KdcliError(f"--teachers-from {source}: {cell.id}'s weights {rec.get('weights')} are missing",
                             hint="restore them, or drop --teachers-from to train this study's own")
        taken.append((cell, {**rec, "adopted_from": str(other.dir.resolve())}))
    if write:
        ledger = Ledger(study.dir / "ledger.jsonl")
        for _, rec in taken:
            ledger.append(rec)
    return taken
