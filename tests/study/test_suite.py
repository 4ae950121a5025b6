"""`kdcli benchmark --suite gpu` at tiny size on the CPU: every stage runs, every file is written, every target has
a value and a verdict (the GPU run uses the same code at full size)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kdcli.cli.app import app


@pytest.mark.slow
def test_gpu_suite_tiny_on_cpu(tmp_path: Path):
    out = tmp_path / "suite"
    res = CliRunner().invoke(app, ["benchmark", "--suite", "gpu", "--out", str(out), "--device", "cpu", "--tiny",
                                   "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary == json.loads((out / "summary.json").read_text())
    names = [t["target"] for t in summary["targets"]]
    assert names == ["student_vs_torchvision", "kd_step_ratio_hard_pdf", "kd_step_ratio_hard_crosskd",
                     "assign_loss_share", "step_vs_epoch", "first_step_s", "study_24_cells_min"]
    assert all(isinstance(t["value"], float) and isinstance(t["pass"], bool) for t in summary["targets"])
    assert summary["measured"] == 7 and 0 <= summary["passed"] <= 7
    stages = json.loads((out / "suite.json").read_text())["stages"]
    assert [r["row"] for r in stages["steps"]["distill"]["rows"]] == ["hard", "hard+pdf", "hard+crosskd"]
    assert stages["study"]["cells"] == 8 and stages["study"]["failed"] == 0
    assert set(stages["study"]["table"]) == {"teacher", "hard", "hard+pdf", "hard+crosskd"}
    assert "| hard+crosskd |" in (out / "study_table.md").read_text()
    assert (out / "study_gains.md").is_file() and (out / "study" / "boxplot.png").is_file()
    # KD ratios: the median of >= 5 same-round ratios, with their spread; the study timed here, all of it
    kd = [t for t in summary["targets"] if t["target"].startswith("kd_step_ratio")]
    assert all(t["spread"]["n"] >= 5 and t["spread"]["min"] <= t["value"] <= t["spread"]["max"] for t in kd)
    assert stages["study"]["cells_run"] == 8 and "note" not in stages["study"]
    # a second call into the same folder would reuse the 8 cells untimed: refused, the first summary kept
    before = (out / "summary.json").read_bytes()
    res = CliRunner().invoke(app, ["benchmark", "--suite", "gpu", "--out", str(out), "--device", "cpu", "--tiny"])
    assert res.exit_code == 2 and "the folder is not empty" in res.output
    assert (out / "summary.json").read_bytes() == before


def test_suite_needs_an_out_dir_and_knows_one_suite(tmp_path: Path):
    res = CliRunner().invoke(app, ["benchmark", "--suite", "gpu"])
    assert res.exit_code == 2 and "--suite needs --out DIR" in res.output
    res = CliRunner().invoke(app, ["benchmark", "--suite", "tpu", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "the one suite is gpu" in res.output and not (tmp_path / "x").exists()


def test_force_empties_an_earlier_suites_out_and_only_such_a_folder(tmp_path: Path):
    from kdcli.errors import KdcliError
    from kdcli.study.suite import claim_out

    out = tmp_path / "suite"
    (out / "study" / "runs").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "study" / "ledger.jsonl").write_text('{"config": "teacher"}\n')
    with pytest.raises(KdcliError, match="the folder is not empty"):
        claim_out(out)
    assert (out / "study" / "ledger.jsonl").is_file()  # refused: nothing touched
    claim_out(out, force=True)
    assert out.is_dir() and not any(out.iterdir())  # a fresh start: no cell of the earlier call is reused
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(KdcliError, match="not the folder of an earlier suite"):
        claim_out(mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep"


def test_no_target_is_judged_from_work_the_call_did_not_time():
    from kdcli.study.suite import study_note, summary

    assert study_note(8, 8, 0) is None
    assert study_note(8, 0, 0) == "not projected: 8 of 8 cells were finished before this call (not timed)"
    assert study_note(8, 8, 2) == "not projected: 2 of 8 cells failed"
    spread = {"min": 1.1, "q1": 1.12, "q3": 1.2, "max": 1.3, "n": 5}
    steps = {"distill": {"rows": [{"row": "hard", "time_ratio": 1.0},
                                  {"row": "hard+pdf", "time_ratio": 1.15, "time_ratio_spread": spread}]}}
    s = summary({"stages": {"steps": steps, "study": {"projected_24_cells_min": None,
                                                      "note": study_note(8, 0, 0)}}})
    t = {x["target"]: x for x in s["targets"]}
    assert t["study_24_cells_min"]["value"] is None and t["study_24_cells_min"]["pass"] is None
    assert t["study_24_cells_min"]["note"].startswith("not projected: 8 of 8 cells")
    assert t["kd_step_ratio_hard_pdf"]["value"] == 1.15 and t["kd_step_ratio_hard_pdf"]["spread"] == spread
    assert s["measured"] == 1 and s["passed"] == 1
