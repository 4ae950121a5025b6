"""`kdcli report` on a fixture ledger with fixed numbers: the paper's cell, tables in three formats, gains with
the paired tests, and the box plot files."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app

# (config, fold, seed) -> mAP50: two folds x three seeds
VALUES = {
    ("teacher", 1, 0): 0.60, ("teacher", 2, 0): 0.50, ("teacher", 1, 1): 0.62, ("teacher", 2, 1): 0.54,
    ("teacher", 1, 2): 0.58, ("teacher", 2, 2): 0.40,
    ("hard", 1, 0): 0.30, ("hard", 2, 0): 0.20, ("hard", 1, 1): 0.34, ("hard", 2, 1): 0.22,
    ("hard", 1, 2): 0.28, ("hard", 2, 2): 0.10,
    ("hard+pdf", 1, 0): 0.33, ("hard+pdf", 2, 0): 0.21, ("hard+pdf", 1, 1): 0.36, ("hard+pdf", 2, 1): 0.27,
    ("hard+pdf", 1, 2): 0.27, ("hard+pdf", 2, 2): 0.14,
}


def write_study(d: Path, name: str = "toy", values: dict = VALUES, failed: tuple = ()) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "study.yaml").write_text(f"name: {name}\nteacher: t.yaml\nstudent: s.yaml\n"
                                  "configs: [teacher, hard, hard+pdf]\nfolds: [1, 2]\nseeds: [0, 1, 2]\n")
    lines = [json.dumps({"config": c, "fold": f, "seed": s, "status": "ok", "finished": "2026-01-01T00:00:00",
                         "metrics": {"mAP50": v, "mAP50-95": v / 2, "coco_AP50": v, "val_mAP50": v}})
             for (c, f, s), v in values.items()]
    lines += [json.dumps({"config": c, "fold": f, "seed": s, "status": "failed", "error": "boom",
                          "finished": "2026-01-01T00:00:00"}) for c, f, s in failed]
    (d / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_report_tables_gains_and_plot(tmp_path: Path):
    from scipy.stats import wilcoxon

    d = write_study(tmp_path / "toy")
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    (s,) = rep["studies"]
    # teacher: per-seed fold means 0.55, 0.58, 0.49 -> median 0.55, min 0.49, max 0.58
    assert s["table"]["teacher"]["median"] == pytest.approx(0.55)
    assert (s["table"]["teacher"]["min"], s["table"]["teacher"]["max"]) == pytest.approx((0.49, 0.58))
    assert s["table"]["hard"]["median"] == pytest.approx(0.25)  # 0.25, 0.28, 0.19
    g = s["gains"]["hard+pdf"]
    diffs = [VALUES[("hard+pdf", f, sd)] - VALUES[("hard", f, sd)] for f in (1, 2) for sd in (0, 1, 2)]
    assert g["pairs"] == 6 and g["mean_gain"] == pytest.approx(np.mean(diffs))
    assert g["ci95"][0] <= g["mean_gain"] <= g["ci95"][1]
    assert g["wilcoxon"]["p"] == pytest.approx(wilcoxon(diffs).pvalue, rel=1e-6)
    assert g["win_rate"] == pytest.approx(5 / 6)

    md = (d / "table.md").read_text()
    assert "| teacher | **55.0 (49.0–58.0)** |" in md and "| hard | 25.0 (19.0–28.0) |" in md
    rows = list(csv.DictReader((d / "table.csv").read_text().splitlines()))
    assert [r["config"] for r in rows] == ["teacher", "hard", "hard+pdf"]
    assert float(rows[2]["median"]) == pytest.approx(0.27)  # 0.27, 0.315, 0.205 and rows[1]["gain_mean"] == ""
    assert r"\textbf{55.0 (49.0--58.0)}" in (d / "table.tex").read_text()
    assert "Wilcoxon" in (d / "gains.md").read_text()
    with Image.open(d / "boxplot.png") as im:
        assert im.size[0] > 400 and im.size[1] > 300
    assert (d / "boxplot.svg").read_text().lstrip().startswith("<?xml")


def test_report_merges_dirs_of_one_study_and_columns_per_study(tmp_path: Path):
    half1 = {k: v for k, v in VALUES.items() if k[2] < 2}
    half2 = {k: v for k, v in VALUES.items() if k[2] == 2}
    a = write_study(tmp_path / "a", values=half1)
    b = write_study(tmp_path / "b", values=half2, failed=[("hard", 3, 0)])
    other = write_study(tmp_path / "c", name="other", values={k: v + 0.1 for k, v in VALUES.items()})
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["report", str(a), str(b), str(other), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [s["name"] for s in rep["studies"]] == ["toy", "other"]
    assert rep["studies"][0]["table"]["teacher"]["median"] == pytest.approx(0.55)  # merged = the whole study
    assert rep["studies"][0]["failed"] == ["hard/f3/s0"]
    assert rep["studies"][1]["table"]["teacher"]["median"] == pytest.approx(0.65)
    assert (out / "boxplot_toy.png").is_file() and (out / "boxplot_other.svg").is_file()
    header = (out / "table.md").read_text().splitlines()[0]
    assert header == "| mAP50 (%) | toy | other |"


def test_report_errors(tmp_path: Path):
    res = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "not a study directory" in res.output
    d = write_study(tmp_path / "empty", values={})
    res = CliRunner().invoke(app, ["report", str(d)])
    assert res.exit_code == 2 and "no finished cells" in res.output
    d = write_study(tmp_path / "toy")
    res = CliRunner().invoke(app, ["report", str(d), "--metric", "accuracy"])
    assert res.exit_code == 2 and "unknown metric" in res.output


def test_the_baseline_comes_from_the_study_or_the_option_and_must_be_a_row(tmp_path: Path):
    d = write_study(tmp_path / "toy")
    (d / "study.yaml").write_text((d / "study.yaml").read_text() + "baseline: hard+pdf\n")
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    g = rep["studies"][0]["gains"]
    assert rep["baseline"] == "hard+pdf" and set(g) == {"teacher", "hard"}
    diffs = [VALUES[("hard", f, sd)] - VALUES[("hard+pdf", f, sd)] for f in (1, 2) for sd in (0, 1, 2)]
    assert g["hard"]["mean_gain"] == pytest.approx(np.mean(diffs))
    res = CliRunner().invoke(app, ["report", str(d), "--baseline", "hard", "--json"])  # the option wins
    assert json.loads(res.stdout)["baseline"] == "hard"
    res = CliRunner().invoke(app, ["report", str(d), "--baseline", "hard@long"])
    assert res.exit_code == 2 and "--baseline hard@long: no finished cell" in res.output
    (d / "study.yaml").write_text((d / "study.yaml").read_text().replace("hard+pdf\n", "hard@long\n"))
    res = CliRunner().invoke(app, ["report", str(d)])
    assert res.exit_code == 2 and "baseline 'hard@long' is not one of the configs" in res.output


def test_report_skips_ledger_lines_of_the_wrong_shape(tmp_path: Path):
    d = write_study(tmp_path / "toy")
    bad = ['{"config": 5}', "[1, 2]", '"hard"',
           '{"config": "hard", "fold": 1, "seed": 0, "status": "ok", "metrics": {"mAP50": "0.9"}}',
           '{"config": "hard", "fold": 1, "seed": 1, "status": "ok"}']
    text = (d / "ledger.jsonl").read_text().splitlines()
    (d / "ledger.jsonl").write_text("\n".join(text[:3] + bad + text[3:]) + "\n")
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    assert all(f"ledger.jsonl:{n}: ledger line skipped" in res.stderr for n in range(4, 9))
    s = json.loads(res.stdout)["studies"][0]
    assert s["table"]["hard"]["median"] == pytest.approx(0.25)  # the bad lines changed nothing


def test_a_nan_metric_is_left_out_counted_and_shown_as_n_a(tmp_path: Path):
    values = {**VALUES, ("hard+pdf", 2, 2): float("nan"), **{k: float("nan") for k in VALUES if k[0] == "teacher"}}
    d = write_study(tmp_path / "toy", values=values)
    res = CliRunner().invoke(app, ["report", str(d)], terminal_width=200)
    assert res.exit_code == 0, res.output
    printed = " ".join(res.output.split())
    assert not re.search(r"\bnan\b", printed.replace(str(tmp_path), ""), re.I)  # no "+nan" gain, no "nan" cell
    assert "mAP50 not a finite number in 7 cell(s), left out: teacher/f1/s0" in printed and "hard+pdf/f2/s2" in printed
    rep = json.loads((d / "report.json").read_text())
    (s,) = rep["studies"]
    diffs = [VALUES[("hard+pdf", f, sd)] - VALUES[("hard", f, sd)] for f in (1, 2) for sd in (0, 1, 2) if (f, sd)
             != (2, 2)]
    assert s["gains"]["hard+pdf"]["pairs"] == 5 and s["gains"]["hard+pdf"]["mean_gain"] == pytest.approx(np.mean(diffs))
    # seed 2 of hard+pdf has fold 1 only: its per-seed mean is 0.27; seeds 0, 1: 0.27, 0.315 -> median 0.27
    assert s["table"]["hard+pdf"]["median"] == pytest.approx(0.27) and s["cells_done"] == 11
    assert s["not_finite"] == {"teacher": [f"f{f}/s{sd}" for f in (1, 2) for sd in (0, 1, 2)], "hard+pdf": ["f2/s2"]}
    md = (d / "table.md").read_text()
    assert "| teacher | n/a |" in md and not re.search(r"\bnan\b", md, re.I)
    rows = {r["config"]: r for r in csv.DictReader((d / "table.csv").read_text().splitlines())}
    assert rows["teacher"]["median"] == "" and rows["teacher"]["cells_not_finite"] == "6"
    assert rows["hard+pdf"]["cells_not_finite"] == "1" and float(rows["hard+pdf"]["gain_mean"]) == pytest.approx(
        np.mean(diffs), abs=1e-6)
    every = write_study(tmp_path / "all", values={k: float("nan") for k in VALUES})
    res = CliRunner().invoke(app, ["report", str(every)], terminal_width=200)
    assert res.exit_code == 2 and "not a finite number (NaN) in every finished cell (18)" in res.output, res.output


def test_report_names_labels_and_pool_per_row_and_what_the_pool_adds(tmp_path: Path):
    d = tmp_path / "pool"
    d.mkdir()
    (d / "study.yaml").write_text("name: pool\nteacher: t.yaml\nstudent: s.yaml\n"
                                  "configs: [teacher, hard, hard+pdf, hard+pdf@pool, soft@pool]\n"
                                  "folds: [1, 2]\nseeds: [0]\n"
                                  "variants: {pool: [distill.unlabeled=rest]}\n")
    gains = {1: 0.04, 2: 0.02}  # what the pool adds to hard+pdf, per fold
    lines = []
    for f in (1, 2):
        for c, v, frac, pool in (("teacher", 0.8, 1.0, None), ("hard", 0.5, 0.25, None),
                                 ("hard+pdf", 0.55, 0.25, None), ("hard+pdf@pool", 0.55 + gains[f], 0.25, "rest"),
                                 ("soft@pool", 0.52, 0.25, "rest")):
            lines.append(json.dumps({"config": c, "fold": f, "seed": 0, "status": "ok", "finished": "2026-01-01",
                                     "metrics": {"mAP50": v, "mAP50-95": v, "coco_AP50": v, "val_mAP50": v},
                                     "data": {"label_fraction": frac, "labeled_images": int(400 * frac),
                                              "unlabeled": pool, "unlabeled_images": 300 if pool else 0}}))
    (d / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    (s,) = json.loads(res.stdout)["studies"]
    assert s["data"]["hard"] == {"labels": "25 % (100 images)", "pool": "none"}
    assert s["data"]["hard+pdf@pool"]["pool"] == "rest (300 images)"
    assert s["data"]["teacher"]["labels"] == "100 % (400 images)"
    assert s["data"]["soft@pool"] == {"labels": "none (soft targets only)", "pool": "rest (300 images)"}
    tw = s["twin_gains"]["hard+pdf@pool"]
    assert tw["twin"] == "hard+pdf" and tw["pairs"] == 2 and tw["mean_gain"] == pytest.approx(0.03)
    res = CliRunner().invoke(app, ["report", str(d), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "rep" / "table.md").read_text()
    assert "| hard+pdf@pool | 25 % (100 images) | rest (300 images) |" in table
    assert "| hard | 25 % (100 images) | none |" in table
    gains_md = (tmp_path / "rep" / "gains.md").read_text()
    assert "| hard+pdf@pool | hard+pdf | 2 | +3.00 |" in gains_md
    rows = {r["config"]: r for r in csv.DictReader((tmp_path / "rep" / "table.csv").read_text().splitlines())}
    assert rows["hard+pdf@pool"]["twin"] == "hard+pdf" and float(rows["hard+pdf@pool"]["twin_gain_mean"]) == 0.03


def test_one_fold_box_plot_has_one_panel_not_an_identical_average(tmp_path: Path):
    import matplotlib

    one = {k: v for k, v in VALUES.items() if k[1] == 1}
    d = write_study(tmp_path / "one", values=one)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text in the SVG
        res = CliRunner().invoke(app, ["report", str(d)])
        assert res.exit_code == 0, res.output
        svg = (d / "boxplot.svg").read_text()
        assert "fold 1" in svg and "average" not in svg
        res = CliRunner().invoke(app, ["report", str(write_study(tmp_path / "two"))])
        assert "average" in (tmp_path / "two" / "boxplot.svg").read_text()


def test_cells_of_an_earlier_larger_grid_are_counted_apart(tmp_path: Path):
    d = write_study(tmp_path / "toy")
    (d / "study.yaml").write_text("name: toy\nteacher: t.yaml\nstudent: s.yaml\nconfigs: [teacher, hard]\n"
                                  "folds: [1]\nseeds: [0, 1]\n")  # the grid shrank after 18 cells were done
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    (s,) = json.loads(res.stdout)["studies"]
    assert (s["cells_done"], s["cells_expected"], s["cells_other"]) == (4, 4, 14)
    assert "4/4 cells of the grid (and 14 of an earlier grid)" in (d / "table.md").read_text()


def test_a_single_pair_gives_a_gain_without_an_interval(tmp_path: Path):
    """Resampling one difference only repeats it: the gain has no interval, not a [g, g] one."""
    one = {k: v for k, v in VALUES.items() if k[1:] == (1, 0)}
    d = write_study(tmp_path / "one", values=one)
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    g = json.loads(res.stdout)["studies"][0]["gains"]["hard+pdf"]
    assert g["pairs"] == 1 and g["mean_gain"] == pytest.approx(0.03) and g["ci95"] is None
    assert "| hard+pdf | 1 | +3.00 | - (1 pair) |" in (d / "gains.md").read_text()
    row = next(r for r in csv.DictReader((d / "table.csv").read_text().splitlines()) if r["config"] == "hard+pdf")
    assert float(row["gain_mean"]) == pytest.approx(0.03) and row["gain_ci_low"] == row["gain_ci_high"] == ""
    assert "- (1 pair)" in CliRunner().invoke(app, ["report", str(d)]).stdout


def test_a_half_finished_study_says_what_it_lacks(tmp_path: Path):
    """Failed cells, cells not finished, a baseline without a finished cell and rows without a pair: one line each,
    printed and in the written tables' notes; a complete study says none of it."""
    half = {("teacher", 1, 0): 0.6, ("teacher", 2, 0): 0.5, ("hard+pdf", 1, 0): 0.3}
    d = write_study(tmp_path / "half", values=half, failed=[("hard", 1, 0)])
    (d / "study.yaml").write_text((d / "study.yaml").read_text().replace("seeds: [0, 1, 2]", "seeds: [0]"))
    res = CliRunner().invoke(app, ["report", str(d)], terminal_width=300)
    assert res.exit_code == 0, res.output
    said = [
        "toy: 1 cell(s) failed, left out of every number: hard/f1/s0",
        "toy: 2 of 6 cells not finished: hard/f2/s0, hard+pdf/f2/s0 (rows with fewer cells than the grid stand on "
        "fewer folds or seeds)",
        "toy: no gains: the baseline hard has no finished cell"]
    lines = res.output.splitlines()
    for text in said:
        assert sum(text in x for x in lines) == 1, res.output
        for name in ("table.md", "gains.md", "table.tex"):
            assert text in (d / name).read_text(), name

    # the baseline finished on fold 2 only: hard+pdf (fold 1) has no pair with it
    half[("hard", 2, 0)] = 0.2
    d = write_study(tmp_path / "nopair", values=half)
    (d / "study.yaml").write_text((d / "study.yaml").read_text().replace("seeds: [0, 1, 2]", "seeds: [0]"))
    res = CliRunner().invoke(app, ["report", str(d)], terminal_width=300)
    text = "toy: no gain for hard+pdf: no fold and seed where both it and hard finished"
    assert text in res.output and text in (d / "gains.md").read_text(), res.output
    assert "no gains" not in res.output and "failed" not in res.output

    d = write_study(tmp_path / "whole")
    res = CliRunner().invoke(app, ["report", str(d)], terminal_width=300)
    assert not any(w in res.output for w in ("failed", "not finished", "no gain")), res.output


