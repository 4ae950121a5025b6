"""A study: its directory, the grid of cells (configuration x fold x seed) and the recipe of each cell.

A study directory keeps the resolved grid (`study.yaml`), the ledgers, one run dir per cell under `runs/` and one
log per cell under `logs/`. Growing the grid (more configs, folds, seeds or new variants) reuses finished cells;
changing what a cell trains (recipes, dataset, overrides, an existing variant) is refused, since finished cells
would no longer match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kdcli import atomic, paths
from kdcli.config import load
from kdcli.config import schema
from kdcli.config.schema import StudyConfig
from kdcli.errors import KdcliError

STUDY_FILE = "study.yaml"
GRID_KEYS = ("configs", "folds", "seeds", "baseline")  # may change between runs of one study dir


@dataclass(frozen=True, order=True)
class Cell:
    config: str
    fold: int
    seed: int

    @property
    def id(self) -> str:
        return f"{self.config}/f{self.fold}/s{self.seed}"

    @property
    def slug(self) -> str:
        """File-name form: `hard+pdf/f1/s0` -> `hard_pdf-f1-s0`, `hard+pdf@pool/f1/s0` -> `hard_pdf@pool-f1-s0`."""
        return f"{self.config.replace('+', '_')}-f{self.fold}-s{self.seed}"

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.config, self.fold, self.seed)

    @property
    def is_teacher(self) -> bool:
        return self.config == "teacher"

    def teacher(self) -> Cell:
        return Cell("teacher", self.fold, self.seed)

    @staticmethod
    def parse(text: str) -> Cell:
        """`hard+pdf/f1/s0` (as printed by `--dry-run` and written by `--plan`)."""
        parts = text.strip().split("/")
        if len(parts) != 3 or not parts[1].startswith("f") or not parts[2].startswith("s"):
            raise KdcliError(f"cell '{text}' not understood", hint="write CONFIG/fFOLD/sSEED, e.g. hard+pdf/f1/s0")
        try:
            return Cell(parts[0], int(parts[1][1:]), int(parts[2][1:]))
        except ValueError:
            raise KdcliError(f"cell '{text}' not understood", hint="write CONFIG/fFOLD/sSEED") from None


def _resolve_recipe(value: str, base: Path | None) -> str:
    """A recipe named relative to the study file, else a path or a name under recipes/."""
    if base is not None and (base / value).is_file():
        return str((base / value).resolve())
    return str(load.find_recipe(value).resolve())


class Study:
    """A study directory and its grid."""

    def __init__(self, directory: Path, cfg: StudyConfig, source: Path | None = None):
        self.dir = directory
        self.cfg = cfg
        self.source = source  # the study recipe (or study.yaml) it was read from: named in errors

    # ---- creation ----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, spec: str | Path, out: Path | None = None, overrides: list[str] | None = None) -> Study:
        """`spec` is a study recipe (a new or existing study) or an existing study directory (resume it)."""
        spec_path = Path(spec)
        if spec_path.is_dir():
            if not (spec_path / STUDY_FILE).is_file():
                raise KdcliError(f"{spec_path}: not a study directory (no {STUDY_FILE})",
                                 hint="give a study recipe, e.g. recipes/study/synthetic.yaml")
            cfg = load.load(StudyConfig, spec_path / STUDY_FILE, overrides)
            study = cls(out or spec_path, cfg, spec_path / STUDY_FILE)
            study._check_against_existing()
            return study
        recipe = load.find_recipe(spec)
        cfg = load.load(StudyConfig, recipe, overrides)
        study = cls.create(cfg.model_copy(update={"name": cfg.name or recipe.stem}), out, recipe.parent)
        study.source = recipe
        return study

    @classmethod
    def create(cls, cfg: StudyConfig, out: Path | None = None, base: Path | None = None) -> Study:
        """A study from a config: recipes resolved to absolute paths (relative ones from `base`)."""
        cfg = cfg.model_copy(update={"teacher": _resolve_recipe(cfg.teacher, base),
                                     "student": _resolve_recipe(cfg.student, base)})
        study = cls(out or paths.runs_root() / "study" / (cfg.name or "study"), cfg)
        study._check_against_existing()
        return study

    def _check_against_existing(self) -> None:
        path = self.dir / STUDY_FILE
        if not path.is_file():
            return
        old = load.read_yaml(path)
        new = load.dump(self.cfg)
        changed = [k for k in new if k not in GRID_KEYS and old.get(k) != new[k]]
        kept = old.get("variants") or {}
        if "variants" in changed and all(new["variants"].get(v) == o for v, o in kept.items()):
            changed.remove("variants")  # new variants only: the finished cells still match
        if changed:
            raise KdcliError(f"{path}: this study was run with a different {changed[0]} "
                             f"({old.get(changed[0])!r} -> {new[changed[0]]!r})",
                             hint="finished cells would no longer match: use a new --out, or the same settings")

    def save(self) -> None:
        """Write the grid (atomically): the latest configs/folds/seeds; cells of an earlier grid stay in the ledger."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic.write_yaml(self.dir / STUDY_FILE, load.dump(self.cfg))

    # ---- the grid ----------------------------------------------------------------------------------------------
    def cells(self) -> list[Cell]:
        """Teachers first (students depend on them), then students, fold by fold and seed by seed."""
        c = self.cfg
        configs = [x for x in c.configs if x != "teacher"]
        need_teacher = "teacher" in c.configs or bool(configs)
        teachers = [Cell("teacher", f, s) for f in c.folds for s in c.seeds] if need_teacher else []
        students = [Cell(x, f, s) for f in c.folds for s in c.seeds for x in configs]
        return teachers + students

    def run_dir(self, cell: Cell) -> Path:
        return self.dir / "runs" / cell.slug

    def log_path(self, cell: Cell) -> Path:
        return self.dir / "logs" / f"{cell.slug}.log"

    # ---- recipes of a cell ---------------------------------------------------------------------------------------
    def teacher_recipe(self, cell: Cell) -> schema.Recipe:
        c = self.cfg
        data = [f"data.path={c.dataset}"] if c.dataset else []
        return load.load(schema.Recipe, c.teacher, [*data, *c.overrides, *c.teacher_overrides, f"data.fold={cell.fold}",
                                             f"seed={cell.seed}", f"name={cell.slug}"])

    # ---- every cell's recipe checked before any cell runs ----------------------------------------------------------
    def _where(self, *loc: Any) -> str:
        """`study.yaml:7` for a key (path) of the study recipe, or the file alone when the line is unknown."""
        if self.source is None:
            return "study"
        line = load._line_of(self.source, loc)
        return f"{self.source}:{line}" if line else str(self.source)

    def _override_lists(self, cell: Cell) -> list[tuple[tuple[Any, ...], list[str]]]:
        """(study key, its key=value list) of every list a cell's recipe takes."""
        c = self.cfg
        own = [(("teacher_overrides",), c.teacher_overrides)] if cell.is_teacher else \
            [(("student_overrides",), c.student_overrides)]
        variant = cell.config.partition("@")[2]
        extra = [(("variants", variant), c.variants.get(variant, []))] if variant else []
        return [(("overrides",), c.overrides), *own, *extra]

    def check_recipes(self) -> int:
        """Resolve every cell's recipe as its run will (a student's from its teacher's recipe, as from the trained
        teacher) and check what would otherwise fail only once it starts, after its teacher has trained: each
        key=value of the study names a recipe key (file, line and the close key in the error), each cell's recipe
        validates, and a pool of the rest has a rest (data.label_fraction below 1). Returns the cells checked."""
        from kdcli.engine.distill_trainer import student_defaults

        seen: set[tuple[str, ...]] = set()
        for cell in self.cells():
            for loc, items in self._override_lists(cell):
                if loc in seen:
                    continue
                seen.add(loc)
                for i, item in enumerate(items):
                    try:
                        load.resolve_key(schema.Recipe, load.parse_override(item)[0])
                    except KdcliError as e:
                        raise KdcliError(f"{self._where(*loc, i)}: {'.'.join(loc)}: '{item}': {e.message}",
                                         hint=e.hint) from None
        teachers: dict[tuple[int, int], schema.Recipe] = {}
        for cell in self.cells():
            try:
                if cell.is_teacher:
                    recipe = teachers[(cell.fold, cell.seed)] = self.teacher_recipe(cell)
                    continue
                t = teachers.get((cell.fold, cell.seed)) or self.teacher_recipe(cell.teacher())
                teacher = SimpleNamespace(recipe=load.dump(t), data=SimpleNamespace(path=t.data.path))
                recipe = self.student_recipe(cell, self.run_dir(cell.teacher()) / "weights" / "best.pt",
                                             student_defaults(teacher))  # type: ignore[arg-type]
            except KdcliError as e:
                culprit = next(((loc, i) for loc, items in self._override_lists(cell)
                                for i, item in enumerate(items) if f"override '{item}'" in e.message), None)
                where = self._where(*culprit[0], culprit[1]) if culprit else self._where()
                raise KdcliError(f"{where}: cell {cell.id}: {e.message}", hint=e.hint) from None
            d = recipe.distill
            if d.unlabeled == "rest" and recipe.data.label_fraction >= 1:
                variant = cell.config.partition("@")[2]
                raise KdcliError(f"{self._where('variants', variant) if variant else self._where()}: cell {cell.id}: "
                                 "distill.unlabeled=rest distils on the training images data.label_fraction leaves "
                                 "unlabelled, and it is 1: there are none",
                                 hint="set data.label_fraction below 1 (e.g. 0.25), or name another pool")
        return len(self.cells())

    def student_recipe(self, cell: Cell, teacher_weights: Path, defaults: dict[str, Any]) -> schema.Recipe:
        c = self.cfg
        config, _, variant = cell.config.partition("@")
        labels, method = StudyConfig.labels_method(config)
        return load.load(schema.Recipe, c.student, [*c.overrides, *c.student_overrides, *c.variants.get(variant, []),
                                                    f"distill.teacher={teacher_weights}",
                                                    f"distill.labels={labels}", f"distill.method={method}",
                                                    f"seed={cell.seed}", f"name={cell.slug}"], defaults=defaults)
