"""`data check` catches each planted defect; `data stats` counts what is there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from kdcli.data.check import check, stats


@pytest.fixture
def dataset(tmp_path: Path, vedai25: Path) -> Path:
    d = tmp_path / "d"
    shutil.copytree(vedai25, d, symlinks=True)
    return d


def _edit(d: Path, name: str, fn) -> None:
    p = d / "annotations" / f"{name}.json"
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def test_clean_dataset_passes(vedai25: Path):
    assert check(vedai25) == []


@pytest.mark.parametrize("defect,expected", [
    (lambda d: d["images"].append(dict(d["images"][0])), "duplicate image id"),
    (lambda d: d["images"][0].update(id=0), "id must be an integer >= 1"),
    (lambda d: d["annotations"][0].update(id=d["annotations"][1]["id"]), "duplicate annotation id"),
    (lambda d: d["annotations"][0].update(category_id=42), "category_id 42 is not in 1..8"),
    (lambda d: d["annotations"][0].update(bbox=[90, 90, 50, 50]), "lies outside its 96x96 image"),
    (lambda d: d["annotations"][0].update(bbox=[5, 5, 0, 3]), "has no area"),
    (lambda d: d["annotations"][0].update(image_id=9999), "image_id 9999 has no image entry"),
    (lambda d: d["categories"].pop(), "differ from dataset.yaml classes"),
    (lambda d: d["images"][0].update(width=97), "is 96x96 but declared 97x96"),
])
def test_check_catches_defects(dataset: Path, defect, expected: str):
    _edit(dataset, "fold01_test", defect)
    problems = check(dataset)
    assert any(expected in p and "fold01_test.json" in p for p in problems), problems


def test_check_catches_missing_and_corrupt_images(dataset: Path):
    first = json.loads((dataset / "annotations" / "fold01_test.json").read_text())["images"]
    (dataset / first[0]["file_name"]).unlink()
    target = dataset / first[1]["file_name"]
    data = target.read_bytes()
    target.unlink()
    target.write_bytes(data[:150])
    problems = check(dataset)
    assert any("image not found" in p for p in problems)
    assert any("cannot decode image" in p for p in problems)
    assert not any("cannot decode" in p for p in check(dataset, decode=False))


def test_check_invalid_json(dataset: Path):
    (dataset / "annotations" / "fold02_val.json").write_text("{\n oops")
    assert any("fold02_val.json:2: invalid JSON" in p for p in check(dataset))


def test_stats_counts(vedai25: Path, tmp_path: Path):
    s = stats(vedai25)
    t = json.loads((vedai25 / "annotations" / "fold01_test.json").read_text())
    split = s["splits"]["fold01_test"]
    assert split["images"] == len(t["images"]) and split["objects"] == len(t["annotations"])
    assert sum(split["objects_per_class"].values()) == len(t["annotations"])
    areas = [a["bbox"][2] * a["bbox"][3] for a in t["annotations"]]
    assert split["share_small"] == pytest.approx(sum(a < 1024 for a in areas) / len(areas), abs=1e-4)
    d = tmp_path / "tiny"
    (d / "annotations").mkdir(parents=True)
    Image.new("RGB", (10, 10)).save(tmp_path / "x.png")
    (d / "dataset.yaml").write_text("classes: [a]\n")
    (d / "annotations" / "train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "../x.png", "width": 10, "height": 10}], "annotations": [],
         "categories": [{"id": 1, "name": "a"}]}))
    s = stats(d)
    assert s["splits"]["train"]["objects"] == 0 and s["splits"]["train"]["empty_images"] == 1