def test_per_pair_gains_over_the_same_test_images(tmp_path: Path):
    """Cells that saved their test detections get, per fold and seed, a gain with its paired interval over test
    images and the share of the teacher's lead it closes; a pooled row is also measured against the row with the
    same labelled share and no pool; a cell without detections is named, not dropped silently."""
    from kdcli.engine import detfile
    from kdcli.engine.metrics import Detections, ground_truth, voc_per_class

    ids = list(range(1, 41))
    anns = [{"image_id": i, "category_id": 1, "bbox": [x, 10.0, 12, 12]} for i in ids for x in (5.0, 40.0, 80.0)]
    gt_json = {"images": [{"id": i} for i in ids], "annotations": anns}

    def dets(found: float, seed: int) -> Detections:
        r = np.random.default_rng(seed)
        keep = [a for a in anns if r.random() < found]
        fps = [(i, [r.uniform(0, 90), 60.0, 10, 10]) for i in ids if r.random() < 0.5]
        rows = [(a["image_id"], r.uniform(0.5, 1), [a["bbox"][0] + r.uniform(0, 3), *a["bbox"][1:]])  # a little off
                for a in keep] + [(i, r.uniform(0, 0.9), b) for i, b in fps]
        return Detections(np.array([x[0] for x in rows]), np.zeros(len(rows), np.int64),
                          np.array([x[1] for x in rows]),
                          np.array([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for _, _, b in rows], float))

    found = {"teacher": 0.95, "hard": 0.6, "hard+pdf": 0.8, "hard@scarce": 0.4, "hard+pdf@scarce": 0.45,
             "hard+pdf@scarcepool": 0.7}
    d = tmp_path / "real"
    d.mkdir()
    (d / "study.yaml").write_text("name: real\nteacher: t.yaml\nstudent: s.yaml\nconfigs: [teacher, hard, hard+pdf, "
                                  "hard@scarce, hard+pdf@scarce, hard+pdf@scarcepool]\nfolds: [1]\nseeds: [0, 1]\n"
                                  "variants: {scarce: [data.label_fraction=0.1], scarcepool: "
                                  "[data.label_fraction=0.1, distill.unlabeled=rest]}\n")
    lines, maps = [], {}
    for seed in (0, 1):
        for c, f in found.items():
            run = d / "runs" / f"{c}-f1-s{seed}"
            run.mkdir(parents=True)
            det = dets(f, seed * 10 + len(c))
            maps[(c, seed)] = float(np.nanmean(voc_per_class(det, ground_truth(gt_json), 1)))
            if c in ("teacher", "hard"):  # val curves: the teacher flat, the hard student still rising at s0
                curve = [0.5, 0.7, 0.8, 0.8, 0.805, 0.81, 0.812, 0.812] if c == "teacher" or seed else \
                    [0.1 * k for k in range(1, 9)]
                (run / "results.csv").write_text("epoch,mAP50\n" + "".join(f"{k},{v}\n" for k, v in enumerate(curve)))
            if (c, seed) != ("hard+pdf", 1):  # this one finished before cells saved their detections
                detfile.save(detfile.path_for(run, "test"), det, gt_json, 1)
            pool = "rest" if "pool" in c else None
            lines.append(json.dumps({"config": c, "fold": 1, "seed": seed, "status": "ok", "finished": "2026-01-01",
                                     "split": "test", "run_dir": str(run),
                                     "metrics": {k: maps[(c, seed)] for k in ("mAP50", "mAP50-95", "coco_AP50",
                                                                              "val_mAP50")},
                                     "data": {"label_fraction": 0.1 if "@" in c else 1.0, "labeled_images": 10,
                                              "unlabeled": pool, "unlabeled_images": 90 if pool else 0}}))
    (d / "ledger.jsonl").write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    (s,) = json.loads(res.stdout)["studies"]
    assert s["last_quarter"]["teacher"] == {"f1/s0": pytest.approx(0.2), "f1/s1": pytest.approx(0.2)}
    assert s["last_quarter"]["hard"]["f1/s0"] == pytest.approx(20.0) and "hard+pdf" not in s["last_quarter"]
    assert s["twin_gains"]["hard+pdf@scarcepool"]["twin"] == "hard+pdf@scarce"  # same labelled share, no pool
    assert s["twin_gains"]["hard+pdf@scarce"]["twin"] == "hard+pdf"
    rows = {(r["config"], r["over"], r["seed"]): r for r in s["image_pairs"]["rows"]}
    assert s["image_pairs"]["missing"] == ["hard+pdf/f1/s1"]
    assert ("hard+pdf", "hard", 1) not in rows and ("hard+pdf", "hard", 0) in rows
    r = rows[("hard+pdf", "hard", 0)]
    assert r["gain"] == pytest.approx(maps[("hard+pdf", 0)] - maps[("hard", 0)], abs=1e-9)
    assert r["ci95"][0] <= r["gain"] <= r["ci95"][1] and r["ci95"][0] > 0  # 80 % found against 60 %
    from kdcli.engine.metrics import paired_bootstrap_map  # tested against copying the drawn images

    pair = [detfile.load(detfile.path_for(d / "runs" / f"{c}-f1-s0", "test")) for c in ("hard+pdf", "hard")]
    assert r["ci95"] == pytest.approx(list(paired_bootstrap_map(pair[0][0], pair[1][0], *pair[0][1:])[1:]), abs=1e-12)
    assert r["gap_closed"] == pytest.approx(r["gain"] / (maps[("teacher", 0)] - maps[("hard", 0)]))
    assert rows[("teacher", "hard", 0)]["gap_closed"] is None
    pool = rows[("hard+pdf@scarcepool", "hard+pdf@scarce", 1)]
    assert pool["gain"] == pytest.approx(maps[("hard+pdf@scarcepool", 1)] - maps[("hard+pdf@scarce", 1)], abs=1e-9)
    assert pool["gap_closed"] is None
    # a label-scarce row is also measured against the baseline on its labelled share (no teacher, same labels)
    for c in ("hard+pdf@scarce", "hard+pdf@scarcepool"):
        own = rows[(c, "hard@scarce", 0)]
        assert own["gain"] == pytest.approx(maps[(c, 0)] - maps[("hard@scarce", 0)], abs=1e-9)
        assert own["gap_closed"] == pytest.approx(own["gain"] / (maps[("teacher", 0)] - maps[("hard@scarce", 0)]))
    assert ("hard@scarce", "hard@scarce", 0) not in rows and ("hard+pdf", "hard@scarce", 0) not in rows
    # no gap closed where it means nothing: a row without a teacher, or a scarce row against the full baseline
    assert rows[("hard@scarce", "hard", 0)]["gap_closed"] is None
    assert rows[("hard+pdf@scarce", "hard", 0)]["gap_closed"] is None
    res = CliRunner().invoke(app, ["report", str(d), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    assert "hard+pdf over hard: 1 of 1 pairs above zero" in res.output and "hard+pdf/f1/s1" in res.output
    assert "still rising (>= 1 point): hard/f1/s0" in " ".join(res.output.split())
    (d / "runs" / "hard@scarce-f1-s1" / "dets_test.npz").write_bytes(b"not a zip")  # damaged: named, not fatal
    res = CliRunner().invoke(app, ["report", str(d), "--json"])
    assert res.exit_code == 0, res.output
    (s,) = json.loads(res.stdout)["studies"]
    assert s["image_pairs"]["missing"][0] == "hard+pdf/f1/s1"
    assert "hard@scarce/f1/s1 (" in s["image_pairs"]["missing"][1] and "unreadable" in s["image_pairs"]["missing"][1]
    assert not any(r["config"] == "hard@scarce" and r["seed"] == 1 for r in s["image_pairs"]["rows"])
    md = (tmp_path / "rep" / "pairs.md").read_text()
    assert f"| hard+pdf | hard | 1 | 0 | {100 * r['gain']:+.2f} |" in md and "kdcli val" in md
    got = list(csv.DictReader((tmp_path / "rep" / "pairs.csv").read_text().splitlines()))
    assert len(got) == len(rows) and {g["over"] for g in got} == {"hard", "hard+pdf@scarce", "hard+pdf",
                                                                          "hard@scarce"}
    # mAP50-95: the same pairs, each scored as the mean of the VOC-style mAP at IoU 0.50:0.05:0.95
    res = CliRunner().invoke(app, ["report", str(d), "--metric", "mAP50-95", "--out", str(tmp_path / "rep95")])
    assert res.exit_code == 0, res.output
    got = {(g["config"], g["over"], g["seed"]): g for g in
           csv.DictReader((tmp_path / "rep95" / "pairs.csv").read_text().splitlines())}
    det_file = {c: detfile.load(detfile.path_for(d / "runs" / f"{c}-f1-s0", "test")) for c in ("hard+pdf", "hard")}
    direct = {c: np.mean([np.nanmean(voc_per_class(x[0], x[1], 1, t)) for t in np.arange(0.5, 0.96, 0.05)])
              for c, x in det_file.items()}
    assert float(got[("hard+pdf", "hard", "0")]["gain"]) == pytest.approx(direct["hard+pdf"] - direct["hard"], abs=1e-6)
    assert direct["hard+pdf"] < maps[("hard+pdf", 0)] - 0.05  # boxes a little off: the stricter IoUs count
    assert "(mAP50-95, points)" in (tmp_path / "rep95" / "pairs.md").read_text()
    res = CliRunner().invoke(app, ["report", str(d), "--metric", "coco_AP50", "--out", str(tmp_path / "rep_coco")])
    assert res.exit_code == 0 and not (tmp_path / "rep_coco" / "pairs.csv").exists()  # no per-image pairing of it
