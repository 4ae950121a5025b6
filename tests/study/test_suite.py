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


def test_suite_needs_an_out_dir_and_knows_one_suite(tmp_path: Path):
    res = CliRunner().invoke(app, ["benchmark", "--suite", "gpu"])
    assert res.exit_code == 2 and "--suite needs --out DIR" in res.output
    res = CliRunner().invoke(app, ["benchmark", "--suite", "tpu", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "the one suite is gpu" in res.output and not (tmp_path / "x").exists()
