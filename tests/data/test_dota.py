"""DOTA source: label parsing by hand, polygons to boxes, difficult kept, split before tiling, val_scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from kdcli.cli.app import app
from kdcli.data.sources import dota
from kdcli.data.sources.common import NON_FINITE
from kdcli.data.tally import Tally
from kdcli.errors import KdcliError
from tests.conftest import train_steps_args


def test_label_lines_by_hand(tmp_path: Path):
    f = tmp_path / "P1.txt"
    f.write_text("imagesource:GoogleEarth\ngsd:0.146\n"
                 "1 2 11 2 11 7 1 7 small-vehicle 1\n"
                 "0 0 4 0 4 4 0 4 plane\n"  # no difficult field
                 "0 0 4 0 4 4 0 small-vehicle 0\n"  # a coordinate missing
                 "0 0 4 0 4 4 0 4 tank 0\n"
                 "0 0 4 0 4 4 0 4 plane x\n")
    tally = Tally()
    objects, gsd = dota.parse_labels(f, tally)
    assert gsd == pytest.approx(0.146)
    assert objects == [("small-vehicle", [1, 2, 11, 2, 11, 7, 1, 7], 1), ("plane", [0, 0, 4, 0, 4, 4, 0, 4], 0)]
    dropped = tally.as_dict()
    assert dropped["label line without 8 coordinates before its class (dropped)"]["example"] == f"{f}:5"
    assert dropped["unknown class 'tank' (dropped)"]["example"] == f"{f}:6"
    assert dropped["label line whose difficult flag is not 0 or 1 (dropped)"]["count"] == 1


def _scene(folder: Path, name: str, labels: str, size=(300, 200)) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labelTxt").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (80, 80, 80)).save(folder / "images" / f"{name}.png")
    (folder / "labelTxt" / f"{name}.txt").write_text(labels)


def test_official_split_folders_polygons_difficult_and_val_scenes(tmp_path: Path):
    src = tmp_path / "DOTA"
    _scene(src / "train", "P1", "gsd:0.2\n10 20 50 10 60 40 20 50 large-vehicle 0\n"
                                "200 100 220 100 220 110 200 110 small-vehicle 1\n")
    _scene(src / "val", "P2", "280 150 330 150 330 170 280 170 small-vehicle 1\n"  # runs off the 300 px image
                              "5 5 15 5 15 15 5 15 plane 0\n")
    meta = dota.prepare(src, tmp_path / "out", tile=128, overlap=0.25, keep_empty=0.0)
    assert meta["classes"] == ["small-vehicle", "large-vehicle"] and meta["scenes"] == {"train": ["P1.png"],
                                                                                        "val": ["P2.png"]}
    scenes = json.loads((tmp_path / "out" / "annotations" / "val_scenes.json").read_text())
    (ann,) = scenes["annotations"]  # the plane is outside the vehicles preset
    assert ann["bbox"] == [280.0, 150.0, 20.0, 20.0] and ann["difficult"] == 1 and ann["category_id"] == 1
    train = json.loads((tmp_path / "out" / "annotations" / "train.json").read_text())
    big = [a for a in train["annotations"] if a["category_id"] == 2]
    assert big and all(a["bbox"] == [10.0, 10.0, 50.0, 40.0] for a in big if a["image_id"] == 1)  # enclosing box
    assert meta["dropped"]["box clipped to the image"]["count"] == 1
    with pytest.raises(KdcliError, match="unknown DOTA preset"):
        dota.prepare(src, tmp_path / "o2", classes="cars")


def test_synthetic_dota_end_to_end(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("KDCLI_DATASETS", str(tmp_path / "datasets"))
    runner = CliRunner()
    r = runner.invoke(app, ["prepare", "synthetic", "--kind", "dota", "--images", "4", "--size", "600"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["prepare", "dota", "--src", str(tmp_path / "datasets" / "raw" / "synthetic-dota"),
                            "--tile", "256", "--val-fraction", "0.25"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "datasets" / "synthetic-dota"
    meta = yaml.safe_load((out / "dataset.yaml").read_text())
    dropped = {k: v["count"] for k, v in meta["dropped"].items()}
    assert dropped["image without a label file (no objects)"] == 1
    assert dropped["label file without an image (not used)"] == 1
    assert dropped["label line without 8 coordinates before its class (dropped)"] == 3
    assert dropped["unknown class 'tank' (dropped)"] == 3 and dropped["box clipped to the image"] == 3
    assert len(meta["scenes"]["val"]) == 1 and meta["splits"]["val_scenes"]["images"] == 1
    assert meta["splits"]["train"]["objects"] > 0 and meta["splits"]["train"]["difficult"] >= 0
    assert runner.invoke(app, ["data", "check", str(out)]).exit_code == 0
    monkeypatch.setenv("KDCLI_RUNS", str(tmp_path / "runs"))
    r = runner.invoke(app, train_steps_args(out))
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["epochs"] == 1


def test_nan_and_inf_polygons_are_dropped_counted_never_written(tmp_path: Path):
    src = tmp_path / "DOTA"
    _scene(src / "train", "P1", "10 20 50 10 inf 40 20 50 large-vehicle 0\n10 20 50 10 60 40 20 50 large-vehicle 0\n")
    _scene(src / "val", "P2", "nan 10 40 10 40 20 nan 20 small-vehicle 0\n5 5 25 5 25 15 5 15 small-vehicle 0\n")
    meta = dota.prepare(src, tmp_path / "out", tile=128, overlap=0.25, keep_empty=0.0)
    assert meta["dropped"][NON_FINITE] == {"count": 2, "example": f"{src / 'train' / 'labelTxt' / 'P1.txt'}:1"}
    assert "box clipped to the image" not in meta["dropped"]  # inf is not clipped to the border
    scenes = (tmp_path / "out" / "annotations" / "val_scenes.json").read_text()
    assert "NaN" not in scenes and [a["bbox"] for a in json.loads(scenes)["annotations"]] == [[5.0, 5.0, 20.0, 10.0]]
    assert meta["splits"]["train"]["objects"] >= 1 and meta["splits"]["val_scenes"]["objects"] == 1


def test_a_skipped_bad_image_counts_its_objects(tmp_path: Path):
    src = tmp_path / "DOTA"
    _scene(src, "P1", "10 20 50 10 60 40 20 50 large-vehicle 0\n")
    _scene(src, "P2", "10 20 50 10 60 40 20 50 large-vehicle 0\n5 5 25 5 25 15 5 15 plane 0\n")
    (src / "images" / "P2.png").write_bytes(b"not a png")
    meta = dota.prepare(src, tmp_path / "out", tile=128, val_fraction=0, skip_bad_images=True)
    assert meta["dropped"]["boxes of skipped images (dropped)"]["count"] == 2
