"""`kdcli compare`: paired gains between saved detections, the expected values worked out by hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.engine import detfile
from kdcli.engine import metrics as M

# three images, one car each; A finds all three exactly, B finds image 1 with a box of IoU 100/130 = 0.77 and
# image 3 exactly, and misses image 2
GT = {"images": [{"id": i, "file_name": f"{i}.png", "width": 20, "height": 20} for i in (1, 2, 3)],
      "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": b, "area": 100, "iscrowd": 0}
                      for i, b in ((1, [0, 0, 10, 10]), (2, [0, 0, 10, 10]), (3, [5, 5, 10, 10]))],
      "categories": [{"id": 1, "name": "car"}]}


def _dets(rows: list[tuple[int, float, list[float]]]) -> M.Detections:
    return M.Detections(np.array([r[0] for r in rows], np.int64), np.zeros(len(rows), np.int64),
                        np.array([r[1] for r in rows]), np.array([r[2] for r in rows], np.float64).reshape(-1, 4))


@pytest.fixture()
def runs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    detfile.save(a / "dets_test.npz", _dets([(1, 0.9, [0, 0, 10, 10]), (2, 0.8, [0, 0, 10, 10]),
                                            (3, 0.7, [5, 5, 15, 15])]), GT, 1)
    detfile.save(b / "dets_test.npz", _dets([(1, 0.9, [0, 0, 10, 13]), (3, 0.8, [5, 5, 15, 15])]), GT, 1)
    return a, b


def test_gains_equal_the_hand_computed_ap(tmp_path: Path, runs):
    a, b = runs
    res = CliRunner().invoke(app, ["compare", str(a), str(b / "dets_test.npz"), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    # B: two true positives ranked first, one car missed: precision 1 up to recall 2/3 -> AP50 2/3
    assert rows[0]["score"] == pytest.approx(1.0) and rows[0]["gain"] is None
    assert rows[1]["score"] == pytest.approx(2 / 3) and rows[1]["gain"] == pytest.approx(2 / 3 - 1)
    lo, hi = rows[1]["ci95"]
    assert lo <= rows[1]["gain"] <= hi <= 0  # a resample without image 2 ties them

    out_csv = tmp_path / "out" / "cmp.csv"
    res = CliRunner().invoke(app, ["compare", str(a), str(b), "--metric", "mAP50-95", "--csv", str(out_csv)])
    assert res.exit_code == 0, res.output
    got = list(csv.DictReader(out_csv.open()))
    # B at IoU 0.50-0.75 (6 thresholds): AP 2/3; at 0.80-0.95 (4): image 1's box is a false positive ranked
    # first, image 3's a hit at precision 1/2 for recall 1/3: AP 1/6
    expected = (6 * 2 / 3 + 4 * 1 / 6) / 10
    assert float(got[1]["mAP50-95"]) == pytest.approx(expected, abs=1e-6)
    assert float(got[1][f"gain over {a / 'dets_test.npz'}"]) == pytest.approx(expected - 1, abs=1e-6)
    assert float(got[1]["ci95_low"]) <= expected - 1 <= float(got[1]["ci95_high"])
    assert "-53.33" in res.output  # the table, in points


def test_compare_refuses_what_it_cannot_pair(tmp_path: Path, runs):
    a, b = runs
    other = tmp_path / "other"
    other.mkdir()
    detfile.save(other / "dets_test.npz", _dets([(1, 0.9, [0, 0, 10, 10])]),
                 {**GT, "images": GT["images"][:1], "annotations": GT["annotations"][:1]}, 1)
    cases = [([str(a), str(other)], "scores other images or boxes than"),
             ([str(a)], "two or more runs"),
             ([str(a), str(b), "--metric", "AP75"], "--metric AP75"),
             ([str(a), str(tmp_path / "nowhere")], "no such file or folder"),
             ([str(a), str(tmp_path)], "0 detections files")]
    for args, message in cases:
        res = CliRunner().invoke(app, ["compare", *args])
        assert res.exit_code == 2 and message in res.output, (args, res.output)
    detfile.save(b / "dets_val.npz", _dets([]), GT, 1)
    res = CliRunner().invoke(app, ["compare", str(a), str(b)])
    assert res.exit_code == 2 and "2 detections files" in res.output and "dets_val.npz" in res.output
