"""`kdcli benchmark --suite gpu`: every speed target measured by one prepared command, for a GPU that is lent for
minutes: the step benchmark (teacher, student, torchvision's RetinaNet, the hard+pdf and hard+crosskd KD steps),
a real epoch through the loader and the command-to-first-step time on synthetic VEDAI data it generates, a cut
study on that data (teacher + hard + hard+pdf + hard+crosskd, 2 folds x 1 seed, several cells per GPU) with its
report, and one summary of every target with its value and pass/fail.

A suite measures what it runs: OUT must be new or empty (`--force` empties an earlier suite's OUT first), so no
target is judged from cells or files of another call; a study cut short by failed cells projects nothing.

Each stage writes its results to OUT as soon as it has them (`suite.json`, `summary.json`, then the study's
`study_table.md` and `study_gains.md`), so a call cut short still leaves what it measured. Bulky outputs (the
data, the study's runs) go to OUT/data and OUT/study; the files a person reads sit at OUT's top level.

Sizes (`FULL`) are set from the last GPU figures (student 155 images/s at 512 px, batch 16, bf16 on an H100) to
end within 9 minutes on one H200; `TINY` runs the same stages on a CPU in about a minute (the test).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdcli import atomic
from kdcli.console import err
from kdcli.errors import KdcliError


@dataclass(frozen=True)
class Sizes:
    imgsz: int
    batch: int
    repeats: int
    channels: int | None  # None: the recipes' widths
    scenes: int  # synthetic VEDAI scenes (fold test sets included)
    scene_size: int  # generator size at 25 cm; the prepared images are this many pixels a side
    teacher_epochs: int
    student_epochs: int
    per_device: int  # study cells sharing the GPU
    epoch_batches: int | None


FULL = Sizes(imgsz=512, batch=16, repeats=10, channels=None, scenes=200, scene_size=512, teacher_epochs=10,
             student_epochs=6, per_device=4, epoch_batches=None)
TINY = Sizes(imgsz=64, batch=2, repeats=5, channels=16, scenes=24, scene_size=64, teacher_epochs=1,
             student_epochs=1, per_device=1, epoch_batches=2)
MIN_REPEATS = 5  # timed steps after warm-up at least: one step's ratio swung from 1.7 to 0.1 between two CPU runs
SUITE_FILES = ("suite.json", "summary.json")  # what marks a folder as an earlier suite's
STUDENT_ROWS = ["hard", "hard+pdf", "hard+crosskd"]  # the study's rows besides the teacher
FULL_STUDY = {"teachers": 4, "teacher_epochs": 50, "students": 20, "student_epochs": 30}  # study/synthetic_gpu

# name, what it is, comparison, target (issue 12's GPU targets)
TARGETS = [
    ("student_vs_torchvision", "student step images/s over torchvision RetinaNet's on the same batch", ">=", 1.5),
    ("kd_step_ratio_hard_pdf", "hard+pdf step time over the hard student's", "<=", 1.2),
    ("kd_step_ratio_hard_crosskd", "hard+crosskd step time over the hard student's", "<=", 1.2),
    ("assign_loss_share", "share of the student step in assignment + losses", "<=", 0.15),
    ("step_vs_epoch", "student step images/s over a real epoch's through the loader", "<=", 1.3),
    ("first_step_s", "seconds from `kdcli train` to the end of its first step", "<=", 6.0),
    ("study_24_cells_min", "the 24-cell synthetic_gpu study, projected from the cut study (minutes)", "<=", 12.0),
]


def claim_out(out: Path, force: bool = False) -> None:
    """OUT must be new or empty: an earlier suite's study cells would be skipped as finished and its files read as
    this call's. `force` empties an earlier suite's folder (one holding suite.json or summary.json), and only such a
    folder (`--out . --force` must not empty the working folder)."""
    from kdcli.atomic import ensure_dir_possible

    ensure_dir_possible(out, "--out folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not force:
        raise KdcliError(f"--out {out}: the folder is not empty (a suite measures only what it runs; an earlier "
                         "suite's study cells would be reused untimed)",
                         hint="choose a new folder, or pass --force to start this one afresh")
    if not any((out / name).is_file() for name in SUITE_FILES):
        raise KdcliError(f"--out {out}: not the folder of an earlier suite (no {' or '.join(SUITE_FILES)}): "
                         "--force empties only those", hint="choose a new or empty folder")
    err.print(f"--force: emptying {out} (an earlier suite's results)", highlight=False)
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


class Suite:
    """The stages and their files; `results` grows stage by stage and is rewritten after each."""

    def __init__(self, out: Path, device: str, amp: str, sizes: Sizes, force: bool = False):
        self.out, self.device, self.amp, self.sizes, self.force = out, device, amp, sizes, force
        self.results: dict[str, Any] = {"sizes": asdict(sizes), "device": device, "amp": amp, "stages": {}}
        self.t0 = time.perf_counter()

    def record(self, stage: str, value: Any) -> None:
        self.results["stages"][stage] = value
        self.results["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        atomic.write_json(self.out / "suite.json", self.results, indent=2)
        atomic.write_json(self.out / "summary.json", summary(self.results), indent=2)

    def run(self) -> dict[str, Any]:
        claim_out(self.out, self.force)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, stage in (("steps", self.steps), ("epoch", self.epoch), ("study", self.study)):
            err.print(f"[bold]suite: {name}[/] ({time.perf_counter() - self.t0:.0f} s so far)", highlight=False)
            stage()
        return summary(self.results)

    # ---- stage 1: training steps on one synthetic batch ----------------------------------------------------------
    def models(self):
        from kdcli.config import load, schema

        cfgs = []
        for name in ("models/teacher_r50_pafpn", "models/student_r18_fpn"):
            cfg = load.load(schema.Recipe, name, defaults={"data": {"path": "-"}}).model
            update = {"pretrained": False, **({"channels": self.sizes.channels} if self.sizes.channels else {})}
            cfgs.append(cfg.model_copy(update=update))
        return cfgs

    def steps(self) -> None:
        import torch

        from kdcli.deploy import benchmark as bench
        from kdcli.engine.distributed import resolve_device

        s, dev = self.sizes, resolve_device(self.device)
        repeats = max(MIN_REPEATS, s.repeats)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp) if dev.type == "cuda" else None
        teacher, student = self.models()
        rows = {"machine": bench.machine()}
        rows["teacher"] = bench.train_step(teacher, s.imgsz, s.batch, dev, dtype, repeats=repeats)
        self.record("steps", rows)
        rows["student"] = bench.train_step(student, s.imgsz, s.batch, dev, dtype, repeats=repeats)
        self.record("steps", rows)
        rows["torchvision_retinanet"] = bench.torchvision_reference(s.imgsz, s.batch, dev, dtype, repeats=repeats)
        self.record("steps", rows)
        rows["distill"] = bench.distill_steps(teacher, student, s.imgsz, s.batch, dev, dtype, repeats=repeats,
                                              rows=[("hard", "none", False), ("hard", "pdf", False),
                                                    ("hard", "crosskd", False)])
        self.record("steps", rows)

    # ---- stage 2: synthetic data, a real epoch, the first step of a fresh process --------------------------------
    def data(self) -> Path:
        from kdcli.data.sources import vedai
        from kdcli.data.synthetic import generate

        raw, ready = self.out / "data" / "raw-vedai", self.out / "data" / "vedai25"
        if not (ready / "dataset.yaml").is_file():
            generate("vedai", raw, seed=0, images=self.sizes.scenes, size=self.sizes.scene_size, force=True)
            vedai.prepare(raw, ready, res=25, folds=[1, 2], force=True)
        return ready

    def epoch(self) -> None:
        from kdcli.deploy import benchmark as bench

        s = self.sizes
        dataset = self.data()
        _, student = self.models()
        row = bench.train_epoch(student, str(dataset), 1, s.imgsz, s.batch, self.device, self.amp,
                                workers=min(8, s.per_device * 2), max_batches=s.epoch_batches)
        self.record("epoch", row)

    # ---- stage 3: a cut study, several cells per GPU ---------------------------------------------------------------
    def study(self) -> None:
        from kdcli.config.schema import StudyConfig
        from kdcli.study.aggregate import summarize
        from kdcli.study.grid import Study
        from kdcli.study.report import gains_markdown, table_markdown, write_report
        from kdcli.study.runner import run_grid, status

        s = self.sizes
        dataset = self.data()
        gpu = self.device not in ("cpu", "auto")
        widths = [f"model.channels={s.channels}"] if s.channels else []
        widths += [f"data.workers={4 if gpu else 0}"]
        cfg = StudyConfig(name="gpu_suite", dataset=str(dataset), teacher="train/synthetic_teacher",
                          student="distill/synthetic", configs=["teacher", *STUDENT_ROWS], folds=[1, 2], seeds=[0],
                          overrides=[f"imgsz={s.imgsz}", f"train.amp={self.amp}", "distill.teacher_min_map=0",
                                     *widths],
                          teacher_overrides=[f"train.epochs={s.teacher_epochs}"],
                          student_overrides=[f"train.epochs={s.student_epochs}"])
        study = Study.create(cfg, self.out / "study")
        study.save()
        cells, todo = len(study.cells()), len(status(study).todo)
        t0 = time.perf_counter()
        failed = run_grid(study, jobs=1 if gpu else 2, devices=[self.device] if gpu else None,
                          per_device=s.per_device)
        wall = time.perf_counter() - t0
        rep = summarize([study.dir])
        write_report(rep, study.dir)
        atomic.write_text(self.out / "study_table.md", table_markdown(rep))
        atomic.write_text(self.out / "study_gains.md", gains_markdown(rep))
        steps = self.results["stages"].get("steps", {})
        ratio = (steps["teacher"]["step_s"] / steps["student"]["step_s"]) if "teacher" in steps else 1.0
        cut = 2 * s.teacher_epochs * ratio + 2 * len(STUDENT_ROWS) * s.student_epochs
        full = (FULL_STUDY["teachers"] * FULL_STUDY["teacher_epochs"] * ratio
                + FULL_STUDY["students"] * FULL_STUDY["student_epochs"])
        note = study_note(cells, todo, failed)
        self.record("study", {"cells": cells, "cells_run": todo, "failed": failed, "wall_s": round(wall, 1),
                              "per_device": s.per_device, "teacher_to_student_step": round(ratio, 2),
                              "projected_24_cells_min": None if note else round(wall * full / cut / 60, 1),
                              **({"note": note} if note else {}),
                              "table": {c: round(100 * v["median"], 1)
                                        for c, v in rep["studies"][0]["table"].items()}})


def study_note(cells: int, ran: int, failed: int) -> str | None:
    """Why the cut study projects nothing, or None: the projection stands on this call's wall time of the whole
    cut study (every cell run here, none failed), never on cells of another call or on a study cut short."""
    if ran < cells:
        return f"not projected: {cells - ran} of {cells} cells were finished before this call (not timed)"
    return f"not projected: {failed} of {cells} cells failed" if failed else None


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Every target with its measured value (None until its stage has run) and pass/fail."""
    st = results["stages"]
    steps, epoch, study = st.get("steps", {}), st.get("epoch", {}), st.get("study", {})
    rows = {r["row"]: r for r in steps.get("distill", {}).get("rows", [])}
    value = {
        "student_vs_torchvision": (steps["student"]["images_per_s"] / steps["torchvision_retinanet"]["images_per_s"]
                                   if "torchvision_retinanet" in steps else None),
        "kd_step_ratio_hard_pdf": rows.get("hard+pdf", {}).get("time_ratio"),
        "kd_step_ratio_hard_crosskd": rows.get("hard+crosskd", {}).get("time_ratio"),
        "assign_loss_share": steps.get("student", {}).get("assign_loss_share"),
        "step_vs_epoch": (steps["student"]["images_per_s"] / epoch["images_per_s"]
                          if epoch and "student" in steps else None),
        "first_step_s": epoch.get("first_step_s"),
        "study_24_cells_min": study.get("projected_24_cells_min"),
    }
    spreads = {"kd_step_ratio_hard_pdf": rows.get("hard+pdf", {}).get("time_ratio_spread"),
               "kd_step_ratio_hard_crosskd": rows.get("hard+crosskd", {}).get("time_ratio_spread")}
    notes = {"study_24_cells_min": study.get("note")}
    targets = []
    for name, what, op, target in TARGETS:
        v = value[name]
        ok = None if v is None else (v >= target if op == ">=" else v <= target)
        targets.append({"target": name, "what": what, "value": None if v is None else round(float(v), 3),
                        "goal": f"{op} {target}", "pass": ok, "spread": spreads.get(name),
                        **({"note": notes[name]} if notes.get(name) else {})})
    machine = steps.get("machine", {})
    return {"device": machine.get("gpu") or machine.get("cpu"), "amp": results.get("amp"),
            "elapsed_s": results.get("elapsed_s"), "targets": targets,
            "passed": sum(t["pass"] is True for t in targets), "measured": sum(t["pass"] is not None for t in targets)}
