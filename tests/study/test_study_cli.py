"""`kdcli study` end to end on a tiny grid (each cell a real process), its ledger resume, a failing cell,
`--plan` and `--dry-run`, and `kdcli quickstart` in a reduced mode."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.engine import detfile
from kdcli.study.ledger import Ledger, study_records

TINY = "train: {epochs: 1, batch: 4, max_batches: 2, warmup_iters: 2, ema_tau: 5, device: cpu, plots: false}\n"


def tiny_study(tmp_path: Path, dataset: Path, configs: str, seeds: str = "0", extra: str = "") -> Path:
    (tmp_path / "teacher.yaml").write_text(
        f"data: {{path: {dataset}, fold: 1, imgsz: 96, anchor_size: 16, workers: 0}}\n"
        "model: {backbone: resnet18, neck: pafpn, channels: 16, pretrained: false}\n" + TINY)
    (tmp_path / "student.yaml").write_text("model: {backbone: resnet18, neck: fpn, channels: 16, pretrained: false}\n"
                                           + TINY + "distill: {teacher_min_map: 0}\n")
    (tmp_path / "study.yaml").write_text(f"name: tiny\nteacher: teacher.yaml\nstudent: student.yaml\n"
                                         f"configs: [{configs}]\nfolds: 1\nseeds: {seeds}\n{extra}")
    return tmp_path / "study.yaml"


def ledger_lines(d: Path) -> list[str]:
    return (d / "ledger.jsonl").read_text().splitlines()


def test_grid_failed_cell_resume_and_cut_ledger(tmp_path: Path, vedai25: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    bad = tiny_study(tmp_path, vedai25, "teacher, hard, hard+pfd")
    for extra in ([], ["--dry-run"]):  # a misspelt method stops the study at load, before any teacher trains
        res = CliRunner().invoke(app, ["study", str(bad), "--out", str(tmp_path / "bad"), *extra])
        assert res.exit_code == 2 and "'hard+pfd'" in res.output and "did you mean 'pdf'" in res.output, res.output
        assert not (tmp_path / "bad" / "runs").exists()
    recipe = tiny_study(tmp_path, vedai25, "teacher, hard, hard+pdf, hard+crosskd+pkd@pool, soft",
                        extra="variants: {pool: [distill.unlabeled=rest, data.label_fraction=0.5]}\n")
    out = tmp_path / "s"
    corrupt = out / "runs" / "soft-f1-s0" / "weights" / "last.pt"  # a cell whose checkpoint is unreadable
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"not a checkpoint")
    res = CliRunner().invoke(app, ["study", str(recipe), "--out", str(out), "--jobs", "2"])
    assert res.exit_code == 1 and "1 cells failed" in res.output  # the bad cell fails, the grid goes on
    recs = study_records(out)
    cpus = os.cpu_count() or 1  # the lone teacher got every core, the students ran two at a time
    assert recs[("teacher", 1, 0)]["threads"] == cpus and recs[("hard", 1, 0)]["threads"] == max(1, cpus // 2)
    assert {k: r["status"] for k, r in recs.items()} == {
        ("teacher", 1, 0): "ok", ("hard", 1, 0): "ok", ("hard+pdf", 1, 0): "ok", ("hard+crosskd+pkd@pool", 1, 0): "ok",
        ("soft", 1, 0): "failed"}
    pooled = recs[("hard+crosskd+pkd@pool", 1, 0)]  # two methods and a pool: half the images kept their labels
    assert pooled["data"]["label_fraction"] == 0.5 and pooled["data"]["unlabeled"] == "rest"
    assert pooled["data"]["unlabeled_images"] > 0 and recs[("hard", 1, 0)]["data"]["unlabeled"] is None
    # each method's terms in the record, under its own name
    assert set(pooled["losses"]) == {"cls", "box", "crosskd_cls", "crosskd_box", "pkd", "total"}
    assert set(recs[("hard+pdf", 1, 0)]["losses"]) == {"cls", "box", "pdf", "total"}
    assert "not a readable kdcli checkpoint" in recs[("soft", 1, 0)]["error"]
    ok = recs[("hard+pdf", 1, 0)]
    assert set(ok["metrics"]) >= {"mAP50", "mAP50-95", "val_mAP50"} and ok["split"] == "test"
    assert Path(ok["weights"]).is_file() and ok["teacher"] == recs[("teacher", 1, 0)]["weights"]
    assert Path(ok["dets"]) == out / "runs" / "hard_pdf-f1-s0" / "dets_test.npz"  # for report's per-pair intervals
    assert detfile.load(Path(ok["dets"]))[3] == 8
    assert (out / "logs" / "hard_pdf-f1-s0.log").is_file()

    res = CliRunner().invoke(app, ["study", str(out), "--skip-failed"])  # all done or skipped: nothing runs
    assert res.exit_code == 0, res.output
    assert len(ledger_lines(out)) == 5

    # a study killed while writing hard+pdf's record: its line is cut; the rerun runs that cell only
    lines = ledger_lines(out)
    keep = [x for x in lines if '"hard+pdf"' not in x]
    (out / "ledger.jsonl").write_text("\n".join(keep) + "\n" + next(x for x in lines if '"hard+pdf"' in x)[:40])
    res = CliRunner().invoke(app, ["study", str(out), "--skip-failed"])
    assert res.exit_code == 0, res.output
    after = [json.loads(x) for x in ledger_lines(out)]  # every line whole again
    assert len(after) == 5 and after[-1]["config"] == "hard+pdf" and after[-1]["status"] == "ok"

    res = CliRunner().invoke(app, ["study", str(recipe), "--out", str(out), "overrides=[imgsz=128]"])
    assert res.exit_code == 2 and "different overrides" in res.output


def test_plan_and_dry_run(tmp_path: Path, vedai25: Path):
    recipe = tiny_study(tmp_path, vedai25, "teacher, hard, soft+mse", seeds="0-1")
    out = tmp_path / "p"
    res = CliRunner().invoke(app, ["study", str(recipe), "--out", str(out), "--plan"])
    assert res.exit_code == 0, res.output
    teachers = (out / "plan" / "teachers.txt").read_text().splitlines()
    students = (out / "plan" / "students.txt").read_text().splitlines()
    assert len(teachers) == 2 and len(students) == 4
    first = shlex.split(teachers[0])
    assert first[:3] == ["kdcli", "study", str(out.resolve())]
    assert first[3:] == ["--cell", "teacher/f1/s0", "--ledger", str(out.resolve() / "ledgers" / "teacher-f1-s0.jsonl")]
    assert {shlex.split(x)[4] for x in students} == {"hard/f1/s0", "soft+mse/f1/s0", "hard/f1/s1", "soft+mse/f1/s1"}
    slurm = (out / "plan" / "slurm.sh").read_text()
    assert "--array=1-2 cell.sbatch teachers.txt" in slurm and "--dependency=afterany:$T --array=1-4" in slurm

    res = CliRunner().invoke(app, ["study", str(out), "--cell", "hard/f1/s0"])  # its teacher has not run
    assert res.exit_code == 1
    assert "teacher/f1/s0 has not finished" in Ledger(out / "ledger.jsonl").read()[-1]["error"]

    res = CliRunner().invoke(app, first[1:])  # one scheduler job, as the plan wrote it
    assert res.exit_code == 0, res.output
    assert Ledger(out / "ledgers" / "teacher-f1-s0.jsonl").read()[0]["status"] == "ok"
    assert study_records(out)[("teacher", 1, 0)]["status"] == "ok"  # the ledgers are merged
    CliRunner().invoke(app, ["study", str(out), "--plan"])
    assert len((out / "plan" / "teachers.txt").read_text().splitlines()) == 1

    res = CliRunner().invoke(app, ["study", str(out), "--dry-run"])
    assert res.exit_code == 0 and "1 done, 5 to run" in res.output
    res = CliRunner().invoke(app, ["study", str(out), "--cell", "hard/f9/s0"])
    assert res.exit_code == 2 and "not a cell of study tiny" in res.output


@pytest.mark.parametrize("bad, message", [
    ("configs: [teacher, best]", "'best' is not teacher"), ("folds: 1-x", "cannot read '1-x'"),
    ("configs: [teacher, hard+pdf@pool]", "no variant 'pool'"),
    ("configs: [teacher, hard@pool]\nvariants: {pool: [distill.unlabeled=rest]}", "learns from labels only")])
def test_bad_study_recipe(tmp_path: Path, bad: str, message: str):
    (tmp_path / "s.yaml").write_text(f"teacher: train/synthetic_teacher\nstudent: distill/synthetic\n{bad}\n")
    res = CliRunner().invoke(app, ["study", str(tmp_path / "s.yaml"), "--dry-run"])
    assert res.exit_code == 2 and message in res.output and "s.yaml:3" in res.output


def test_quickstart_reduced(tmp_path: Path):
    out = tmp_path / "qs"
    res = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--images", "24", "--test-images", "6",
                                   "--teacher-epochs", "1", "--student-epochs", "1", "--students", "hard", "--force"],
                             terminal_width=200)
    assert res.exit_code == 0, res.output
    recs = study_records(out / "study")
    assert {k[0] for k, r in recs.items() if r["status"] == "ok"} == {"teacher", "hard"}
    for name in ("table.md", "table.csv", "table.tex", "gains.md", "boxplot.png", "boxplot.svg"):
        assert (out / "study" / name).is_file(), name
    test = json.loads((out / "datasets" / "synthetic-vehicle12" / "annotations" / "fold01_test.json").read_text())
    assert len(test["images"]) >= 6 + 2  # the fold's share of the 24 scenes, and the 6 extra test scenes
    assert "box plot" in res.output and "teacher mAP50" in res.output
    lo, hi = recs[("hard", 1, 0)]["metrics"]["mAP50_ci95"]
    assert 0 <= lo <= hi <= 1
    assert "95 % bootstrap interval over the split's images" in (out / "study" / "table.md").read_text()


def test_quickstart_pairs_build_the_pretrained_lite_pair(tmp_path: Path):
    """`--pair lite`: the Lite2 + PAFPN teacher and Lite0 + FPN students with ImageNet weights, their trunks in
    BatchNorm (GroupNorm only in neck and head); `resnet` keeps the overrides of earlier versions (finished
    quickstart cells stay valid)."""
    from kdcli.config.schema import StudyConfig
    from kdcli.study import quickstart as qs
    from kdcli.study.grid import Study

    assert qs.PAIRS["resnet"] == (qs.SETTINGS, [], [])
    shared, teacher, student = qs.PAIRS["lite"]
    cfg = StudyConfig(name="q", dataset=str(tmp_path), teacher="train/synthetic_teacher", student="distill/synthetic",
                      configs=["teacher", "hard"], folds=[1], seeds=[0], overrides=shared,
                      teacher_overrides=teacher, student_overrides=student)
    s = Study.create(cfg, tmp_path / "s")
    t_cell, s_cell = s.cells()
    assert s.check_recipes() == 2  # what `kdcli quickstart` resolves before any cell runs
    t = s.teacher_recipe(t_cell).model
    st = s.student_recipe(s_cell, tmp_path / "t.pt", {"data": {"path": str(tmp_path)}}).model
    assert (t.backbone, t.neck, t.channels, t.pretrained, t.backbone_norm) == ("efficientnet_lite2", "pafpn", 128,
                                                                               True, "bn")
    assert (st.backbone, st.neck, st.channels, st.pretrained) == ("efficientnet_lite0", "fpn", 64, True)
    assert t.trunk_freeze_bn and st.trunk_freeze_bn and t.norm == st.norm == "gn"


@pytest.mark.parametrize("recipe, cells, teachers", [("study/vedai25_paper", 200, 20), ("study/synthetic", 40, 4),
                                                    ("study/synthetic_gpu", 24, 4),
                                                    ("study/synthetic_unlabeled", 8, 1),
                                                    ("study/synthetic_unlabeled_same", 8, 1),
                                                    ("study/drone_cars", 28, 4), ("study/drone_cars_hires", 24, 4),
                                                    ("study/drone_cars_128", 24, 4)])
def test_shipped_study_recipes_expand(recipe: str, cells: int, teachers: int, tmp_path: Path):
    from kdcli.config.schema import PAPER_CONFIGS
    from kdcli.study.grid import Study

    s = Study.open(recipe, tmp_path / "s")
    expected = {"study/synthetic_gpu": PAPER_CONFIGS[:6],
                "study/synthetic_unlabeled": ["teacher", "hard", "hard@long", "hard@full", "hard+soft",
                                              "hard+soft@pool", "hard+crosskd+pdf@pool", "soft@pool"],
                "study/synthetic_unlabeled_same": ["teacher", "hard", "hard@long", "hard+soft", "hard+soft@pool",
                                                   "hard+soft@strong", "hard+soft@weighted", "hard+crosskd+pdf@pool"],
                "study/drone_cars": ["teacher", "hard", "hard+pdf", "hard+crosskd+pdf", "hard@scarce",
                                     "hard+pdf@scarce", "hard+pdf@scarcepool"],
                "study/drone_cars_hires": ["teacher", "hard", "hard+pdf", "hard@scarce", "hard+pdf@scarce",
                                           "hard+pdf@scarcepool"],
                "study/drone_cars_128": ["teacher", "hard", "hard+pdf", "hard@scarce", "hard+pdf@scarce",
                                         "hard+pdf@scarcepool"],
                }.get(recipe, PAPER_CONFIGS)
    assert s.cfg.configs == expected
    for cell in s.cells():  # every cell's recipe loads (variants included)
        if cell.is_teacher:
            s.teacher_recipe(cell)
    assert len(s.cells()) == cells and sum(c.is_teacher for c in s.cells()) == teachers
    assert Path(s.cfg.teacher).is_file() and Path(s.cfg.student).is_file()
    if recipe == "study/drone_cars_hires":  # the teacher at twice the student's pixels, strides and anchors
        from kdcli.study.grid import Cell

        t = s.teacher_recipe(Cell("teacher", 1, 0))
        st = s.student_recipe(Cell("hard+pdf", 1, 0), tmp_path / "t.pt", {"data": {**t.data.model_dump()}})
        assert (t.data.imgsz, t.data.anchor_size, t.model.maxpool, t.model.levels) == (512, 32, True, 4)
        assert (st.data.imgsz, st.data.anchor_size, st.model.maxpool, st.model.levels) == (256, 16, False, 4)
    if recipe == "study/drone_cars_128":  # students at half the teacher's pixels; the teacher is drone_cars.yaml's
        from kdcli.config import load
        from kdcli.models.detector import default_levels
        from kdcli.study.grid import Cell

        t = s.teacher_recipe(Cell("teacher", 2, 0))
        st = s.student_recipe(Cell("hard+pdf", 2, 0), tmp_path / "t.pt", {"data": {**t.data.model_dump()}})
        assert (t.data.imgsz, t.data.anchor_size, t.model.maxpool) == (256, 16, True)
        assert (st.data.imgsz, st.data.anchor_size, st.model.maxpool) == (128, 8, False)
        assert default_levels(256) == default_levels(128) == 4 and t.model.levels is st.model.levels is None
        same = Study.open("study/drone_cars", tmp_path / "d").teacher_recipe(Cell("teacher", 2, 0))
        assert load.dump(t) == load.dump(same)


def test_cells_share_gpus_and_cpus(tmp_path: Path):
    from kdcli.study.runner import share_out

    slots, threads, workers = share_out(1, ["0", "1"], 3, 16)
    assert slots == ["0", "0", "0", "1", "1", "1"] and threads == 2 and workers == 1
    assert share_out(1, ["0"], 4, 16) == (["0"] * 4, 4, 3)
    assert share_out(2, None, 1, 2) == ([None, None], 1, None)  # CPU jobs keep their recipe's loader workers
    assert share_out(1, None, 1, 8) == ([None], None, None)  # one cell: torch's own thread count
    res = CliRunner().invoke(app, ["study", "study/synthetic", "--per-device", "2", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "--per-device shares GPUs" in res.output


def test_cell_command_carries_device_and_workers(tmp_path: Path, vedai25: Path):
    from kdcli.study.grid import Cell, Study
    from kdcli.study.runner import cell_command

    s = Study.open(str(tiny_study(tmp_path, vedai25, "teacher, hard")), tmp_path / "s")
    cmd = cell_command(s, Cell("hard", 1, 0), device="0", workers=3)
    assert cmd[-4:] == ["--device", "0", "--workers", "3"]
    res = CliRunner().invoke(app, ["study", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "s"), "--cell",
                                   "teacher/f1/s0", "--workers", "0"])
    assert res.exit_code == 0, res.output
    args = (tmp_path / "s" / "runs" / "teacher-f1-s0" / "args.yaml").read_text()
    assert "workers: 0" in args
    progress = json.loads((tmp_path / "s" / "runs" / "teacher-f1-s0" / "progress.json").read_text())
    assert progress["epoch"] == 1 and progress["images_per_s"] > 0


def test_new_variants_grow_a_study_changed_ones_are_refused(tmp_path: Path, vedai25: Path):
    from kdcli.errors import KdcliError
    from kdcli.study.grid import Study

    recipe = tiny_study(tmp_path, vedai25, "teacher, hard, soft@pool",
                        extra="variants: {pool: [distill.unlabeled=rest, data.label_fraction=0.5]}\n")
    out = tmp_path / "v"
    Study.open(recipe, out).save()
    grown = Study.open(out, overrides=["variants={pool: [distill.unlabeled=rest, data.label_fraction=0.5], "
                                       "strong: [distill.pool_view=strong]}", "configs=[teacher, soft@strong]"])
    assert [c.config for c in grown.cells()] == ["teacher", "soft@strong"]
    with pytest.raises(KdcliError, match="different variants"):
        Study.open(out, overrides=["variants={pool: [distill.unlabeled=rest]}"])


def test_a_study_takes_another_studys_teachers(tmp_path: Path, vedai25: Path):
    first = tmp_path / "a"
    res = CliRunner().invoke(app, ["study", str(tiny_study(tmp_path, vedai25, "teacher")), "--out", str(first)])
    assert res.exit_code == 0, res.output
    teacher = study_records(first)[("teacher", 1, 0)]
    second = tmp_path / "b"  # other students, the same teacher recipe: nothing to train for the teacher
    recipe = tiny_study(tmp_path, vedai25, "teacher, hard", extra="student_overrides: [train.lr=0.02]\n")
    res = CliRunner().invoke(app, ["study", str(recipe), "--out", str(second), "--teachers-from", str(first),
                                   "--dry-run"])
    assert res.exit_code == 0 and "teacher/f1/s0: would be taken from" in res.output, res.output
    assert not (second / "ledger.jsonl").exists()
    res = CliRunner().invoke(app, ["study", str(recipe), "--out", str(second), "--teachers-from", str(first)])
    assert res.exit_code == 0, res.output
    recs = study_records(second)
    assert recs[("teacher", 1, 0)]["adopted_from"] == str(first.resolve())
    assert recs[("teacher", 1, 0)]["metrics"] == teacher["metrics"]
    assert recs[("hard", 1, 0)]["teacher"] == teacher["weights"]  # distilled from the first study's best.pt
    assert not (second / "runs" / "teacher-f1-s0").exists() and len(ledger_lines(second)) == 2
    res = CliRunner().invoke(app, ["study", str(second), "--teachers-from", str(first)])  # taken once only
    assert res.exit_code == 0 and len(ledger_lines(second)) == 2, res.output

    other = tiny_study(tmp_path, vedai25, "teacher, hard", extra="teacher_overrides: [train.epochs=2]\n")
    res = CliRunner().invoke(app, ["study", str(other), "--out", str(tmp_path / "c"), "--teachers-from", str(first)])
    assert res.exit_code == 2 and "train.epochs (2 here, 1 there)" in res.output, res.output
    assert not (tmp_path / "c" / "runs").exists()
    weights = Path(teacher["weights"])
    weights.rename(weights.with_suffix(".moved"))
    recipe = tiny_study(tmp_path, vedai25, "teacher, hard")  # the same teacher recipe again
    res = CliRunner().invoke(app, ["study", str(recipe), "--out", str(tmp_path / "d"), "--teachers-from", str(first)])
    assert res.exit_code == 2 and "weights" in res.output and "are missing" in res.output, res.output
    res = CliRunner().invoke(app, ["study", str(second), "--cell", "hard/f1/s0", "--teachers-from", str(first)])
    assert res.exit_code == 2 and "not to --cell" in res.output, res.output
    for bad, message in ((first, "that is this study"), (tmp_path / "none", "not a study directory")):
        res = CliRunner().invoke(app, ["study", str(first), "--teachers-from", str(bad)])
        assert res.exit_code == 2 and message in res.output, res.output
